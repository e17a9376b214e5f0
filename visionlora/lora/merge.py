"""Fold LoRA updates into the base weights (W ← W + ΔW) and back, or remove the wrappers altogether.

After merging, inference costs exactly what the base model costs (Hu et al. 2021, section 4.1: "no additional
inference latency").
"""

from __future__ import annotations

from torch import nn

from .inject import STATE_ATTR, lora_layers, lora_state, set_submodule


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight in place; merging twice is a no-op."""
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract every merged LoRA update from its base weight again (exact up to float rounding)."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Merge, then replace every wrapper by its base layer: a plain model with the original state_dict keys.

    Parameters keep the requires_grad flags LoRA gave them (base frozen, head trainable); BatchNorm hooks are
    removed.
    """
    for path, layer in lora_layers(model).items():
        layer.merge()
        set_submodule(model, path, layer.base_layer)
    state = lora_state(model)
    if state is not None:
        for hook in state.bn_hooks:
            hook.remove()
        delattr(model, STATE_ATTR)
    return model
