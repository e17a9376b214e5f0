"""Save and load adapters in Hugging Face PEFT's LoRA layout (``adapter_config.json`` + ``adapter_model.safetensors``).

Files are read with safetensors only: nothing is unpickled or executed. Our own structure (q/k/v slices, conv
groups, per-layer scale) rides along in the safetensors metadata under ``visionlora``, so our adapters reload
exactly, while PEFT reads the same files as plain LoRA (``PeftModel.from_pretrained(timm_model, directory)``).
Loading validates every name and shape before touching the model: a bad adapter leaves the model unchanged.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from visionlora.files import atomic_write

from .adapter_files import (
    CONFIG_NAME,
    FORMAT_VERSION,
    PREFIX,
    WEIGHTS_NAME,
    pattern_value,
    read_adapter_config,
    read_adapter_weights,
)
from .adapters import (
    check_adapter_name,
    check_shareable,
    checked_labels,
    commit_adapter,
    head_classes,
    new_head,
    refuse_while_merged,
    required_name,
    sized_head,
    stage_slots,
)
from .config import LoraConfig
from .frozen_a import share_frozen_factors
from .inject import (
    AdapterRecord,
    LoraState,
    attach,
    build_layers,
    frozen_A_adapters,
    lora_layers,
    lora_state,
    trained_module,
)
from .layer import DEFAULT_ADAPTER, LoraLayer
from .peft_layout import from_peft, peft_rank, to_peft
from .targets import LayerSpec, base_modules, find_head_path, outermost


def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> Path:
    """Write the LoRA tensors and fully trained modules (e.g. the head) of ``model``'s adapters to ``directory``.

    Each adapter gets PEFT's layout. As PEFT's ``save_pretrained`` does, the adapter named ``default`` is written
    to ``directory`` itself and every other adapter ``n`` to ``directory/n``, so
    ``PeftModel.from_pretrained(model, directory / n, adapter_name=n)`` reads it.

    Args:
        model: A model with LoRA.
        directory: The folder (created if needed).
        name: Save this adapter alone (at the same place); None saves every adapter.

    Returns:
        The directory. Each file is written to a temporary name and renamed, so readers never see a partial file.
    """
    state = lora_state(model)
    layers = lora_layers(model)
    if state is None or not layers:
        raise ValueError("save_adapter: the model has no LoRA layers (call inject_lora first)")
    names = list(state.adapters) if name is None else [name]
    for adapter in names:
        required_name(state, adapter, "save_adapter")
    directory = Path(directory)
    for adapter in names:
        _save_one(model, state, adapter, layers, adapter_directory(directory, adapter))
    return directory


def adapter_directory(directory: Path, name: str) -> Path:
    """Where adapter ``name`` of a folder written by :func:`save_adapter` lives (PEFT's rule)."""
    return directory if name == DEFAULT_ADAPTER else directory / name


def _save_one(model: nn.Module, state: LoraState, name: str, layers: dict[str, LoraLayer], directory: Path) -> None:
    record = state.adapters[name]
    held = {path: layer for path, layer in layers.items() if layer.slot_or_none(name) is not None}
    tensors, ranks, alphas = {}, {}, {}
    for path, layer in held.items():
        layer_tensors = to_peft(layer, name)
        tensors.update({f"{PREFIX}{path}.{key}": t for key, t in layer_tensors.items()})
        ranks[path] = peft_rank(layer_tensors)
        alphas[path] = layer.slot(name).scale * ranks[path]
    for path in record.trainable_paths:
        for key, param in trained_module(model, state, record, path).named_parameters():
            tensors[f"{PREFIX}{path}.{key}"] = param.detach()
    metadata = {"format": "pt", "visionlora": json.dumps(_own_metadata(record, held, name))}
    directory.mkdir(parents=True, exist_ok=True)
    peft_config = _peft_config(model, record, ranks, alphas)
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(_contiguous(tensors), p, metadata=metadata))
    atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(peft_config, indent=2)))


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` or by PEFT (for the same architecture) into ``model``.

    A model without LoRA gets LoRA layers built from the adapter; as the ``default`` adapter it keeps the model's
    own head, which must fit the saved one, while a named adapter brings a head of its saved size. A model that
    holds an adapter ``name`` gets its tensors replaced (the same layers are required). A model with other
    adapters gets ``name`` added, inactive, with a head of the saved size. ``directory`` is the adapter's folder,
    or a folder :func:`save_adapter` wrote several adapters to (then ``directory/name`` is read when it exists).
    Every tensor is checked before anything is changed; on error the model and all its adapters are as they were.
    """
    check_adapter_name(name)
    directory = Path(directory)
    if name != DEFAULT_ADAPTER and (directory / name / CONFIG_NAME).is_file():
        directory = directory / name
    peft_config = read_adapter_config(directory / CONFIG_NAME)
    tensors, metadata = read_adapter_weights(directory / WEIGHTS_NAME)
    own = json.loads(metadata["visionlora"]) if metadata and "visionlora" in metadata else None
    specs = _own_specs(own) if own else _peft_specs(model, peft_config, tensors)
    _check_target_modules(peft_config.get("target_modules"), [spec.path for spec in specs], exact=own is not None,
                          config_file=directory / CONFIG_NAME)
    trainable = own["trainable_paths"] if own else _resolve_modules_to_save(model, peft_config)
    config = LoraConfig(**own["config"]) if own else _config_from_peft(peft_config, specs)
    labels = (own.get("head") or {}).get("label_names") if own else None
    state = lora_state(model)
    if state is not None and name not in state.adapters:
        _load_new_adapter(model, state, name, specs, config, trainable, tensors, own, directory)
        return model
    existing = lora_layers(model)
    if state is not None:
        existing = {path: layer for path, layer in existing.items() if layer.slot_or_none(name) is not None}
    layers = existing or build_layers(model, specs, name)
    if not existing:
        for layer in layers.values():
            layer.initialize("default")
    # LoRA layers without a state (built by hand): their active slot.
    key = None if existing and state is None else name
    slots = {path: (layer, layer.slot(key)) for path, layer in layers.items()}
    trained = _trained_modules(model, state, name, trainable, directory / WEIGHTS_NAME)
    head = _own_sized_head(model, name, trainable, tensors, own) if not existing else None
    if head is not None:
        trained[find_head_path(model)] = head
    updates = _plan_updates(slots, trained, tensors, directory / WEIGHTS_NAME)
    with torch.no_grad():
        for target, value in updates:
            target.copy_(value)
    if not existing:
        attach(model, layers, config, specs, trainable=trainable, name=name, head=head,
               label_names=checked_labels(labels, head or model.get_classifier(), name) if labels else None)
    elif state is not None and labels is not None:
        state.adapters[name].label_names = labels
    return model


def _own_sized_head(model: nn.Module, name: str, trainable: list[str], tensors: dict, own: dict | None
                    ) -> nn.Module | None:
    """The first adapter of a model keeps the model's head, which must fit, unless it is a named adapter (not
    ``default``) whose saved head has another size: that one brings a head of its own size."""
    if name == DEFAULT_ADAPTER:
        return None
    head = _saved_head(model, find_head_path(model), trainable, tensors, own)
    current = model.get_classifier() if head is not None else None
    return head if head is not None and head_classes(head) != head_classes(current) else None


def _load_new_adapter(model: nn.Module, state: LoraState, name: str, specs: list[LayerSpec], config: LoraConfig,
                      trainable: list[str], tensors: dict, own: dict | None, directory: Path) -> None:
    """Add adapter ``name`` from files to a model that holds others: everything is built and checked on new
    slots and a new head first, so an adapter that does not fit changes nothing."""
    file = directory / WEIGHTS_NAME
    refuse_while_merged(model, "load_adapter")
    try:
        staged = stage_slots(model, specs, name)
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from None
    _trained_modules(model, None, name, trainable, file)  # every trained module exists
    check_shareable(state, name, config, trainable)
    head = _saved_head(model, state.head_path, trainable, tensors, own) or new_head(model, state, None)
    slots = {path: (layer, slot) for path, (layer, slot, _) in staged.items()}
    for layer, slot in slots.values():
        layer.initialize("default", slot)
    trained = {state.head_path: head} if head is not None and state.head_path in trainable else {}
    updates = _plan_updates(slots, trained, tensors, file)
    with torch.no_grad():
        for target, value in updates:
            target.copy_(value)
    if config.freeze_A:
        frozen = frozen_A_adapters(state)
        for layer, slot in slots.values():
            share_frozen_factors(layer, slot, frozen)
    labels = (own.get("head") or {}).get("label_names") if own else None
    record = AdapterRecord(config=config, specs=specs, trainable_paths=trainable, head=head,
                           label_names=checked_labels(labels, head, name))
    commit_adapter(model, state, name, staged, record)


def _saved_head(model: nn.Module, head_path: str | None, trainable: list[str], tensors: dict, own: dict | None
                ) -> nn.Module | None:
    """A new head of the saved number of classes for a loaded adapter, or None when the adapter does not train
    the head or its size cannot be told."""
    if head_path is None or head_path not in trainable:
        return None
    classes = (own.get("head") or {}).get("num_classes") if own else None
    weight = tensors.get(f"{PREFIX}{head_path}.weight")
    if classes is None and weight is not None:
        classes = weight.shape[0]
    if classes is None or not isinstance(model.get_submodule(head_path), nn.Linear | nn.Conv2d):
        return None
    return sized_head(model, head_path, int(classes))


def _trained_modules(model: nn.Module, state: LoraState | None, name: str, trainable: list[str], file: Path
                     ) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    found = {}
    for path in trainable:
        if path not in modules:
            raise ValueError(f"{file}: adapter trains module {path!r}, which the model does not have")
        record = state.adapters.get(name) if state is not None else None
        found[path] = trained_module(model, state, record, path) if record is not None else modules[path]
    return found


def _check_target_modules(targets, adapted: list[str], exact: bool, config_file: Path) -> None:
    """Refuse an adapter whose ``target_modules`` do not describe the modules its tensors adapt.

    Our own adapters list every adapted path, so the two sets must be equal. PEFT lists module names (a path or a
    dotted suffix of one) or one regex matched against whole paths; every adapted path must be one it names (an
    entry matching no module is PEFT's business: its injection skips or refuses those).
    """
    if targets is None:
        return
    if isinstance(targets, str):
        uncovered = [path for path in adapted if not re.fullmatch(targets, path)]
    else:
        uncovered = [path for path in adapted if not any(path == t or path.endswith("." + t) for t in targets)]
    if uncovered:
        raise ValueError(f"{config_file}: target_modules {targets!r} do not name {uncovered[0]!r}, whose LoRA tensors "
                         f"are in {WEIGHTS_NAME}; the config and the weights disagree")
    unused = sorted(set(targets) - set(adapted)) if exact and not isinstance(targets, str) else []
    if unused:
        raise ValueError(f"{config_file}: target_modules lists {unused[0]!r}, but {WEIGHTS_NAME} holds no LoRA "
                         f"tensors for it; the config and the weights disagree")


def _plan_updates(slots: dict[str, tuple[LoraLayer, nn.Module]], trained: dict[str, nn.Module], tensors: dict,
                  file: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pair every destination tensor (of one adapter's slots and trained modules) with its source; raise naming
    the first missing or mismatching tensor."""
    updates, used = [], set()
    for path, (layer, slot) in slots.items():
        expected = to_peft(layer, slot)
        given = {}
        for name, reference in expected.items():
            key = f"{PREFIX}{path}.{name}"
            given[name] = _checked(tensors, key, tuple(reference.shape), file)
            used.add(key)
        try:
            own = from_peft(layer, given, slot)
        except ValueError as err:
            raise ValueError(f"{file}: {path}: {err}") from None
        updates += [(slot.get_parameter(name), value) for name, value in own.items()]
    for path, module in trained.items():
        for name, param in module.named_parameters():
            key = f"{PREFIX}{path}.{name}"
            updates.append((param, _checked(tensors, key, tuple(param.shape), file)))
            used.add(key)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{file}: tensor {unused[0]} does not belong to any adapted or trained module of this model")
    return updates


def _checked(tensors: dict, key: str, shape: tuple, file: Path) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"{file}: missing tensor {key} (expected shape {list(shape)})")
    if tuple(tensors[key].shape) != shape:
        raise ValueError(f"{file}: tensor {key} has shape {list(tensors[key].shape)}, the model needs {list(shape)}")
    return tensors[key]


def _own_metadata(record: AdapterRecord, layers: dict[str, LoraLayer], name: str) -> dict:
    specs = {spec.path: spec for spec in record.specs}
    saved = []
    for path, layer in layers.items():
        spec = LayerSpec(**specs[path].to_dict())
        if layer.pissa_initial_factors(name) is not None:
            spec.rank *= 2  # written as a plain rank-2r LoRA against the original weight
        saved.append(spec.to_dict())
    config = asdict(record.config)
    config["init"] = "default"
    own = {"version": FORMAT_VERSION, "layers": saved, "trainable_paths": record.trainable_paths, "config": config,
           "adapter_name": name}
    if record.head is not None:
        own["head"] = {"num_classes": head_classes(record.head), "label_names": record.label_names}
    return own


def _own_specs(own: dict) -> list[LayerSpec]:
    names = {f.name for f in fields(LayerSpec)}
    return [LayerSpec(**{k: v for k, v in layer.items() if k in names}) for layer in own["layers"]]


def _peft_config(model, record: AdapterRecord, ranks: dict, alphas: dict) -> dict:
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    architecture = getattr(model, "pretrained_cfg", {}).get("architecture")
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": architecture,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": list(ranks),
        "rank_pattern": {re.escape(p): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(p): v for p, v in alphas.items() if v != alpha},
        "lora_dropout": record.config.dropout,
        "use_rslora": False,  # alpha is written per layer so that alpha / r is our exact scale
        "use_dora": record.config.use_dora,
        "modules_to_save": list(record.trainable_paths) or None,
        "init_lora_weights": True,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def _peft_specs(model: nn.Module, config: dict, tensors: dict) -> list[LayerSpec]:
    """Specs for an adapter written by PEFT: one plain LoRA per module that has a lora_A."""
    modules = base_modules(model)
    specs = []
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[len(PREFIX) : -len(".lora_A.weight")]
        module = modules.get(path)
        if not isinstance(module, nn.Linear | nn.Conv2d):
            found = type(module).__name__ if module is not None else "nothing"
            raise ValueError(f"adapter targets {path!r}, which is {found} in this model, not a Linear or Conv2d")
        rank = tensors[key].shape[0] // (module.groups if isinstance(module, nn.Conv2d) else 1)
        peft_r = tensors[key].shape[0]
        alpha = pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
        scale = alpha / peft_r**0.5 if config.get("use_rslora") else alpha / peft_r
        kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
        dora = f"{PREFIX}{path}.lora_magnitude_vector" in tensors
        specs.append(LayerSpec(path=path, kind=kind, rank=rank, scale=scale, use_dora=dora))
    if not specs:
        raise ValueError("adapter holds no lora_A tensors")
    return specs


def _resolve_modules_to_save(model: nn.Module, config: dict) -> list[str]:
    names = config.get("modules_to_save") or []
    paths = [p for p, _ in model.named_modules() if p and any(p == n or p.endswith("." + n) for n in names)]
    return outermost(paths)


def _config_from_peft(config: dict, specs: list[LayerSpec]) -> LoraConfig:
    """The LoraConfig that reproduces a PEFT adapter's layers (qkv treated as one matrix, as PEFT does)."""
    return LoraConfig(r=int(config.get("r", 8)), alpha=float(config.get("lora_alpha", 8)),
                      targets=[re.escape(spec.path) for spec in specs], use_dora=bool(config.get("use_dora", False)),
                      use_rslora=bool(config.get("use_rslora", False)), split_qkv=False, train_head=False)


def _contiguous(tensors: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
