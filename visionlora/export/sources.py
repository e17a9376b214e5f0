"""What to export: an adapted (LoRA, unmerged) classifier rebuilt from a run directory, a Lightning checkpoint, or a
base timm model plus an adapter folder, together with its preprocessing, label names and real sample images.

Checkpoints are read with ``torch.load(weights_only=True)`` and adapters with safetensors: nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from visionlora.lora import LoraConfig, load_adapter
from visionlora.lora.adapter_files import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from visionlora.lora.targets import find_head_path
from visionlora.models import create_backbone
from visionlora.models.backbone import LOCAL_DIR

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
PREPROCESSING_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


class ExportError(ValueError):
    """Bad input to an export (missing file, wrong architecture, mismatching classes): nothing was written."""


@dataclass
class ExportSource:
    """An adapted model ready to merge, and what a deployed copy needs to know about its inputs and outputs.

    Attributes:
        model: The timm model with LoRA still unmerged (the reference the export is verified against), in eval mode.
        architecture: timm architecture name.
        model_args: Constructor arguments besides ``num_classes`` (e.g. ``img_size``).
        data_config: ``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode`` for timm's
            pretrained_cfg: from a run, the fields its evaluation transform was built from
            (:func:`visionlora.data.classification.presets.timm_data_config`), so timm alone preprocesses the same.
        label_names: Class names in label order, when known.
        sample_images: Real images ``[B, 3, H, W]`` to verify on, when the data is at hand, through the run's
            evaluation transform (timm's, of ``data_config``).
        description: Where the model came from, for messages and the export report.
    """

    model: nn.Module
    architecture: str
    model_args: dict = field(default_factory=dict)
    data_config: dict = field(default_factory=dict)
    label_names: list[str] | None = None
    sample_images: torch.Tensor | None = None
    description: str = ""

    @property
    def num_classes(self) -> int:
        return self.model.num_classes


def source_from_path(path: str | Path, num_classes: int | None = None, sample_size: int = 8) -> ExportSource:
    """A run directory (``runs/<name>/<time>/``, its newest checkpoint) or a Lightning ``.ckpt`` file.

    Args:
        num_classes: When given, the checkpoint must have this many classes (guards against exporting the wrong run).
        sample_size: How many real test images to take from the run's data for verification.
    """
    checkpoint = find_checkpoint(Path(path))
    saved = read_checkpoint(checkpoint)
    hparams = {k: v for k, v in saved["hyper_parameters"].items() if not k.startswith("_")}
    if "detector" in hparams:
        raise ExportError(f"{checkpoint}: a detector's checkpoint; export it with detector_source_from_path")
    if num_classes is not None and hparams.get("num_classes") != num_classes:
        raise ExportError(f"{checkpoint}: checkpoint has num_classes={hparams.get('num_classes')}, "
                          f"but {num_classes} were asked for")
    module = _classifier_from_hparams(hparams, checkpoint)
    _load_trained_tensors(module, saved["state_dict"], checkpoint)
    model = module.model.eval()
    names, images, data_config = classifier_run_data(saved.get("datamodule_hyper_parameters"), model, sample_size)
    return ExportSource(model, _architecture(model, hparams["backbone"]), dict(hparams.get("model_args") or {}),
                        data_config, names,
                        images, description=str(checkpoint))


def source_from_adapter(adapter_dir: str | Path, base: str, pretrained_file: str | None = None,
                        pretrained: bool = False, num_classes: int | None = None,
                        model_args: dict | None = None) -> ExportSource:
    """A base timm model (hub, weights file or ``local-dir:``) with an adapter folder loaded into it.

    ``num_classes`` defaults to the size of the head saved in the adapter.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / WEIGHTS_NAME).is_file():
        raise ExportError(f"adapter folder {adapter_dir} has no {WEIGHTS_NAME}")
    try:
        probe = create_backbone(base, 1, False, None, model_args)
    except RuntimeError as error:  # timm's "Unknown model"
        raise ExportError(f"--base {base!r}: {error}") from error
    saved_classes = _adapter_head_classes(adapter_dir, find_head_path(probe))
    if num_classes is not None and saved_classes is not None and saved_classes != num_classes:
        raise ExportError(f"{adapter_dir}: the adapter's head has {saved_classes} classes, "
                          f"but num_classes={num_classes} was asked for")
    classes = num_classes or saved_classes
    if classes is None:
        saved_base = _read_json_field(adapter_dir / CONFIG_NAME, "base_model_name_or_path")
        raise ExportError(f"{adapter_dir}: no weights for {base}'s head {find_head_path(probe)!r} in the adapter "
                          f"(saved from {saved_base}); check --base, or pass num_classes")
    try:
        model = create_backbone(base, classes, pretrained, pretrained_file, model_args)
    except FileNotFoundError as error:
        raise ExportError(str(error)) from error
    try:
        load_adapter(model, adapter_dir)
    except (ValueError, KeyError, FileNotFoundError) as error:
        raise ExportError(f"adapter {adapter_dir} does not fit {base}: {error}") from error
    data_config = _preprocessing(timm.data.resolve_model_data_config(model))
    return ExportSource(model.eval(), _architecture(model, base), dict(model_args or {}), data_config,
                        description=f"{base} + adapter {adapter_dir}")


