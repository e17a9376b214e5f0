"""Export a pretraining run's backbone (and, for detection, its whole base detector) as a bundled weights folder
with a model card: plain arguments in (the model, class names, preprocessing, the recipe), a folder out.

The bundled backbones exist so that the offline default task fine-tunes a *pretrained* model: LoRA on a randomly
initialised backbone proves nothing. They are trained on data disjoint from the few-shot target classes.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from visionlora.data import timm_data_config
from visionlora.files import file_sha256, staged_folder
from visionlora.models import save_backbone

from .detection import DetectorExportReport, DetectorSource, export_merged_detector

# Where a detection pretraining export keeps its whole detector, beside the backbone's timm files.
BASE_DETECTOR_DIR = "detector"


def export_pretrained_backbone(model: nn.Module, folder: str | Path, *, architecture: str, model_args: dict,
                               class_names: list[str], preprocessing: dict, dataset: str, seed: int, command: str,
                               epochs: int, test_accuracy: float) -> Path:
    """Write ``folder`` (timm local-dir: config.json + model.safetensors, with its head) and its MODEL_CARD.md.

    Args:
        model: The trained timm classifier.
        preprocessing: ``image_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation`` it was trained with.
        dataset, seed, command, epochs, test_accuracy: The recipe and its result, for the model card.

    The folder is built beside its target and replaces an earlier one only once complete.
    """
    size = preprocessing["image_size"]
    data_config = timm_data_config(preprocessing)
    folder = Path(folder)
    with staged_folder(folder, replace=True) as staging:
        save_backbone(model, staging, data_config=data_config, label_names=class_names)
        digest = file_sha256(staging / "model.safetensors")
        card = MODEL_CARD.format(
            name=folder.name, architecture=architecture, model_args=model_args, command=command, seed=seed,
            classes=summarise_classes(class_names), dataset=dataset, accuracy=100 * test_accuracy,
            params=sum(p.numel() for p in model.parameters()), epochs=epochs, size=size, mean=data_config["mean"],
            std=data_config["std"], sha256=digest,
        )  # fmt: skip
        (staging / "MODEL_CARD.md").write_text(card)
    print(f"exported backbone to {folder} (sha256 {digest[:16]}...)")
    return folder


def export_pretrained_detector(detector: nn.Module, folder: str | Path, *, config: dict, class_names: list[str],
                               image_size: int, sample_images: list[torch.Tensor], dataset: str, train_images: int,
                               seed: int, command: str, epochs: int, fit_seconds: float, test_map: float,
                               test_map_50: float) -> Path:
    """Write a detection pretraining run's backbone as a timm local-dir folder (no head) with MODEL_CARD.md, and
    the whole base detector in its ``detector/`` subfolder.

    TFA's base training (Wang et al. 2020, arXiv:2003.06957) in the forms this package fine-tunes from: the
    backbone alone (a timm folder) and the whole base detector (see :func:`export_base_detector`).

    Args:
        detector: The trained detector (``create_detector``'s model).
        config: Its ``create_detector`` keyword arguments (``visionlora.models.detector_config``).
        sample_images: Evaluation images the base detector's export is checked on.
        dataset ... test_map_50: The recipe and its result, for the model card.
    """
    folder = Path(folder)
    plain = backbone_as_timm_model(detector.backbone.body, config["backbone"], config.get("model_args"))
    data_config = {"input_size": (3, image_size, image_size), "mean": tuple(config["image_mean"]),
                   "std": tuple(config["image_std"]), "crop_pct": 1.0, "interpolation": "bilinear"}
    with staged_folder(folder, replace=True) as staging:
        save_backbone(plain, staging, data_config=data_config, model_args=config.get("model_args") or None)
        base = staging / BASE_DETECTOR_DIR
        report = export_base_detector(detector, config, class_names, image_size, sample_images, base)
        digest = file_sha256(staging / "model.safetensors")
        card = DETECTION_MODEL_CARD.format(
            name=folder.name, architecture=config["backbone"], model_args=config.get("model_args") or {},
            detector=config["detector"], command=command, seed=seed, classes=summarise_classes(class_names),
            dataset=dataset, train_images=train_images, map=test_map, map_50=test_map_50,
            params=sum(p.numel() for p in plain.parameters()), epochs=epochs, seconds=fit_seconds, size=image_size,
            mean=data_config["mean"], std=data_config["std"], sha256=digest,
            detector_sha256=file_sha256(base / "model.safetensors"),
        )  # fmt: skip
        (staging / "MODEL_CARD.md").write_text(card)
    print(f"exported the base detector to {folder / BASE_DETECTOR_DIR} (relative difference "
          f"{report.max_rel_diff:.2g})\nexported backbone to {folder} (sha256 {digest[:16]}...)")
    return folder


def export_base_detector(detector: nn.Module, config: dict, class_names: list[str], image_size: int,
                         sample_images: list[torch.Tensor], folder: Path) -> DetectorExportReport:
    """The whole base detector (backbone, FPN, head) as a merged detector folder, checked by loading it back.

    Few-shot runs start from it with ``base_detector`` (TFA's fine-tuning stage keeps the base FPN and head too).
    """
    weightless = config | {"pretrained": False, "pretrained_file": None}
    source = DetectorSource(detector.eval(), weightless, list(class_names), image_size, sample_images,
                            "the pretraining run")
    return export_merged_detector(source, folder, force=True)


def backbone_as_timm_model(body, architecture: str, model_args: dict | None):
    """The detector's timm ``features_only`` body as the plain timm model (no classifier) with the same weights.

    The detector's BatchNorm layers are frozen copies without ``num_batches_tracked``; that counter is the only
    tensor allowed to differ.
    """
    plain = timm.create_model(architecture, pretrained=False, num_classes=0, **(model_args or {}))
    missing, unexpected = plain.load_state_dict(body.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"pretrain: the {architecture} detector backbone's tensors do not map onto timm's model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}); only families whose features_only "
                         f"model keeps timm's module names can be exported this way")
    return plain.eval()


def summarise_classes(names: list[str], shown: int = 8) -> str:
    """A readable list of the source classes: all of them when few, else the first ones and a count."""
    if len(names) <= shown:
        return ", ".join(names)
    return f"{', '.join(names[:shown])}, ... ({len(names)} classes)"


MODEL_CARD = """# {name}

A small timm `{architecture}` trained from scratch by visionlora, bundled so the offline default task fine-tunes a
pretrained backbone. Load it without visionlora:
`timm.create_model("local-dir:data/weights/{name}", pretrained=True, num_classes=N)`.

| field | value |
|---|---|
| architecture | `{architecture}` with `{model_args}` |
| parameters | {params:,} |
| recipe | `{command}` |
| seed | {seed} |
| source data | `{dataset}` classes {classes} (the few-shot default uses the other, disjoint classes) |
| epochs | {epochs} |
| input | {size}x{size} RGB, mean {mean}, std {std} |
| test accuracy on the source classes | {accuracy:.2f}% |
| sha256 of model.safetensors | `{sha256}` |

Rerunning the recipe command on the same software versions reproduces these weights (seeded, single process, CPU).
"""


DETECTION_MODEL_CARD = """# {name}

A small timm `{architecture}` backbone, trained from scratch by visionlora as part of a `{detector}` detector on
the embedded *base* shape classes, bundled so the offline few-shot detection default fine-tunes a pretrained
backbone on the disjoint *novel* classes (circle, square, triangle, cross, ring, stripes): TFA's base/novel
protocol (Wang et al. 2020, arXiv:2003.06957). Two forms: this folder is the backbone alone, in timm's local-dir
format: `timm.create_model("local-dir:data/weights/{name}", pretrained=True, num_classes=0)` (add
`features_only=True` for the feature maps); `detector/` is the whole base detector (backbone, FPN and head,
`visionlora.models.load_merged_detector`), which few-shot runs start from with `base_detector`: everything
but the class predictor is loaded, as in TFA's fine-tuning stage.

| field | value |
|---|---|
| architecture | `{architecture}` with `{model_args}` |
| parameters | {params:,} |
| recipe | `{command}` |
| seed | {seed} |
| source data | `{dataset}`: {train_images} training scenes of {classes} (disjoint from the targets) |
| epochs | {epochs} ({seconds:.0f} s of training) |
| input | images of {size} px, mean {mean}, std {std} (the detector normalises) |
| base-class test mAP of the pretraining detector | {map:.3f} (mAP@50 {map_50:.3f}) |
| sha256 of model.safetensors | `{sha256}` |
| sha256 of detector/model.safetensors | `{detector_sha256}` |

Rerunning the recipe command on the same software versions reproduces these weights (seeded, single process, CPU).
"""
