"""Convert each LoRA layer's factors to and from Hugging Face PEFT's tensor layout.

PEFT stores one (lora_A, lora_B) pair per module. Our layers may hold several pairs (q/k/v slices) or per-group
blocks (grouped convs); both are written as a single PEFT pair that is *exactly* the same ΔW:

* fused qkv slices: ``lora_A`` stacks the slices' A (rank r·n_slices) and ``lora_B`` is block-structured, slice
  n's B in its own rows and columns;
* grouped convs: ``lora_A`` is a dense conv whose rows for group g are zero outside input group g, and ``lora_B``
  is PEFT's grouped 1×1 conv;
* PiSSA layers are written against the original weight as a rank-2r pair, scale·(B·A − B0·A0).
"""

from __future__ import annotations

import torch
from torch import nn

from .layer import Factors, LoraLayer
from .mha import LoraMultiheadAttention


def to_peft(layer: LoraLayer, adapter: str | nn.Module | None = None) -> dict[str, torch.Tensor]:
    """One adapter's tensors of the layer (None: the active one) under PEFT's names relative to the module
    ("lora_A.weight", ...)."""
    slot = layer.slot(adapter)
    initial = layer.pissa_initial_factors(slot)
    if isinstance(layer, LoraMultiheadAttention):
        tensors = _pair_tensors(_export_pairs(slot.lora_slices.factors(), initial), 3 * layer.base_layer.embed_dim)
        outs = layer.out_factors(slot)
        if outs:
            out_tensors = _pair_tensors(_export_pairs(outs, None), layer.base_layer.embed_dim)
            tensors.update({f"out_proj.{k}": v for k, v in out_tensors.items()})
        return tensors
    weight = layer.base_weight()
    pairs = _export_pairs(layer.factors(slot), initial)
    if weight.dim() == 4:
        tensors = _conv_pair_tensors(pairs[0], weight)
    else:
        tensors = _pair_tensors(pairs, weight.shape[0])
    if slot.use_dora:
        magnitude = slot.lora_magnitude.detach()
        tensors["lora_magnitude_vector"] = magnitude.reshape(1, -1, 1, 1) if weight.dim() == 4 else magnitude
    return tensors


def from_peft(layer: LoraLayer, tensors: dict[str, torch.Tensor], adapter: str | nn.Module | None = None
              ) -> dict[str, torch.Tensor]:
    """Map PEFT tensors (names relative to the module) to the adapter's own parameter names (relative to its slot).

    The caller has checked names and shapes against :func:`to_peft` of the same layer and adapter.
    """
    slot = layer.slot(adapter)
    if isinstance(layer, LoraMultiheadAttention):
        slices = _split_pairs(slot.lora_slices, slot.lora_slices.factors(), tensors, "")
        own = {f"lora_slices.{k}": v for k, v in slices.items()}
        own.update(_split_pairs(slot, layer.out_factors(slot), tensors, "out_proj."))
        return own
    weight = layer.base_weight()
    if weight.dim() == 4:
        own = _split_conv(layer, slot, tensors, weight)
    else:
        holder = getattr(slot, "lora_slices", slot)
        own = _split_pairs(holder, layer.factors(slot), tensors, "")
        if holder is not slot:
            own = {f"lora_slices.{k}": v for k, v in own.items()}
    if slot.use_dora:
        own["lora_magnitude"] = tensors["lora_magnitude_vector"].reshape(-1)
    return own


def peft_rank(tensors: dict[str, torch.Tensor]) -> int:
    """PEFT's rank of a module: rows of its lora_A."""
    return tensors["lora_A.weight"].shape[0]


def _export_pairs(pairs: list[Factors], initial) -> list[tuple[torch.Tensor, torch.Tensor, slice, int]]:
    """(A, B, rows, groups) per pair, A as (groups, r, fan_in_g) and B as (groups, rows_g, r); PiSSA folded in."""
    out = []
    for index, pair in enumerate(pairs):
        a = pair.A.detach().reshape(pair.groups, pair.rank, -1)
        b = pair.B.detach().reshape(pair.groups, -1, pair.rank)
        if initial is not None:
            a0, b0 = initial[index]
            a = torch.cat([a, a0.reshape(a.shape)], dim=1)
            b = torch.cat([b, -b0.reshape(b.shape)], dim=2)
        out.append((a, b, pair.rows, pair.groups))
    return out


def _pair_tensors(pairs, out_rows: int) -> dict[str, torch.Tensor]:
    """Stack the pairs' A and place each B in its rows and columns of one (out_rows × total rank) matrix."""
    a_stack = torch.cat([a[0] for a, _, _, _ in pairs], dim=0)
    b_block = a_stack.new_zeros(out_rows, a_stack.shape[0])
    column = 0
    for _, b, rows, _ in pairs:
        rank = b.shape[2]
        b_block[rows, column : column + rank] = b[0]
        column += rank
    return {"lora_A.weight": a_stack.contiguous(), "lora_B.weight": b_block}


def _conv_pair_tensors(pair, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    a, b, _, groups = pair
    rank = a.shape[1]
    out_channels, in_per_group, kh, kw = weight.shape
    a = a.reshape(groups, rank, in_per_group, kh, kw)
    dense = a.new_zeros(groups, rank, groups * in_per_group, kh, kw)
    for g in range(groups):
        dense[g, :, g * in_per_group : (g + 1) * in_per_group] = a[g]
    lora_a = dense.reshape(groups * rank, groups * in_per_group, kh, kw)
    lora_b = b.reshape(out_channels, rank, 1, 1)
    return {"lora_A.weight": lora_a.contiguous(), "lora_B.weight": lora_b.contiguous()}


def _split_pairs(holder, pairs: list[Factors], tensors: dict, prefix: str) -> dict[str, torch.Tensor]:
    if not pairs:
        return {}
    a_stack, b_block = tensors[f"{prefix}lora_A.weight"], tensors[f"{prefix}lora_B.weight"]
    names = {id(p): n for n, p in holder.named_parameters(recurse=False)}
    own, column = {}, 0
    for pair in pairs:
        own[names[id(pair.A)]] = a_stack[column : column + pair.rank]
        own[names[id(pair.B)]] = b_block[pair.rows, column : column + pair.rank]
        column += pair.rank
    return own


def _split_conv(layer: LoraLayer, slot: nn.Module, tensors: dict, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    groups, rank = layer.groups, slot.rank
    in_per_group, kh, kw = weight.shape[1:]
    dense = tensors["lora_A.weight"].reshape(groups, rank, groups * in_per_group, kh, kw)
    blocks = [dense[g, :, g * in_per_group : (g + 1) * in_per_group] for g in range(groups)]
    off_block = dense.clone()
    for g in range(groups):
        off_block[g, :, g * in_per_group : (g + 1) * in_per_group] = 0
    if torch.count_nonzero(off_block):
        # PEFT's grouped-conv LoRA uses a dense A, whose update is not grouped and so cannot be merged.
        raise ValueError("grouped-conv lora_A mixes input groups; only block-diagonal (mergeable) updates load")
    lora_a = torch.stack(blocks).reshape(slot.lora_A.shape)
    return {"lora_A": lora_a, "lora_B": tensors["lora_B.weight"].reshape(slot.lora_B.shape)}
