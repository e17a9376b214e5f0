"""timm backbones from the hub, a local weights file, or a ``local-dir:`` folder (config.json + model.safetensors).

Machines without access to the model hub (CI, many clusters) load weights from disk through timm's own loading, so
the result is exactly what ``timm.create_model(name, pretrained=True)`` would give with those weights.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import timm
import torch
from timm.models._helpers import load_state_dict
from torch import nn

logger = logging.getLogger(__name__)

LOCAL_DIR = "local-dir:"
# What timm's local-dir folders may hold as weights, in the order timm looks for them.
LOCAL_DIR_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_SHOWN_KEYS = 3
_HEADS_SAID: set[tuple[str, int]] = set()


def create_backbone(name: str, num_classes: int, pretrained: bool = False, pretrained_file: str | None = None,
                    model_args: dict | None = None) -> nn.Module:
    """Build a timm model with a fresh ``num_classes``-way head.

    Args:
        name: timm architecture (ignored for the architecture when ``pretrained_file`` is a ``local-dir:`` folder,
            whose config.json names it).
        num_classes: Classifier outputs; a pretrained head of another size is dropped and re-initialised.
        pretrained: Load timm's pretrained weights from the hub.
        pretrained_file: A local ``.safetensors``/``.pth`` weights file for ``name``, or ``local-dir:<folder>``
            (a bare folder path works too) holding timm's ``config.json`` + ``model.safetensors``. Paths are
            relative to the working directory.
        model_args: Extra keyword arguments for ``timm.create_model`` (e.g. ``img_size``, ``drop_path_rate``).
    """
    model_args = dict(model_args or {})
    if not pretrained_file:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **model_args)
    path = Path(pretrained_file.removeprefix(LOCAL_DIR))
    if not path.exists():
        raise FileNotFoundError(f"pretrained_file not found: {path}")
    weights = local_dir_weights(path, name) if path.is_dir() else path
    state = read_weights(weights)
    features_only = bool(model_args.get("features_only"))
    try:
        if path.is_dir():
            model = timm.create_model(f"{LOCAL_DIR}{path}", pretrained=True, num_classes=num_classes, **model_args)
        else:
            # timm drops a file's head unless its pretrained config's class count is the file's: give it when it fits.
            fits = _head_size(name, state) == num_classes
            overlay = dict(file=str(path)) | ({"num_classes": num_classes} if fits else {})
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes,
                                      **model_args)
    except RuntimeError:  # timm's strict load_state_dict: say which tensors, of which file, do not fit
        reference = timm.create_model(name, pretrained=False, num_classes=num_classes, **model_args)
        check_weights_fit(reference, state, weights, name, features_only)
        raise
    check_weights_fit(model, state, weights, name, features_only)
    return model


def resolve_backbone(backbone: str, pretrained_file: str | None, model_args: dict | None) -> tuple[str, dict]:
    """The architecture and ``model_args`` that rebuild the backbone without its weights.

    A ``local-dir:`` folder's config.json names the architecture and its constructor arguments (a small ViT's depth,
    width, patch size); without them a fresh model would have another shape. Explicit ``model_args`` win.
    """
    folder = Path(pretrained_file.removeprefix(LOCAL_DIR)) if pretrained_file else None
    if folder is None or not (folder / "config.json").is_file():
        return backbone, dict(model_args or {})
    config = json.loads((folder / "config.json").read_text())
    # The classifier size is not part of a features model (and create_backbone passes its own).
    stored = {k: v for k, v in config.get("model_args", {}).items() if k != "num_classes"}
    return config.get("architecture", backbone), stored | dict(model_args or {})


def pretrained_weights_file(pretrained_file: str, name: str) -> Path:
    """The weights file a ``pretrained_file`` names: the file itself, or a ``local-dir:`` folder's (checked)."""
    path = Path(pretrained_file.removeprefix(LOCAL_DIR))
    if not path.exists():
        raise FileNotFoundError(f"pretrained_file not found: {path}")
    return local_dir_weights(path, name) if path.is_dir() else path


