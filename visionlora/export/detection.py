"""Merged export of a LoRA detector: LoRA folded into the backbone (W ← W + scale·B·A, Hu et al. 2021,
arXiv:2106.09685), written as a folder that :func:`~visionlora.models.load_merged_detector` rebuilds with
``create_detector`` and plain ``load_state_dict(strict=True)``, checked at every export.

The folder (``config.json`` with the ``create_detector`` arguments, class names and image size, plus
``model.safetensors``) is written to a temporary sibling, loaded back without LoRA, compared with the adapted
detector on real evaluation images and only then renamed into place (see :func:`~visionlora.export.merged.
staged_export`). The comparison uses the raw network outputs before any score threshold or NMS (FPN maps, head
logits and box regressions, Faster R-CNN's RPN and box-head outputs on fixed boxes): rounding can reorder two
nearly equal scores and flip an NMS decision, which says nothing about whether the weights are right.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN

from visionlora.models.detection import detector_config, unload_detector_lora
from visionlora.models.detector_folder import load_merged_detector, write_detector_folder

from .merged import DTYPES, REPORT_NAME, VerificationError, checked_tolerance, staged_export
from .sources import ExportError, _load_trained_tensors, find_checkpoint, module_from_hparams, read_checkpoint

logger = logging.getLogger(__name__)

# Side of the fixed boxes Faster R-CNN's box head is compared on, as a share of the image side.
PROBE_BOX_SIDES = (0.25, 0.5)


@dataclass
class DetectorSource:
    """An adapted detector ready to merge, with what a deployed copy needs to know.

    Attributes:
        model: The detector with LoRA still unmerged (the reference the export is checked against), in eval mode.
        config: ``create_detector`` keyword arguments that rebuild its architecture without any weights.
        class_names: Class names; label ``i + 1`` is ``class_names[i]`` (0 is the background).
        category_ids: The dataset's category ids in label order (label ``i + 1`` is ``category_ids[i]``), so
            predictions can be written in the dataset's own ids; None when unknown.
        image_size: Longer image side the detector was evaluated at (the data module's ``image_size``).
        sample_images: Real evaluation images (float ``[3, H, W]`` in 0..1) to check on, when the data is at hand.
        description: Where the model came from, for messages and the report.
    """

    model: nn.Module
    config: dict
    class_names: list[str] | None = None
    image_size: int | None = None
    sample_images: list[torch.Tensor] | None = None
    description: str = ""
    category_ids: list[int] | None = None

    @property
    def num_classes(self) -> int:
        return self.config["num_classes"]


@dataclass
class DetectorExportReport:
    """What was written and how closely its raw outputs reproduce the adapted detector's."""

    output: str
    source: str
    detector: str
    backbone: str
    num_classes: int
    dtype: str
    inputs: str
    max_abs_diff: float
    max_rel_diff: float
    tolerance: float

    def __str__(self) -> str:
        return "\n".join([
            f"exported {self.detector} on {self.backbone} ({self.num_classes} classes, {self.dtype}) to {self.output}",
            f"check of raw outputs (FPN maps, head outputs; before NMS) on {self.inputs}: max |diff| "
            f"{self.max_abs_diff:.3g}, relative {self.max_rel_diff:.3g} (tolerance {self.tolerance:g})",
            "load it without LoRA code:",
            f'  from visionlora.models import load_merged_detector; load_merged_detector("{self.output}")',
        ])


def is_detection_checkpoint(path: str | Path) -> bool:
    """Whether a run directory's (or checkpoint file's) checkpoint is a ``LoraDetector``'s (it has a ``detector``)."""
    saved = read_checkpoint(find_checkpoint(Path(path)))
    return "detector" in saved["hyper_parameters"]


def detector_source_from_path(path: str | Path, num_classes: int | None = None, sample_size: int = 4) -> DetectorSource:
    """A detection run directory (its newest checkpoint) or a ``LoraDetector`` Lightning checkpoint.

    The frozen backbone is rebuilt from the pretrained weights the hparams name; the checkpoint's trained tensors
    (LoRA, FPN, head) go on top, each checked by name and shape first.

    Args:
        num_classes: When given, the checkpoint must have this many classes (guards against exporting the wrong run).
        sample_size: How many evaluation images of the run's data to check on.
    """
    checkpoint = find_checkpoint(Path(path))
    saved = read_checkpoint(checkpoint)
    hparams = {k: v for k, v in saved["hyper_parameters"].items() if not k.startswith("_")}
    if "detector" not in hparams:
        raise ExportError(f"{checkpoint}: a classifier checkpoint, not a detector's (no 'detector' hparam)")
    if num_classes is not None and hparams.get("num_classes") != num_classes:
        raise ExportError(f"{checkpoint}: checkpoint has num_classes={hparams.get('num_classes')}, "
                          f"but {num_classes} were asked for")
    module = _detector_module(hparams, checkpoint)
    _load_trained_tensors(module, saved["state_dict"], checkpoint)
    config = detector_config(module.hparams, weightless=True)
    names, size, images, ids = _run_data(saved.get("datamodule_hyper_parameters"), sample_size)
    return DetectorSource(module.model.eval(), config, names, size, images, str(checkpoint), ids)


def export_merged_detector(source: DetectorSource, output: str | Path, dtype: str = "fp32",
                           tolerance: float | None = None, force: bool = False) -> DetectorExportReport:
    """Merge ``source.model``'s LoRA, write ``config.json`` + ``model.safetensors`` at ``output`` and check them.

    Args:
        dtype: Weight precision written: ``fp32``, ``fp16`` or ``bf16``.
        tolerance: Largest accepted max|exported - adapted| / max|adapted| of any raw output (default per dtype).
        force: Replace an existing ``output``; without it an existing output is an error.

    Raises:
        ExportError: Bad arguments or an existing output without ``force``.
        VerificationError: The written detector differs from the adapted one by more than the tolerance.
    """
    output, tolerance = Path(output), checked_tolerance(dtype, tolerance)
    with staged_export(output, force) as staging:
        return _write_and_check(source, staging, output, dtype, tolerance)


def _write_and_check(source: DetectorSource, folder: Path, output: Path, dtype: str,
                     tolerance: float) -> DetectorExportReport:
    plain = merged_detector_copy(source.model)
    state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in plain.state_dict().items()}
    write_detector_folder(folder, state, source.config, source.class_names, source.image_size, dtype,
                          source.category_ids)
    try:
        loaded = load_merged_detector(folder)
    except (RuntimeError, TypeError, ValueError) as error:  # strict load_state_dict: keys or shapes differ
        raise ExportError(f"the merged detector does not load into create_detector(**config): {error}") from error
    images, inputs = _check_images(source)
    abs_diff, rel_diff = compare_raw_outputs(source.model, loaded, images)
    report = DetectorExportReport(str(output), source.description, source.config["detector"],
                                  source.config["backbone"], source.num_classes, dtype, inputs, abs_diff, rel_diff,
                                  tolerance)
    if not rel_diff <= tolerance:  # also catches NaN
        raise VerificationError(f"exported detector differs from the adapted one: relative {rel_diff:.3g} > "
                                f"tolerance {tolerance:g} ({dtype}); nothing written to {output}")
    (folder / REPORT_NAME).write_text(json.dumps(asdict(report), indent=2))
    return report


