"""LoRA for ``nn.Conv2d`` and every subclass timm uses (``Conv2dSame``, ``StdConv2d``, ``ScaledStdConv2d``, ...).

The update is defined on the weight, ΔW ∈ R^{out × in/groups × kh × kw}, so the adapted layer is exactly the base
layer with weight W + ΔW, whatever its kernel, stride, padding, dilation, padding mode or weight transform:

* Weight-standardised convs (Qiao et al. 2019; used by BiT/ResNetV2, NFNets) standardise their weight inside
  ``forward``. Adding ΔW *before* the standardisation makes merging exact: the merged layer standardises W + ΔW
  just as the adapted one did. An activation-space branch beside the conv (PEFT's design) cannot be merged there.
* Grouped and depthwise convs get block-diagonal factors: group g has its own A_g ∈ R^{r×(in_g·kh·kw)} and
  B_g ∈ R^{out_g×r}, so ΔW keeps the grouped layout and any r works (no "r divisible by groups" restriction).

Stored in PEFT's conv layout: A is (groups·r, in/groups, kh, kw) and B is (out, r, 1, 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .fused import CONV_SUBCLASS_REASON, fused_conv2d, is_pointwise, slot_blocker
from .layer import DEFAULT_ADAPTER, Factors, LoraLayer, new_factor
from .per_sample import add_conv_deltas_, conv_supports_per_sample


class LoraConv2d(LoraLayer):
    """A wrapped 2-D convolution with ΔW = scale · blockdiag_g(B_g·A_g)."""

    def __init__(self, base_layer: nn.Conv2d, rank: int, scale: float, dropout: float = 0.0, use_dora: bool = False,
                 form: str = "auto", adapter: str = DEFAULT_ADAPTER) -> None:
        super().__init__(base_layer, adapter)
        self.groups = base_layer.groups
        self.add_slot(adapter, self.new_slot(rank, scale, dropout, use_dora, form))

    def build_factors(self, slot: nn.Module, rank: int) -> None:
        weight = self.base_layer.weight
        slot.lora_A = new_factor(self.groups * rank, *weight.shape[1:], like=weight)
        slot.lora_B = new_factor(weight.shape[0], rank, 1, 1, like=weight)

    @property
    def supports_activation_form(self) -> bool:
        # Only a plain Conv2d is linear in its weight with no transform, so only it splits into conv(x,W)+conv(x,ΔW).
        return type(self.base_layer) is nn.Conv2d

    def measures_form(self) -> bool:
        # conv(x, W + ΔW) costs a full weight gradient; conv_B(conv_A(x)) is cheap in FLOPs, but a k×k conv with
        # r output channels can run slowly on CPU kernels; the fused form pays neither. Which wins depends on shape
        # and device: measure it (until then: the weight form, one op).
        return True

    def fused_blocker(self, slot: nn.Module) -> str | None:
        if type(self.base_layer) is not nn.Conv2d:
            return CONV_SUBCLASS_REASON.format(name=type(self.base_layer).__name__)
        return slot_blocker(slot)

    @property
    def supports_fused_split(self) -> bool:
        # A 1x1 stride-1 conv is a Linear over pixels: its input gradient and g_h can come from one GEMM.
        return is_pointwise(self.base_layer)

    def fused_forward(self, x: torch.Tensor, slot: nn.Module, split: bool = False) -> torch.Tensor:
        return fused_conv2d(self.base_layer, x, slot.lora_A, slot.lora_B, slot.scale, split=split)

    def factors(self, adapter: str | nn.Module | None = None) -> list[Factors]:
        slot = self.slot(adapter)
        return [Factors(slot.lora_A, slot.lora_B, slice(None), groups=self.groups, rank=slot.rank)]

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def activation_delta(self, x: torch.Tensor, adapter: str | nn.Module | None = None) -> torch.Tensor:
        slot = self.slot(adapter)
        # The base layer's own padding/stride/dilation/groups, with A as the weight: conv(x, A) has groups·r channels.
        hidden = self.base_layer._conv_forward(x, slot.lora_A, None)
        return F.conv2d(hidden, slot.lora_B * slot.scale, groups=self.groups)

    def forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if type(self.base_layer) is nn.Conv2d:
            return self.base_layer._conv_forward(x, weight, self.base_layer.bias)
        # Subclasses transform the weight in forward (standardisation, same-padding): run it with W + ΔW.
        return functional_call(self.base_layer, {"weight": weight}, (x,))

    def add_per_sample_deltas_(self, out: torch.Tensor, x: torch.Tensor, slots: list[nn.Module | None],
                               sample_group: torch.Tensor) -> bool:
        if not conv_supports_per_sample(self.base_layer, out):
            return False
        pairs = [None if slot is None else (slot.lora_A, slot.lora_B, slot.scale) for slot in slots]
        add_conv_deltas_(out, x, self.base_layer, pairs, sample_group)
        return True
