"""Mixed-task batches: one forward pass in which every sample runs with its own adapter and its own head.

Inside ``with adapter_batch(model, names) as batch:``, ``model(x)`` gives sample ``i`` what the model with
adapter ``names[i]`` active would give it. The samples are grouped by adapter once, at the start, and each LoRA
layer uses the groups: in the activation form the base op runs once for the whole batch and each group adds its
own low-rank branch (x·Aᵀ·Bᵀ on its rows); in the weight form (convs by default, DoRA, MultiheadAttention) the op
runs once per group with that adapter's W + ΔW. A head swap is a forward hook on the active head that gives every
other group its own head's output.

Heads may differ in size: the logits come back as one tensor of ``(batch, largest number of classes)``, each row
padded after its own classes with ``pad_value`` (-inf: softmax, argmax and cross-entropy then behave as on the
sample's own classes). ``batch.mask`` says which entries are real and ``batch.split(logits)`` gives each sample's
own logits as a list.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from .adapters import head_classes, refuse_while_merged, required_name, required_state
from .inject import lora_layers
from .per_sample import sample_groups


@dataclass
class BatchPlan:
    """The samples of a batch grouped by adapter, as the layers of one forward pass use them."""

    names: list[str]  # one adapter per group, in order of first appearance
    indices: list[torch.Tensor]  # the batch positions of each group's samples
    inverse: torch.Tensor  # sample i's row in the groups' outputs concatenated
    size: int
    sample_group: torch.Tensor  # each sample's group number
    where: str = "the model"  # the module that uses the plan, for error messages

    @classmethod
    def from_names(cls, names: Sequence[str], device: torch.device) -> BatchPlan:
        groups: dict[str, list[int]] = {}
        for position, name in enumerate(names):
            groups.setdefault(name, []).append(position)
        indices = [torch.tensor(rows, dtype=torch.long, device=device) for rows in groups.values()]
        order = torch.cat(indices)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=device)
        return cls(list(groups), indices, inverse, len(names), sample_groups(indices, len(names)))

    def check_batch(self, size: int) -> None:
        if size != self.size:
            raise ValueError(f"adapter_batch: {self.where} got a batch of {size} in its batch dimension, but "
                             f"{self.size} adapter names were given; every adapted layer must see the samples in "
                             f"their batch dimension (layers that fold other dimensions into it, as window attention "
                             f"does, cannot mix adapters)")

    def take(self, x: torch.Tensor, group: int, dim: int = 0) -> torch.Tensor:
        """Group ``group``'s samples of ``x`` along ``dim``."""
        return x.index_select(dim, self.indices[group].to(x.device))

    def split(self, x: torch.Tensor, dim: int = 0) -> list[torch.Tensor]:
        return [self.take(x, group, dim) for group in range(len(self.names))]

    def join(self, pieces: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
        """The groups' outputs (in group order) back in the samples' order."""
        out = torch.cat(pieces, dim)
        return out.index_select(dim, self.inverse.to(out.device))


@dataclass
class AdapterBatch:
    """What ``with adapter_batch(...) as batch`` gives: each sample's adapter and number of classes."""

    names: list[str]
    num_classes: list[int] | None  # per sample; None when the model has no head (or one of unknown size)

    @property
    def mask(self) -> torch.Tensor | None:
        """(batch, largest number of classes): True where a logit is one of the sample's own classes."""
        if self.num_classes is None:
            return None
        classes = torch.tensor(self.num_classes)
        return torch.arange(int(classes.max())) < classes.unsqueeze(1)

    def split(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """Each sample's logits over its own classes (no padding)."""
        if self.num_classes is None:
            return list(logits)
        return [row[:count] for row, count in zip(logits, self.num_classes, strict=True)]


@contextmanager
def adapter_batch(model: nn.Module, names: Sequence[str], pad_value: float = float("-inf")
                  ) -> Iterator[AdapterBatch]:
    """Run ``model(x)`` with adapter ``names[i]`` and its head for sample ``x[i]``, all in one forward pass.

    Args:
        model: A model holding the named adapters (none of them merged).
        names: One adapter name per sample of the batch to come.
        pad_value: What fills each sample's logits after its own classes when heads differ in size.

    Yields:
        An :class:`AdapterBatch` (``mask``, ``split``) for reading the padded logits.

    Raises:
        ValueError: an unknown name, a merged adapter, an adapter_batch already open on the model, or (in the
            forward pass) a layer whose batch dimension does not hold the samples.
    """
    state = required_state(model, "adapter_batch")
    names = list(names)
    if not names:
        raise ValueError("adapter_batch: no adapter names given")
    for name in dict.fromkeys(names):
        required_name(state, name, "adapter_batch")
    refuse_while_merged(model, "adapter_batch")
    layers = lora_layers(model)
    if any(layer.batch_plan is not None for layer in layers.values()):
        raise ValueError("adapter_batch: one is already open on this model; batches do not nest")
    device = next(iter(layers.values())).base_weight().device
    plan = BatchPlan.from_names(names, device)
    heads = [state.adapters[name].head for name in plan.names]
    hook = None
    try:
        for path, layer in layers.items():
            layer.batch_plan = replace(plan, where=path)
        if state.head_path is not None:
            active_head = model.get_submodule(state.head_path)
            hook = active_head.register_forward_hook(_mixed_head_hook(replace(plan, where=state.head_path), heads,
                                                                      pad_value))
        counts = [head_classes(head) for head in heads]
        per_sample = None if None in counts else [counts[plan.names.index(name)] for name in names]
        yield AdapterBatch(names=names, num_classes=per_sample)
    finally:
        for layer in layers.values():
            layer.batch_plan = None
        if hook is not None:
            hook.remove()


def _mixed_head_hook(plan: BatchPlan, heads: list[nn.Module], pad_value: float):
    """A forward hook for the active head: each group gets its own head's output (the active head's rows of its
    own group are reused), padded along dim 1 to the largest head."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        features = args[0]
        plan.check_batch(features.shape[0])
        pieces = [plan.take(output, group) if head is module else head(plan.take(features, group))
                  for group, head in enumerate(heads)]
        width = max(piece.shape[1] for piece in pieces)
        padded = [_pad_classes(piece, width, pad_value) for piece in pieces]
        return plan.join(padded)

    return hook


def _pad_classes(piece: torch.Tensor, width: int, pad_value: float) -> torch.Tensor:
    missing = width - piece.shape[1]
    if missing == 0:
        return piece
    filler = piece.new_full((piece.shape[0], missing, *piece.shape[2:]), pad_value)
    return torch.cat([piece, filler], dim=1)
