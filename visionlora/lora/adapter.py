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
from .config import LoraConfig
from .inject import attach, build_layers, lora_layers, lora_state
from .peft_layout import from_peft, peft_rank, to_peft
from .targets import LayerSpec, outermost


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the LoRA tensors and fully trained modules (e.g. the head) of ``model`` to ``directory``.

    Returns:
        The directory. Each file is written to a temporary name and renamed, so readers never see a partial file.
    """
    state = lora_state(model)
    layers = lora_layers(model)
    if state is None or not layers:
        raise ValueError("save_adapter: the model has no LoRA layers (call inject_lora first)")
    tensors, ranks, alphas = {}, {}, {}
    for path, layer in layers.items():
        layer_tensors = to_peft(layer)
        tensors.update({f"{PREFIX}{path}.{name}": t for name, t in layer_tensors.items()})
        ranks[path] = peft_rank(layer_tensors)
        alphas[path] = layer.scale * ranks[path]
    modules = dict(model.named_modules())
    for path in state.trainable_paths:
        for name, param in modules[path].named_parameters():
            tensors[f"{PREFIX}{path}.{name}"] = param.detach()
    metadata = {"format": "pt", "visionlora": json.dumps(_own_metadata(state, layers))}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft_config = _peft_config(model, state, ranks, alphas)
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(_contiguous(tensors), p, metadata=metadata))
    atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(peft_config, indent=2)))
    return directory


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` or by PEFT (for the same architecture) into ``model``.

    A model without LoRA gets LoRA layers built from the adapter; a model with LoRA must have the same layers.
    Every tensor is checked before anything is changed; on error the model is exactly as it was.
    """
    directory = Path(directory)
    peft_config = read_adapter_config(directory / CONFIG_NAME)
    tensors, metadata = read_adapter_weights(directory / WEIGHTS_NAME)
    own = json.loads(metadata["visionlora"]) if metadata and "visionlora" in metadata else None
    specs = _own_specs(own) if own else _peft_specs(model, peft_config, tensors)
    _check_target_modules(peft_config.get("target_modules"), [spec.path for spec in specs], exact=own is not None,
                          config_file=directory / CONFIG_NAME)
    existing = lora_layers(model)
    layers = existing or build_layers(model, specs)
    if not existing:
        for layer in layers.values():
            layer.initialize("default")
    trainable = own["trainable_paths"] if own else _resolve_modules_to_save(model, peft_config)
    updates = _plan_updates(model, layers, trainable, tensors, directory / WEIGHTS_NAME)
    with torch.no_grad():
        for target, value in updates:
            target.copy_(value)
    if not existing:
        config = LoraConfig(**own["config"]) if own else _config_from_peft(peft_config, specs)
        attach(model, layers, config, specs, trainable=trainable)
    return model


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


def _plan_updates(model, layers, trainable, tensors, file) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pair every destination tensor with its source; raise naming the first missing or mismatching tensor."""
    updates, used = [], set()
    for path, layer in layers.items():
        expected = to_peft(layer)
        given = {}
        for name, reference in expected.items():
            key = f"{PREFIX}{path}.{name}"
            given[name] = _checked(tensors, key, tuple(reference.shape), file)
            used.add(key)
        try:
            own = from_peft(layer, given)
        except ValueError as err:
            raise ValueError(f"{file}: {path}: {err}") from None
        updates += [(layer.get_parameter(name), value) for name, value in own.items()]
    modules = dict(model.named_modules())
    for path in trainable:
        if path not in modules:
            raise ValueError(f"{file}: adapter trains module {path!r}, which the model does not have")
        for name, param in modules[path].named_parameters():
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


def _own_metadata(state, layers) -> dict:
    specs = {spec.path: spec for spec in state.specs}
    saved = []
    for path, layer in layers.items():
        spec = LayerSpec(**specs[path].to_dict())
        if layer.pissa_initial_factors() is not None:
            spec.rank *= 2  # written as a plain rank-2r LoRA against the original weight
        saved.append(spec.to_dict())
    config = asdict(state.config)
    config["init"] = "default"
    return {"version": FORMAT_VERSION, "layers": saved, "trainable_paths": state.trainable_paths, "config": config}


def _own_specs(own: dict) -> list[LayerSpec]:
    names = {f.name for f in fields(LayerSpec)}
    return [LayerSpec(**{k: v for k, v in layer.items() if k in names}) for layer in own["layers"]]


def _peft_config(model, state, ranks: dict, alphas: dict) -> dict:
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
        "lora_dropout": state.config.dropout,
        "use_rslora": False,  # alpha is written per layer so that alpha / r is our exact scale
        "use_dora": state.config.use_dora,
        "modules_to_save": list(state.trainable_paths) or None,
        "init_lora_weights": True,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def _peft_specs(model: nn.Module, config: dict, tensors: dict) -> list[LayerSpec]:
    """Specs for an adapter written by PEFT: one plain LoRA per module that has a lora_A."""
    modules = dict(model.named_modules())
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
