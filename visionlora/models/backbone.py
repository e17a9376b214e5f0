"""timm backbones from the hub, a local weights file, or a ``local-dir:`` folder (config.json + model.safetensors).

Machines without access to the model hub (CI, many clusters) load weights from disk through timm's own loading, so
the result is exactly what ``timm.create_model(name, pretrained=True)`` would give with those weights.
"""

from __future__ import annotations

from pathlib import Path

import timm
from torch import nn

LOCAL_DIR = "local-dir:"


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
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"pretrained_file folder {path} has no config.json (timm local-dir format)")
        return timm.create_model(f"{LOCAL_DIR}{path}", pretrained=True, num_classes=num_classes, **model_args)
    overlay = dict(file=str(path))
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes,
                             **model_args)


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
