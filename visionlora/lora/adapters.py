"""Several named adapters on one frozen backbone, each with its own classifier head: add, switch, delete, list.

A task is an adapter plus its head. Every LoRA layer holds one slot of factors per adapter and the name of the
active one (:class:`~visionlora.lora.layer.LoraLayer`); the model's head path (``get_classifier()``) points at the
active adapter's head module. Switching is therefore a pointer change: no tensor is copied, no module is made,
and inactive adapters cost nothing in the forward pass. Heads may differ in size (their own ``num_classes`` and
label names), which PEFT's per-adapter heads (``modules_to_save``, copies of the one head) cannot.

Layout: the adapter named ``default`` (the one :func:`~visionlora.lora.inject.inject_lora` makes) keeps its
tensors where a single-adapter model has them, so nothing changes for one adapter. Every other adapter ``n``
lives in ``layer.lora_adapters[n]``; with more than one adapter, ``model.lora_heads`` holds every adapter's head
(the active one is also at the head path).

Sharing one base rules out what would change it for the others: fully trained modules besides the head
(``LoraConfig.trainable``, ``train_norms``), BatchNorm statistics that move (``freeze_bn_stats=False``), PiSSA
(which moves part of the base weights into the adapter) and merging while the others stay usable
(:func:`~visionlora.lora.merge.merge_lora` takes ``adapter=`` to merge one alone).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from .config import LoraConfig
from .frozen_a import seed_frozen_factors, share_frozen_factors
from .inject import (
    AdapterRecord,
    LoraState,
    build_layer,
    build_slot,
    freeze_for_lora,
    frozen_A_adapters,
    inject_adapter,
    lora_layers,
    lora_state,
    set_submodule,
)
from .layer import LoraLayer
from .targets import HEADS_ATTR, LayerSpec, base_modules, find_head_path, specs_from_config

# Adapter names are folder names (save_adapter writes <folder>/<name>) and ModuleDict keys.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")

Staged = dict[str, tuple[LoraLayer, nn.Module, bool]]  # path -> (wrapper, the adapter's slot, wrapper is new)


@dataclass
class AdapterInfo:
    """What :func:`adapter_info` tells about one adapter."""

    name: str
    active: bool
    num_classes: int | None  # None: no head, or a head type whose size is not known
    label_names: list[str] | None
    config: LoraConfig
    layers: list[str]


def add_adapter(model: nn.Module, name: str, config: LoraConfig, num_classes: int | None = None,
                label_names: Sequence[str] | None = None) -> nn.Module:
    """Add adapter ``name`` (LoRA factors per ``config`` plus its own head) to ``model``, in place.

    The first adapter of a model becomes active (``add_adapter(model, "default", config)`` is
    :func:`~visionlora.lora.inject.inject_lora`); later ones are added inactive: :func:`set_adapter` switches.

    Args:
        model: A model with or without adapters.
        name: Letters, digits, ``_`` and ``-``; unique on the model.
        config: What this adapter adapts. With several adapters it must not train shared modules (see the module
            docstring).
        num_classes: The size of the adapter's own head: a new ``nn.Linear`` (or 1×1 ``nn.Conv2d``) on the model's
            head input. None: the first adapter keeps the model's head, a later one gets a copy of the active head.
        label_names: The class names, stored and saved with the adapter (one per class).

    Raises:
        ValueError: a bad or duplicate name, a config that would change the shared base, a head that cannot be
            sized; the model is then as it was.
    """
    check_adapter_name(name)
    config.validate()
    state = lora_state(model)
    if state is None:
        head_path = find_head_path(model)
        head = sized_head(model, head_path, num_classes) if num_classes is not None else None
        labels = checked_labels(label_names, head or _module_at(model, head_path), name)
        return inject_adapter(model, config, name, head=head, label_names=labels)
    if name in state.adapters:
        raise ValueError(f"add_adapter: the model already holds an adapter named {name!r} (adapters: "
                         f"{list(state.adapters)}); delete_adapter(model, {name!r}) first or choose another name")
    refuse_while_merged(model, "add_adapter")
    trainable = [state.head_path] if state.head_path and config.train_head else []
    check_shareable(state, name, config, trainable)
    specs = specs_from_config(model, config)
    staged = stage_slots(model, specs, name)
    frozen = frozen_A_adapters(state)
    for path, (layer, slot, _) in staged.items():
        layer.initialize(config.init, slot)
        if config.freeze_A:
            seed_frozen_factors(layer, slot, path, config.A_seed)
            share_frozen_factors(layer, slot, frozen)
    head = new_head(model, state, num_classes)
    record = AdapterRecord(config=config, specs=specs, trainable_paths=trainable, head=head,
                           label_names=checked_labels(label_names, head, name))
    commit_adapter(model, state, name, staged, record)
    return model


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make adapter ``name`` (and its head) the one the model runs: a pointer change, nothing copied or built."""
    state = required_state(model, "set_adapter")
    required_name(state, name, "set_adapter")
    if name == state.active:
        return model
    refuse_while_merged(model, f"set_adapter(model, {name!r})")
    for layer in lora_layers(model).values():
        layer.active_adapter = name
    head = state.adapters[name].head
    if head is not None:
        set_submodule(model, state.head_path, head)
    state.active = name
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove an inactive adapter's factors and head; layers no other adapter adapts become their base layer again.

    The active adapter is not deleted (ValueError): switch to another first, or remove LoRA with
    :func:`~visionlora.lora.merge.unload_lora` when it is the only one.
    """
    state = required_state(model, "delete_adapter")
    required_name(state, name, "delete_adapter")
    if name == state.active:
        others = [n for n in state.adapters if n != name]
        hint = (f"set_adapter(model, {others[0]!r}) first" if others
                else "it is the only adapter: unload_lora(model) merges it and removes LoRA")
        raise ValueError(f"delete_adapter: adapter {name!r} is the active one, so it stays loaded; {hint}")
    for path, layer in lora_layers(model).items():
        if layer.slot_or_none(name) is not None:
            layer.remove_slot(name)
            if not layer.adapter_names():
                set_submodule(model, path, layer.base_layer)
    del state.adapters[name]
    sync_heads(model, state)
    return model


def list_adapters(model: nn.Module) -> list[str]:
    """The adapters the model holds, in the order they were added (empty without LoRA)."""
    state = lora_state(model)
    return list(state.adapters) if state is not None else []


def active_adapter(model: nn.Module) -> str | None:
    """The name of the adapter the model runs, or None without LoRA."""
    state = lora_state(model)
    return state.active if state is not None else None


def adapter_info(model: nn.Module, name: str | None = None) -> AdapterInfo:
    """Head size, label names, config and adapted layers of adapter ``name`` (None: the active one)."""
    state = required_state(model, "adapter_info")
    name = state.active if name is None else name
    record = required_name(state, name, "adapter_info")
    layers = [path for path, layer in lora_layers(model).items() if layer.slot_or_none(name) is not None]
    return AdapterInfo(name=name, active=name == state.active, num_classes=head_classes(record.head),
                       label_names=record.label_names, config=record.config, layers=layers)


# ----- shared by adapter loading (adapter.py) and batches (batch.py) ------------------------------------------
def check_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"adapter name {name!r}: use letters, digits, '_' and '-' (it names a folder and a module)")
    if hasattr(nn.ModuleDict(), name):
        raise ValueError(f"adapter name {name!r} is reserved (an attribute of nn.ModuleDict); choose another")
    return name


def required_state(model: nn.Module, caller: str) -> LoraState:
    state = lora_state(model)
    if state is None:
        raise ValueError(f"{caller}: the model has no adapters (add_adapter, inject_lora or load_adapter first)")
    return state


def required_name(state: LoraState, name: str, caller: str) -> AdapterRecord:
    if name not in state.adapters:
        raise ValueError(f"{caller}: no adapter named {name!r}; the model holds {list(state.adapters)}")
    return state.adapters[name]


def merged_adapter(model: nn.Module) -> str | None:
    """The adapter whose ΔW is folded into the base weights, or None."""
    return next((layer.merged_adapter for layer in lora_layers(model).values() if layer.merged), None)


def refuse_while_merged(model: nn.Module, caller: str) -> None:
    merged = merged_adapter(model)
    if merged is not None:
        raise ValueError(f"{caller}: adapter {merged!r} is merged into the shared base weights, which every other "
                         f"adapter would then run on; unmerge_lora(model) first")


def check_shareable(state: LoraState, name: str, config: LoraConfig, trainable: list[str]) -> None:
    """Refuse, before anything changes, adapters that would change the base every other adapter shares."""
    candidates = [(n, r.config, r.trainable_paths) for n, r in state.adapters.items()] + [(name, config, trainable)]
    for adapter, cfg, paths in candidates:
        shared = [p for p in paths if p != state.head_path]
        if shared or cfg.trainable:
            what = repr(shared[0]) if shared else f"LoraConfig.trainable {cfg.trainable!r}"
            raise ValueError(f"adapter {adapter!r} trains {what} fully, which every adapter on this model shares: "
                             f"with several adapters each may train only its own head")
        if cfg.train_norms:
            raise ValueError(f"adapter {adapter!r} has train_norms=True, but the norms are shared by every adapter")
        if not cfg.freeze_bn_stats:
            raise ValueError(f"adapter {adapter!r} has freeze_bn_stats=False: its training would move the BatchNorm "
                             f"statistics every adapter shares")
        if cfg.init == "pissa":
            raise ValueError(f"adapter {adapter!r} uses init='pissa', which moves part of the shared base weights "
                             f"into the adapter; use another init with several adapters")


def stage_slots(model: nn.Module, specs: list[LayerSpec], name: str) -> Staged:
    """Build adapter ``name``'s slots without touching the model: in the existing wrappers' classes, or in new
    wrappers around modules no adapter adapts yet. Raises ValueError naming the module that does not fit."""
    wrappers, modules = lora_layers(model), base_modules(model)
    staged: Staged = {}
    for spec in specs:
        layer = wrappers.get(spec.path)
        if layer is not None:
            staged[spec.path] = (layer, build_slot(layer, spec, name), False)
            continue
        if spec.path not in modules:
            raise ValueError(f"adapter names module {spec.path!r}, which the model does not have")
        layer = build_layer(modules[spec.path], spec, name)
        staged[spec.path] = (layer, layer.slot(name), True)
    return staged


def commit_adapter(model: nn.Module, state: LoraState, name: str, staged: Staged, record: AdapterRecord) -> None:
    """Put a staged adapter into the model (nothing here can fail on a valid stage)."""
    for path, (layer, slot, new) in staged.items():
        if new:
            layer.active_adapter = state.active
            set_submodule(model, path, layer)
        else:
            layer.add_slot(name, slot)
    state.adapters[name] = record
    sync_heads(model, state)
    freeze_for_lora(model, state)


def sync_heads(model: nn.Module, state: LoraState) -> None:
    """With several heads, register them all in ``model.lora_heads`` (so ``.to()``, ``state_dict`` and optimisers
    see the inactive ones); with one, the model has its own layout."""
    heads = {n: r.head for n, r in state.adapters.items() if r.head is not None}
    if len(heads) > 1:
        setattr(model, HEADS_ATTR, nn.ModuleDict(heads))
    elif HEADS_ATTR in model._modules:
        delattr(model, HEADS_ATTR)


def new_head(model: nn.Module, state: LoraState, num_classes: int | None) -> nn.Module | None:
    """A later adapter's own head: of ``num_classes`` classes, or a copy of the active head (None)."""
    if state.head_path is None:
        if num_classes is not None:
            raise ValueError("num_classes given, but the model has no classifier head (get_classifier()) to size")
        return None
    if num_classes is None:
        return copy.deepcopy(model.get_submodule(state.head_path))
    return sized_head(model, state.head_path, num_classes)


