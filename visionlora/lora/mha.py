"""LoRA for ``nn.MultiheadAttention`` (open_clip-style transformers).

``nn.MultiheadAttention`` never calls ``out_proj.forward``: it reads ``in_proj_weight`` and ``out_proj.weight``
directly inside ``F.multi_head_attention_forward``. So the wrapper adapts both in the weight space and runs the
original module with W + ΔW substituted (``torch.func.functional_call``), which also makes merging exact.
The q, k and v slices of ``in_proj_weight`` get their own factors, as for timm's fused qkv.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.func import functional_call

from .layer import DEFAULT_ADAPTER, Factors, LoraLayer, new_factor
from .linear import QKVSlices


class LoraMultiheadAttention(LoraLayer):
    """LoRA on the in-projection slices and, optionally, the out-projection of an ``nn.MultiheadAttention``."""

    supports_activation_form = False

    def __init__(self, base_layer: nn.MultiheadAttention, rank: int, scale: float, slices: str = "qkv",
                 adapt_out_proj: bool = True, form: str = "auto", adapter: str = DEFAULT_ADAPTER) -> None:
        if not base_layer._qkv_same_embed_dim or base_layer.in_proj_weight is None:
            raise ValueError("LoRA supports nn.MultiheadAttention only with kdim == vdim == embed_dim (in_proj_weight)")
        super().__init__(base_layer, adapter)
        self.add_slot(adapter, self.new_slot(rank, scale, form="weight", slices=slices, adapt_out_proj=adapt_out_proj))

    def build_factors(self, slot: nn.Module, rank: int, slices: str = "qkv", adapt_out_proj: bool = True) -> None:
        if not slices and not adapt_out_proj:
            raise ValueError("LoraMultiheadAttention needs at least one qkv slice or the out-projection")
        embed = self.base_layer.embed_dim
        slot.lora_slices = QKVSlices(embed, embed, slices, rank, self.base_layer.in_proj_weight)
        if adapt_out_proj:
            slot.lora_out_A = new_factor(rank, embed, like=self.base_layer.out_proj.weight)
            slot.lora_out_B = new_factor(embed, rank, like=self.base_layer.out_proj.weight)

    def factors(self, adapter: str | nn.Module | None = None) -> list[Factors]:
        slot = self.slot(adapter)
        return slot.lora_slices.factors() + self.out_factors(slot)

    def out_factors(self, adapter: str | nn.Module | None = None) -> list[Factors]:
        slot = self.slot(adapter)
        if "lora_out_A" not in slot._parameters:
            return []
        return [Factors(slot.lora_out_A, slot.lora_out_B, slice(None), groups=1, rank=slot.rank)]

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight

    def delta_weight(self, adapter: str | nn.Module | None = None) -> torch.Tensor:
        """ΔW of ``in_proj_weight`` (3E × E)."""
        slot = self.slot(adapter)
        weight = self.base_layer.in_proj_weight
        delta = weight.new_zeros(weight.shape)
        for pair in slot.lora_slices.factors():
            delta[pair.rows] = pair.blocks()[0]
        return delta * slot.scale

    def out_delta_weight(self, adapter: str | nn.Module | None = None) -> torch.Tensor:
        """ΔW of ``out_proj.weight`` (E × E); zeros when the out-projection is not adapted."""
        slot = self.slot(adapter)
        weight = self.base_layer.out_proj.weight
        pairs = self.out_factors(slot)
        return pairs[0].blocks()[0] * slot.scale if pairs else weight.new_zeros(weight.shape)

    def forward(self, *args, **kwargs):
        if self.merged:
            return self.base_layer(*args, **kwargs)
        if self.batch_plan is not None:
            return self.mixed_attention(args, kwargs)
        return self.slot_attention(self.slot_or_none(self.active_adapter), args, kwargs)

    def slot_attention(self, slot: nn.Module | None, args: tuple, kwargs: dict):
        """The attention with one adapter's W + ΔW (the base module alone when ``slot`` is None)."""
        if slot is None:
            return self.base_layer(*args, **kwargs)
        weights = {
            "in_proj_weight": self.base_layer.in_proj_weight + self.delta_weight(slot),
            "out_proj.weight": self.base_layer.out_proj.weight + self.out_delta_weight(slot),
        }
        return functional_call(self.base_layer, weights, args, kwargs)

    def mixed_attention(self, args: tuple, kwargs: dict):
        """Each sample with its own adapter (``batch_plan``): one attention call per adapter on its samples, whose
        inputs and masks are cut along the batch dimension (dim 1 unless ``batch_first``)."""
        plan = self.batch_plan
        call = inspect.signature(self.base_layer.forward).bind(*args, **kwargs).arguments
        dim = 0 if self.base_layer.batch_first else 1
        if call["query"].dim() != 3:
            raise ValueError(f"adapter_batch: {plan.where} needs batched (3-D) inputs, got {call['query'].dim()}-D")
        plan.check_batch(call["query"].shape[dim])
        outputs, weights = [], []
        for group, name in enumerate(plan.names):
            part = dict(call)
            taken = {}  # self-attention passes one tensor as query, key and value: keep it one tensor
            for key in ("query", "key", "value"):
                tensor = call[key]
                taken.setdefault(id(tensor), plan.take(tensor, group, dim))
                part[key] = taken[id(tensor)]
            if call.get("key_padding_mask") is not None:
                part["key_padding_mask"] = plan.take(call["key_padding_mask"], group)
            mask = call.get("attn_mask")
            if mask is not None and mask.dim() == 3:  # (batch·heads, L, S), sample-major
                per_sample = mask.reshape(plan.size, -1, *mask.shape[1:])
                part["attn_mask"] = plan.take(per_sample, group).flatten(0, 1)
            output, weight = self.slot_attention(self.slot_or_none(name), (), part)
            outputs.append(output)
            weights.append(weight)
        joined = None if weights[0] is None else plan.join(weights)
        return plan.join(outputs, dim), joined

    @torch.no_grad()
    def merge(self) -> None:
        slot = self.slot_or_none(self.active_adapter)
        if not self.merged and slot is not None:
            self.base_layer.in_proj_weight.add_(self.delta_weight(slot))
            self.base_layer.out_proj.weight.add_(self.out_delta_weight(slot))
            self.merged_adapter = self.active_adapter

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            slot = self.slot(self.merged_adapter)
            self.base_layer.in_proj_weight.sub_(self.delta_weight(slot))
            self.base_layer.out_proj.weight.sub_(self.out_delta_weight(slot))
            self.merged_adapter = None

    def _init_pissa(self, slot: nn.Module) -> None:
        raise ValueError("init='pissa' is not supported for nn.MultiheadAttention")