def merged_detector_copy(model: nn.Module) -> nn.Module:
    """A plain detector with every LoRA update folded in; ``model`` itself stays adapted and unmerged."""
    import copy

    plain = unload_detector_lora(copy.deepcopy(model)).eval()
    return plain.requires_grad_(False)


@torch.no_grad()
def compare_raw_outputs(reference: nn.Module, exported: nn.Module, images: list[torch.Tensor]) -> tuple[float, float]:
    """Largest absolute difference of any raw output, and the largest of those relative to the output's scale.

    Each output tensor is compared on its own scale (max |reference|), so small maps are not judged against the
    largest logits.
    """
    dtype = next(exported.parameters()).dtype
    expected = raw_outputs(reference, [image.float() for image in images])
    actual = raw_outputs(exported, [image.to(dtype) for image in images])
    abs_diffs, rel_diffs = [], []
    for want, got in zip(expected, actual, strict=True):
        diff = (got.float() - want.float()).abs().max().item()
        abs_diffs.append(diff)
        rel_diffs.append(diff / max(want.abs().max().item(), 1e-12))
    return max(abs_diffs), max(rel_diffs)


def raw_outputs(detector: nn.Module, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """The detector's outputs before decoding, thresholds and NMS: FPN maps, then the head's (or RPN's) outputs.

    Faster R-CNN's second stage runs on fixed boxes (a grid of two sizes), since its own proposals pass through NMS.
    """
    detector = detector.eval()
    image_list, _ = detector.transform(images)
    features = detector.backbone(image_list.tensors)
    maps = list(features.values())
    if not isinstance(detector, FasterRCNN):
        return maps + list(detector.head(maps).values())
    objectness, deltas = detector.rpn.head(maps)
    boxes = [_probe_boxes(h, w, image_list.tensors) for h, w in image_list.image_sizes]
    pooled = detector.roi_heads.box_roi_pool(features, boxes, image_list.image_sizes)
    scores, regression = detector.roi_heads.box_predictor(detector.roi_heads.box_head(pooled))
    return maps + objectness + deltas + [scores, regression]


def _probe_boxes(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """A 3 x 3 grid of square boxes of each side in ``PROBE_BOX_SIDES``, clipped to the image."""
    boxes = []
    for share in PROBE_BOX_SIDES:
        side = share * min(height, width)
        for cy in torch.linspace(side / 2, height - side / 2, 3).tolist():
            for cx in torch.linspace(side / 2, width - side / 2, 3).tolist():
                boxes.append([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])
    return torch.tensor(boxes, dtype=like.dtype, device=like.device)


def _check_images(source: DetectorSource) -> tuple[list[torch.Tensor], str]:
    if source.sample_images:
        return source.sample_images, f"{len(source.sample_images)} real evaluation images"
    size = source.image_size or source.config.get("min_size", 256)
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=generator) for _ in range(2)]
    return images, f"2 random images of {size} px"


def _detector_module(hparams: dict, checkpoint: Path):
    from visionlora.tasks import LoraDetector  # Lightning is only needed for checkpoints

    return module_from_hparams(LoraDetector, hparams, checkpoint)


def _run_data(datamodule_hparams: dict | None, sample_size: int):
    """Class names, evaluation image size, real evaluation images and category ids of the run's data, when it can
    be rebuilt."""
    if not datamodule_hparams:
        return None, None, None, None
    from visionlora.data import CocoDetectionDataModule

    kwargs = {k: v for k, v in datamodule_hparams.items() if not k.startswith("_")} | {"run_dir": None}
    try:
        data = CocoDetectionDataModule(**kwargs)
    except (FileNotFoundError, ValueError, TypeError) as error:
        logger.warning("export: the run's data cannot be loaded (%s); checking on random images", error)
        return None, None, None, None
    try:
        images = data.sample_batch(sample_size) if sample_size else None
    except (FileNotFoundError, ValueError) as error:
        logger.warning("export: no evaluation images (%s); checking on random images", error)
        images = None
    return data.class_names, data.image_size, images, data.category_ids
