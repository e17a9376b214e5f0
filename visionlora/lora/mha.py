"""LoRA for ``nn.MultiheadAttention`` (open_clip-style transformers).

``nn.MultiheadAttention`` never calls ``out_proj.forward``: it reads ``in_proj_weight`` and ``out_proj.weight``
directly inside ``F.multi_head_attention_forward``. So the wrapper adapts both in the weight space and runs the
original module with W + ΔW substituted (``torch.func.functional_call``), which also makes merging exact.
The q, k and v slices of ``in_proj_weight`` get their own factors, as for timm's fused qkv.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .layer import Factors, LoraLayer, new_factor
from .linear import QKVSlices


class LoraMultiheadAttention(LoraLayer):
    """LoRA on the in-projection slices and, optionally, the out-projection of an ``nn.MultiheadAttention``."""

    def __init__(self, base_layer: nn.MultiheadAttention, rank: int, scale: float, slices: str = "qkv",
                 adapt_out_proj: bool = True, form: str = "auto") -> None:
        if not base_layer._qkv_same_embed_dim or base_layer.in_proj_weight is None:
            raise ValueError("LoRA supports nn.MultiheadAttention only with kdim == vdim == embed_dim (in_proj_weight)")
        if not slices and not adapt_out_proj:
            raise ValueError("LoraMultiheadAttention needs at least one qkv slice or the out-projection")
        super().__init__(base_layer, scale, dropout=0.0, use_dora=False, form="weight")
        embed = base_layer.embed_dim
        self.lora_slices = QKVSlices(embed, embed, slices, rank, base_layer.in_proj_weight)
        self.rank = rank
        if adapt_out_proj:
            self.lora_out_A = new_factor(rank, embed, like=base_layer.out_proj.weight)
            self.lora_out_B = new_factor(embed, rank, like=base_layer.out_proj.weight)

    supports_activation_form = False

    def factors(self) -> list[Factors]:
        return self.lora_slices.factors() + self.out_factors()

    def out_factors(self) -> list[Factors]:
        if not hasattr(self, "lora_out_A"):
            return []
        return [Factors(self.lora_out_A, self.lora_out_B, slice(None), groups=1, rank=self.rank)]

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight

    def delta_weight(self) -> torch.Tensor:
        """ΔW of ``in_proj_weight`` (3E × E)."""
        weight = self.base_layer.in_proj_weight
        delta = weight.new_zeros(weight.shape)
        for pair in self.lora_slices.factors():
            delta[pair.rows] = pair.blocks()[0]
        return delta * self.scale

    def out_delta_weight(self) -> torch.Tensor:
        """ΔW of ``out_proj.weight`` (E × E); zeros when the out-projection is not adapted."""
        weight = self.base_layer.out_proj.weight
        pairs = self.out_factors()
        return pairs[0].blocks()[0] * self.scale if pairs else weight.new_zeros(weight.shape)

    def forward(self, *args, **kwargs):
        if self.merged:
            return self.base_layer(*args, **kwargs)
        weights = {
            "in_proj_weight": self.base_layer.in_proj_weight + self.delta_weight(),
            "out_proj.weight": self.base_layer.out_proj.weight + self.out_delta_weight(),
        }
        return functional_call(self.base_layer, weights, args, kwargs)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.in_proj_weight.add_(self.delta_weight())
            self.base_layer.out_proj.weight.add_(self.out_delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.in_proj_weight.sub_(self.delta_weight())
            self.base_layer.out_proj.weight.sub_(self.out_delta_weight())
            self.merged = False

    def _init_pissa(self) -> None:
        raise ValueError("init='pissa' is not supported for nn.MultiheadAttention")
