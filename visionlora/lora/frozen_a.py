"""LoRA-FA: A frozen at a seeded random projection, only B trained, and one A in memory for every task that has it.

LoRA-FA (Zhang et al. 2023, arXiv:2308.03303) freezes the down-projection A at its random initialisation and
trains only B; ΔW = s·B·A then lies in the span A fixes, and the paper reports quality close to LoRA's with less
activation memory. Here A is drawn from a generator seeded by (``LoraConfig.A_seed``, module path, factor index),
so adapters trained separately, in other processes, hold the very same A. A server that loads many such tasks onto
one backbone keeps one A per layer: a task costs its B (out·r per layer) and its head. For a conv, B is out·r
where A is r·in·k·k, so on ResNet-50 at r = 8 a task shrinks from 2.5 MB to under 1 MB.

Sharing is exact: a loaded A is shared only with an A of equal values (``torch.equal``); the saved adapter still
holds its own A, so PEFT and every other reader see an ordinary LoRA.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from .layer import LoraLayer


def seeded_factor(shape: torch.Size, fan_in: int, seed: int, path: str, index: int) -> torch.Tensor:
    """The frozen A of factor ``index`` of the layer at ``path``: Kaiming-uniform (LoRA's default init of A),
    from a generator seeded by a checksum of (seed, path, index), which is the same in every process."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{path}/{index}".encode()))
    bound = math.sqrt(1.0 / fan_in)
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


@torch.no_grad()
def seed_frozen_factors(layer: LoraLayer, slot: nn.Module, path: str, seed: int) -> None:
    """Overwrite every A of ``slot`` (an initialised slot of ``layer`` at ``path``) with its seeded value."""
    for index, pair in enumerate(layer.factors(slot)):
        value = seeded_factor(pair.A.shape, pair.A[0].numel(), seed, path, index)
        pair.A.copy_(value.to(pair.A.dtype))


def share_frozen_factors(layer: LoraLayer, slot: nn.Module, frozen_adapters: list[str]) -> None:
    """Make each A of ``slot`` the very Parameter of another adapter's equal A in ``layer`` (one of
    ``frozen_adapters``, the other LoRA-FA adapters), so that it is held once in memory."""
    others = [layer.slot_or_none(name) for name in frozen_adapters]
    others = [other for other in others if other is not None and other is not slot]
    for index, pair in enumerate(layer.factors(slot)):
        for other in others:
            candidates = layer.factors(other)
            if index < len(candidates) and _equal(candidates[index].A, pair.A):
                _replace_parameter(slot, pair.A, candidates[index].A)
                break


def frozen_factor_parameters(layer: LoraLayer, slot: nn.Module) -> list[nn.Parameter]:
    """The A factors of ``slot``: what LoRA-FA keeps frozen."""
    return [pair.A for pair in layer.factors(slot)]


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def _replace_parameter(slot: nn.Module, old: nn.Parameter, new: nn.Parameter) -> None:
    """Register ``new`` wherever ``slot`` (or a submodule of it that is not another adapter) registers ``old``."""
    for module in slot.modules():
        for name, param in list(module._parameters.items()):
            if param is old:
                module._parameters[name] = new
                return
    raise LookupError("share_frozen_factors: a factor of the slot is not among its parameters")
