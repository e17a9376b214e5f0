"""The merged-detector folder: what ``tools/export_merged.py`` and ``tools/pretrain.py`` write for a detector, and
the two ways it is read back (a plain detector, or the start of a few-shot detector on new classes).

A folder holds ``config.json`` (``format_version``, the ``create_detector`` keyword arguments that rebuild the
architecture without weights, ``class_names`` with label ``i + 1`` = ``class_names[i]``, ``category_ids`` (the
dataset's id of each label), ``image_size``, ``dtype``) and ``model.safetensors`` (the plain detector's
``state_dict``, LoRA already merged). Reading needs no LoRA code and unpickles nothing.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .detection import class_predictor_paths, create_detector

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
# What a base detector must share with the detector it initialises (num_classes, sizes and thresholds may differ).
BASE_ARCHITECTURE_FIELDS = ("backbone", "detector", "model_args", "out_indices", "fpn_channels", "anchor_scale")


def write_detector_folder(folder: Path, state: dict[str, torch.Tensor], config: dict, class_names: list[str] | None,
                          image_size: int | None, dtype: str, category_ids: list[int] | None = None) -> None:
    """Write ``model.safetensors`` (``state``, already cast) and ``config.json`` into an existing ``folder``.

    Args:
        config: ``create_detector`` keyword arguments that rebuild the architecture without weights.
        dtype: The name of the precision ``state`` was cast to (``fp32``, ``fp16``, ``bf16``), for the record.
        category_ids: The dataset's category id of each label (label ``i + 1`` is ``category_ids[i]``).
    """
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS_NAME))
    described = {"format_version": FORMAT_VERSION, "dtype": dtype, "class_names": class_names,
                 "category_ids": category_ids, "image_size": image_size, "create_detector": config}
    (folder / CONFIG_NAME).write_text(json.dumps(described, indent=2))


def read_detector_config(folder: Path) -> dict:
    """The ``config.json`` of a merged detector folder, checked for its files and format version."""
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a detector folder: it has no {name}")
    config = json.loads((folder / CONFIG_NAME).read_text())
    if config.get("format_version") != FORMAT_VERSION or "create_detector" not in config:
        raise ValueError(f"{folder / CONFIG_NAME} is not a merged detector config "
                         f"(format_version {FORMAT_VERSION} with create_detector arguments)")
    return config


def load_merged_detector(folder: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """A detector exported by ``tools/export_merged.py``, in eval mode.

    Needs no LoRA code: ``create_detector(**config["create_detector"])`` builds the plain architecture and
    ``load_state_dict(strict=True)`` fills it. ``config.json`` also holds ``class_names`` (label ``i + 1`` is
    ``class_names[i]``) and ``image_size``; feed float ``[3, H, W]`` images in 0..1, as a list.

    Args:
        folder: The exported folder (``config.json`` + ``model.safetensors``).
        dtype: Cast the weights to this dtype; default: as written. torchvision's NMS has no CPU kernel for
            float16/bfloat16, so a half-precision export runs whole on a GPU, or on a CPU after ``torch.float32``.
    """
    folder = Path(folder)
    config = read_detector_config(folder)
    model = create_detector(**dict(config["create_detector"], pretrained=False, pretrained_file=None))
    state = load_file(str(folder / WEIGHTS_NAME))
    written = next(v.dtype for v in state.values() if v.is_floating_point())
    model.to(written).load_state_dict(state, strict=True)
    return model.to(dtype or written).eval()


def load_base_detector(detector: nn.Module, folder: str | Path, architecture: dict) -> list[str]:
    """Initialise ``detector`` from a detector trained on other classes, except its per-class predictors.

    TFA's fine-tuning stage (Wang et al. 2020, "Frustratingly Simple Few-Shot Object Detection", arXiv:2003.06957):
    the backbone, FPN and box head of a detector trained on plentiful *base* classes start the few-shot *novel*
    detector, whose class predictor starts anew (torchvision's initialisation) because its classes are new.

    Args:
        detector: A fresh :func:`~visionlora.models.detection.create_detector` model for the novel classes.
        folder: A merged detector folder.
        architecture: ``detector``'s ``create_detector`` arguments; those in :data:`BASE_ARCHITECTURE_FIELDS`
            must equal the base detector's, or its weights would not fit.

    Returns:
        The state_dict keys left at their fresh initialisation (the class predictor's).
    """
    folder = Path(folder)
    config = read_detector_config(folder)
    # An argument a config leaves out had create_detector's default when that detector was built.
    defaults = {k: v.default for k, v in inspect.signature(create_detector).parameters.items()}
    base, architecture = defaults | config["create_detector"], defaults | architecture
    for field in BASE_ARCHITECTURE_FIELDS:
        if _comparable(base.get(field)) != _comparable(architecture.get(field)):
            raise ValueError(f"base detector {folder}: was built with {field}={base.get(field)!r}, this detector "
                             f"has {field}={architecture.get(field)!r}; set it to the base detector's value")
    state = load_file(str(folder / WEIGHTS_NAME))
    own = detector.state_dict()
    fresh = [k for k in own if any(k.startswith(p + ".") for p in class_predictor_paths(detector))]
    # A base trained with live BatchNorm has counters that the frozen copies here do not keep.
    kept = {k: v.float() for k, v in state.items()
            if k not in fresh and not (k.endswith("num_batches_tracked") and k not in own)}
    missing, unexpected = detector.load_state_dict(kept, strict=False)
    if set(missing) != set(fresh) or unexpected:
        raise ValueError(f"base detector {folder / WEIGHTS_NAME}: its tensors do not fit this detector "
                         f"(missing {sorted(set(missing) - set(fresh))[:3]}, unexpected {unexpected[:3]})")
    return fresh


def _comparable(value):
    """A config value as JSON gives it back: tuples are lists, and no ``model_args`` is the same as empty ones."""
    if value in ({}, None):
        return None
    return list(value) if isinstance(value, tuple) else value