def sized_head(model: nn.Module, head_path: str | None, num_classes: int) -> nn.Module:
    """A new head like the one at ``head_path`` (same input, device and dtype) with ``num_classes`` outputs."""
    if head_path is None:
        raise ValueError("num_classes given, but the model has no classifier head (get_classifier()) to size")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    current = model.get_submodule(head_path)
    if isinstance(current, nn.Linear):
        return nn.Linear(current.in_features, num_classes, bias=current.bias is not None,
                         device=current.weight.device, dtype=current.weight.dtype)
    if isinstance(current, nn.Conv2d) and current.kernel_size == (1, 1) and current.groups == 1:
        return nn.Conv2d(current.in_channels, num_classes, 1, bias=current.bias is not None,
                         device=current.weight.device, dtype=current.weight.dtype)
    raise ValueError(f"the head {head_path!r} is a {type(current).__name__}: num_classes can size Linear and 1x1 "
                     f"Conv2d heads only")


def head_classes(head: nn.Module | None) -> int | None:
    """How many classes a head predicts, when it is a Linear or a Conv2d."""
    if isinstance(head, nn.Linear):
        return head.out_features
    if isinstance(head, nn.Conv2d):
        return head.out_channels
    return None


def checked_labels(label_names: Sequence[str] | None, head: nn.Module | None, name: str) -> list[str] | None:
    if label_names is None:
        return None
    labels = list(label_names)
    if not all(isinstance(label, str) for label in labels):
        raise ValueError(f"adapter {name!r}: label_names must be strings")
    if head is None:
        raise ValueError(f"adapter {name!r}: label_names given, but the model has no classifier head")
    classes = head_classes(head)
    if classes is not None and len(labels) != classes:
        raise ValueError(f"adapter {name!r}: {len(labels)} label_names for a head of {classes} classes")
    return labels


def _module_at(model: nn.Module, path: str | None) -> nn.Module | None:
    return model.get_submodule(path) if path else None