def local_dir_weights(folder: Path, name: str) -> Path:
    """The weights file of a timm local-dir folder, after checking that its config names architecture ``name``."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"pretrained_file folder {folder} has no config.json (timm local-dir format)")
    architecture = json.loads(config_file.read_text()).get("architecture")
    if architecture != name:
        raise ValueError(f"pretrained_file {folder}: its config.json is for architecture {architecture!r}, but the "
                         f"backbone is {name!r}; set the backbone to {architecture!r} or use weights for {name!r}")
    for file_name in LOCAL_DIR_WEIGHTS:
        if (folder / file_name).is_file():
            return folder / file_name
    raise FileNotFoundError(f"pretrained_file folder {folder} has none of {', '.join(LOCAL_DIR_WEIGHTS)}")


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    """A weights file as timm reads it (safetensors, or ``torch.load(weights_only=True)``); errors name the file."""
    try:
        return load_state_dict(str(file), weights_only=True)
    except Exception as error:  # noqa: BLE001 - safetensors, pickle and zip readers each raise their own types
        raise ValueError(f"pretrained_file {file}: not a readable weights file ({type(error).__name__}: "
                         f"{error})") from None


def check_weights_fit(model: nn.Module, state: dict[str, torch.Tensor], file: Path, name: str,
                      features_only: bool = False) -> None:
    """Raise unless ``state`` holds every backbone tensor of ``model`` in its shape; the head alone may differ.

    timm loads a checkpoint with ``strict=False`` as soon as the head is resized, so without this check a file of
    another architecture leaves the whole backbone at random initialisation after a single logged warning. The
    family's own checkpoint filter (what timm applies to such files, e.g. a ViT's position-embedding resize) is
    applied first. A ``features_only`` model keeps only some of the layers, so unused tensors are not an error.
    """
    state = _filtered_like_timm(model, state)
    heads = tuple(_classifier_names(model))
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    is_head = lambda key: key.startswith(tuple(f"{h}." for h in heads))  # noqa: E731
    missing = [k for k in own if k not in state and not is_head(k)]
    unexpected = [] if features_only else [k for k in state if k not in own and not is_head(k)
                                           and not k.endswith("num_batches_tracked")]
    reshaped = [k for k in own if k in state and not is_head(k) and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or reshaped:
        problems = []
        if missing:
            problems.append(f"missing {_first(missing)}")
        if unexpected:
            problems.append(f"unexpected {_first(unexpected)}")
        if reshaped:
            key = reshaped[0]
            problems.append(f"shape of {key}: file {list(state[key].shape)}, model {list(own[key].shape)}")
        raise ValueError(f"pretrained_file {file} does not fit architecture {name!r}: {'; '.join(problems)}")
    head_keys = [k for k in own if is_head(k) and k.endswith("weight")]
    changed = [k for k in head_keys if k not in state or tuple(state[k].shape) != tuple(own[k].shape)]
    if changed and (str(file), own[changed[0]].shape[0]) not in _HEADS_SAID:
        key = changed[0]
        _HEADS_SAID.add((str(file), own[key].shape[0]))  # once per file and head size, not once per model built
        had = f"{state[key].shape[0]} classes" if key in state else "no head"
        logger.info("pretrained_file %s: head %r not loaded (the file has %s; a new %d-class head is initialised)",
                    file, key.rpartition(".")[0], had, own[key].shape[0])


def _head_size(name: str, state: dict) -> int | None:
    """The class count of the classifier of architecture ``name`` in ``state``; None when it has none."""
    classifier = getattr(timm.models.get_pretrained_cfg(name), "classifier", None) if timm.is_model(name) else None
    weight = state.get(f"{classifier}.weight") if isinstance(classifier, str) else None
    return int(weight.shape[0]) if weight is not None else None


def _filtered_like_timm(model: nn.Module, state: dict) -> dict:
    """``state`` through the model family's ``checkpoint_filter_fn`` when it has one (timm applies it on load)."""
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        return filter_fn(dict(state), model)
    except Exception:  # noqa: BLE001 - a filter for this family that chokes on the file: compare it as stored
        return state


def _classifier_names(model: nn.Module) -> list[str]:
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ("head", "fc", "classifier")
    return [classifier] if isinstance(classifier, str) else list(classifier)


def _first(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else ""
    return ", ".join(keys[:_SHOWN_KEYS]) + more


def save_backbone(model: nn.Module, directory: str | Path, data_config: dict | None = None,
                  label_names: list[str] | None = None, model_args: dict | None = None) -> Path:
    """Write ``model`` as a timm ``local-dir`` folder (config.json + model.safetensors) loadable without visionlora.

    Args:
        data_config: Preprocessing to record (``input_size``, ``mean``, ``std``, ``crop_pct``, ...).
        label_names: Class names, stored as timm's ``label_names``.
        model_args: Constructor arguments timm cannot infer from the model.
    """
    from timm.models._hub import save_for_hf  # timm's own writer of the local-dir / hub layout

    directory = Path(directory)
    model_config = {"label_names": list(label_names)} if label_names else {}
    # These describe the source checkpoint timm started from, not the weights being written.
    model_config["pretrained_cfg"] = {"tag": None, "license": None, "hf_hub_id": None}
    save_for_hf(model, str(directory), model_config=model_config, model_args=model_args, safe_serialization=True,
                data_config=data_config)
    return directory