def find_checkpoint(path: Path) -> Path:
    """The checkpoint file itself, or a run directory's ``checkpoints/last.ckpt`` (else its newest ``.ckpt``)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise ExportError(f"no run directory or checkpoint file at {path}")
    folder = path / CHECKPOINT_DIR
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    candidates = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ExportError(f"run directory {path} has no {CHECKPOINT_DIR}/*.ckpt")
    return candidates[-1]


def read_checkpoint(checkpoint: Path) -> dict:
    """A Lightning checkpoint of a ``LoraClassifier`` or ``LoraDetector``, read without unpickling code."""
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or non-checkpoint files
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ExportError(f"{checkpoint}: not a readable checkpoint ({type(error).__name__}: {first_line})") from error
    if not isinstance(saved, dict) or "state_dict" not in saved or "backbone" not in saved.get("hyper_parameters", {}):
        raise ExportError(f"{checkpoint}: not a visionlora checkpoint (no state_dict / backbone hparams)")
    from visionlora.tasks.checkpoints import DATA_PATH_FIELDS, MODULE_PATH_FIELDS, WORKING_DIRECTORY_KEY

    workdir = saved.get(WORKING_DIRECTORY_KEY)
    if workdir:
        saved["hyper_parameters"] = resolve_paths(saved["hyper_parameters"], MODULE_PATH_FIELDS, Path(workdir))
        if saved.get("datamodule_hyper_parameters"):
            saved["datamodule_hyper_parameters"] = resolve_paths(saved["datamodule_hyper_parameters"],
                                                                 DATA_PATH_FIELDS, Path(workdir))
    return saved


def resolve_paths(hparams: dict, fields: tuple[str, ...], workdir: Path) -> dict:
    """``hparams`` with each relative path of ``fields`` made absolute against ``workdir`` (where the run started)."""
    resolved = dict(hparams)
    for name in fields:
        value = resolved.get(name)
        if not isinstance(value, str) or not value:
            continue
        prefix = LOCAL_DIR if value.startswith(LOCAL_DIR) else ""
        path = Path(value.removeprefix(prefix))
        if not path.is_absolute():
            resolved[name] = prefix + str(workdir / path)
    return resolved


def _classifier_from_hparams(hparams: dict, checkpoint: Path):
    from visionlora.tasks import LoraClassifier  # Lightning is only needed for checkpoints

    return module_from_hparams(LoraClassifier, hparams, checkpoint)


def module_from_hparams(module_class, hparams: dict, checkpoint: Path):
    """``module_class(**hparams)`` with the LoRA config rebuilt from its saved dict; a failure names the checkpoint."""
    lora = hparams.pop("lora", None)
    try:
        return module_class(**hparams, lora=LoraConfig(**lora) if lora else None)
    except (FileNotFoundError, TypeError, ValueError, RuntimeError) as error:
        raise ExportError(f"{checkpoint}: cannot rebuild its {module_class.__name__} ({error})") from error


def _load_trained_tensors(module: nn.Module, state_dict: dict, checkpoint: Path) -> None:
    """Check every saved tensor's name and shape first, so a mismatch names the tensor instead of half-loading."""
    own = module.state_dict()
    for name, tensor in state_dict.items():
        if name not in own:
            raise ExportError(f"{checkpoint}: tensor {name} has no place in {module.hparams.backbone}")
        if own[name].shape != tensor.shape:
            raise ExportError(f"{checkpoint}: tensor {name} has shape {tuple(tensor.shape)}, the model expects "
                              f"{tuple(own[name].shape)}")
    module.load_state_dict(state_dict, strict=False)


def classifier_run_data(datamodule_hparams: dict | None, model: nn.Module, sample_size: int):
    """Label names, real test images and the preprocessing of the run's data module, when it can be rebuilt."""
    data_config = _preprocessing(timm.data.resolve_model_data_config(model))
    if not datamodule_hparams:
        return None, None, data_config
    from visionlora.data import FewShotDataModule, timm_data_config

    kwargs = {k: v for k, v in datamodule_hparams.items() if not k.startswith("_")} | {"run_dir": None}
    try:
        data = FewShotDataModule(**kwargs)
        data.set_data_config(timm.data.resolve_model_data_config(model))
        images = data.sample_batch(min(sample_size, data.num_classes * 2)) if sample_size else None
    except (FileNotFoundError, ValueError, TypeError) as error:
        logger.warning("export: the run's data cannot be loaded (%s); verifying on random inputs", error)
        return None, None, data_config
    return data.class_names, images, timm_data_config(data.preprocessing)


def _adapter_head_classes(adapter_dir: Path, head_path: str | None) -> int | None:
    if head_path is None:
        return None
    try:
        with safe_open(adapter_dir / WEIGHTS_NAME, "pt") as handle:
            key = f"{PREFIX}{head_path}.weight"
            return handle.get_slice(key).get_shape()[0] if key in handle.keys() else None
    except (SafetensorError, OSError) as error:
        raise ExportError(f"{adapter_dir / WEIGHTS_NAME}: unreadable safetensors file ({error})") from error


def _read_json_field(path: Path, key: str):
    try:
        return json.loads(path.read_text()).get(key)
    except (OSError, ValueError):
        return None


def _architecture(model: nn.Module, fallback: str) -> str:
    """The timm architecture name (a ``local-dir:`` base names it in its config)."""
    return getattr(model, "pretrained_cfg", {}).get("architecture") or fallback


def _preprocessing(config: dict) -> dict:
    return {key: config[key] for key in PREPROCESSING_KEYS if key in config}
