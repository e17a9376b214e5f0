"""Fold LoRA updates into the base weights (W ← W + ΔW) and back, or remove the wrappers altogether.

After merging, inference costs exactly what the base model costs (Hu et al. 2021, section 4.1: "no additional
inference latency"). With several adapters the base weights are shared, so merging one changes what every other
one runs on: it is refused unless that adapter is named (``merge_lora(model, adapter="x")``), and switching,
adding adapters and mixed batches are then refused until :func:`unmerge_lora`.
"""

from __future__ import annotations

from torch import nn

from .adapters import merged_adapter, required_name, set_adapter
from .inject import STATE_ATTR, lora_layers, lora_state, set_submodule
from .targets import HEADS_ATTR


def merge_lora(model: nn.Module, adapter: str | None = None) -> nn.Module:
    """Fold the active adapter's update into its base weights in place; merging twice is a no-op.

    Args:
        model: A model with LoRA.
        adapter: Merge this adapter alone: it is made active, then merged. Required when the model holds more
            than one adapter; until :func:`unmerge_lora`, ``set_adapter`` is then refused.
    """
    state = lora_state(model)
    names = list(state.adapters) if state is not None else []
    if adapter is None and len(names) > 1:
        raise ValueError(f"merge_lora: the model holds adapters {names}; merging the active one ({state.active!r}) "
                         f"changes the base weights the others share. Call merge_lora(model, adapter=name) to merge "
                         f"that one alone (switching is then refused until unmerge_lora)")
    if adapter is not None:
        if state is None:
            raise ValueError("merge_lora: the model has no adapters")
        required_name(state, adapter, "merge_lora")
        merged = merged_adapter(model)
        if merged not in (None, adapter):
            raise ValueError(f"merge_lora: adapter {merged!r} is merged already; unmerge_lora(model) first")
        set_adapter(model, adapter)
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract every merged LoRA update from its base weight again (exact up to float rounding)."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def unload_lora(model: nn.Module, adapter: str | None = None) -> nn.Module:
    """Merge, then replace every wrapper by its base layer: a plain model with the original state_dict keys.

    Parameters keep the requires_grad flags LoRA gave them (base frozen, head trainable); BatchNorm hooks are
    removed. With several adapters, name the one to keep (``adapter``): it is merged with its head in place and
    the others are dropped.
    """
    state = lora_state(model)
    if state is not None and len(state.adapters) > 1 and adapter is None:
        raise ValueError(f"unload_lora: the model holds adapters {list(state.adapters)}; "
                         f"unload_lora(model, adapter=name) keeps that one (merged) and drops the others")
    if adapter is not None:
        merge_lora(model, adapter)
    for path, layer in lora_layers(model).items():
        layer.merge()
        set_submodule(model, path, layer.base_layer)
    if HEADS_ATTR in model._modules:
        delattr(model, HEADS_ATTR)
    if state is not None:
        for hook in state.bn_hooks:
            hook.remove()
        delattr(model, STATE_ATTR)
    return model
