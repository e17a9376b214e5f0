"""``Predictor``: a trained classifier or detector, from whatever the user has, run on new images.

Sources: a run directory or a Lightning checkpoint (the adapted model, LoRA unmerged, rebuilt the way
``tools/export_merged.py`` rebuilds it), a merged export folder (a timm ``local-dir`` classifier or a merged
detector), or a base timm model plus an adapter folder. Preprocessing is taken from the source itself: the data
configuration an export writes into ``config.json`` is the run's evaluation transform, so predictions on a run's
own test images reproduce its test metrics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn

from visionlora.data.detection.presets import eval_detection_transform
from visionlora.export import ExportError, detector_source_from_path, source_from_adapter, source_from_path
from visionlora.export.sources import find_checkpoint, read_checkpoint
from visionlora.models import load_merged_detector

from .results import ClassPrediction, DetectionPrediction

TASKS = ("classification", "detection")


class PredictError(ValueError):
    """A source or an option that cannot be used; nothing was run or written."""


@dataclass
class Predictor:
    """A model ready to predict, with what turning its outputs into answers needs.

    Attributes:
        task: ``classification`` or ``detection``.
        model: The model in eval mode (classifier logits; or a torchvision detector).
        class_names: Label names (detection: label ``i + 1`` is ``class_names[i]``).
        data_config: Classification: timm's data configuration of the evaluation transform.
        image_size: Detection: the longer image side the detector was evaluated at.
        category_ids: Detection: the dataset's category id of each label, for COCO results.
        description: Where the model came from.
    """

    task: str
    model: nn.Module
    class_names: list[str]
    data_config: dict = field(default_factory=dict)
    image_size: int | None = None
    category_ids: list[int] | None = None
    description: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_source(cls, source: str | Path | None = None, base: str | None = None, adapter: str | Path | None = None,
                    pretrained_file: str | None = None, pretrained: bool = False, device: str = "cpu") -> Predictor:
        """A predictor from a run directory, checkpoint or merged export folder, or from ``base`` + ``adapter``.

        Raises:
            PredictError: The source is none of those, or does not load (the message says why).
        """
        try:
            predictor = _load(source, base, adapter, pretrained_file, pretrained)
        except ExportError as error:
            raise PredictError(str(error)) from None
        predictor.device = torch.device(device)
        predictor.model.to(predictor.device).eval()
        return predictor

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def classification_transform(self):
        """The evaluation transform (PIL image in, normalised tensor out), timm's own from the data configuration."""
        return timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=self.data_config))

    @torch.no_grad()
    def predict(self, images: list, top_k: int = 1, score_threshold: float = 0.0
                ) -> list[ClassPrediction] | list[DetectionPrediction]:
        """Predictions for ``images`` (paths, PIL images or ``H x W x 3`` uint8 arrays), one per image, in order.

        Args:
            top_k: Classification: how many labels to give per image (the first is the prediction).
            score_threshold: Detection: boxes scoring below are left out.
        """
        rgb = [_as_rgb(image) for image in images]
        if self.task == "classification":
            return self._classify(rgb, top_k)
        return self._detect(rgb, score_threshold)

    def _classify(self, images: list[np.ndarray], top_k: int) -> list[ClassPrediction]:
        if not 1 <= top_k <= self.num_classes:
            raise PredictError(f"top_k must be in [1, {self.num_classes}] (the model's classes), got {top_k}")
        transform = self.classification_transform()
        batch = torch.stack([transform(Image.fromarray(image)) for image in images]).to(self.device)
        probabilities = self.model(batch).float().softmax(dim=1).cpu()
        values, indices = probabilities.topk(top_k, dim=1)
        return [ClassPrediction([self.class_names[i] for i in row.tolist()], top.tolist(), row.tolist())
                for top, row in zip(values, indices, strict=True)]

    def _detect(self, images: list[np.ndarray], score_threshold: float) -> list[DetectionPrediction]:
        transform = eval_detection_transform(self.image_size)
        inputs, scales = [], []
        for image in images:
            resized = transform(image=image, bboxes=np.zeros((0, 4)), labels=np.zeros(0, dtype=np.int64))["image"]
            inputs.append(torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))).float().div_(255.0))
            scales.append((image.shape[1] / resized.shape[1], image.shape[0] / resized.shape[0]))
        found = self.model([x.to(self.device) for x in inputs])
        predictions = []
        for detections, (sx, sy) in zip(found, scales, strict=True):
            keep = detections["scores"] >= score_threshold
            boxes = detections["boxes"][keep].float().cpu() * torch.tensor([sx, sy, sx, sy])
            labels = detections["labels"][keep].cpu().tolist()
            ids = [self.category_ids[label - 1] if self.category_ids else label for label in labels]
            predictions.append(DetectionPrediction(boxes, detections["scores"][keep].float().cpu(), labels,
                                                   [self.class_names[label - 1] for label in labels], ids))
        return predictions


def _load(source, base, adapter, pretrained_file, pretrained) -> Predictor:
    if adapter is not None:
        if base is None or source is not None:
            raise PredictError("--adapter goes with --base (a timm name or local-dir:) and no SOURCE")
        loaded = source_from_adapter(adapter, base, pretrained_file, pretrained)
        names = loaded.label_names or [str(i) for i in range(loaded.num_classes)]
        return Predictor("classification", loaded.model, names, loaded.data_config, description=loaded.description)
    if source is None:
        raise PredictError("give a SOURCE (run directory, checkpoint or export folder), or --base with --adapter")
    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file() and not (path / "checkpoints").is_dir():
        return _from_export(path)
    if not path.exists():
        raise PredictError(f"SOURCE {path} does not exist")
    saved = read_checkpoint(find_checkpoint(path))
    if "detector" in saved["hyper_parameters"]:
        loaded = detector_source_from_path(path, sample_size=0)
        return Predictor("detection", loaded.model, loaded.class_names or _numbered(loaded.num_classes),
                         image_size=loaded.image_size or loaded.config.get("min_size"),
                         category_ids=loaded.category_ids, description=loaded.description)
    loaded = source_from_path(path, sample_size=0)
    names = loaded.label_names or [str(i) for i in range(loaded.num_classes)]
    return Predictor("classification", loaded.model, names, loaded.data_config, description=loaded.description)


def _from_export(folder: Path) -> Predictor:
    """A merged export folder: a detector's (``create_detector`` in its config) or a timm classifier's."""
    config = json.loads((folder / "config.json").read_text())
    if "create_detector" in config:
        model = load_merged_detector(folder, dtype=torch.float32)
        names = config.get("class_names") or _numbered(config["create_detector"]["num_classes"])
        return Predictor("detection", model, names, image_size=config.get("image_size"),
                         category_ids=config.get("category_ids"), description=f"merged detector {folder}")
    if "architecture" not in config:
        raise PredictError(f"{folder / 'config.json'} is neither a timm model folder nor a merged detector's")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).float()
    names = list(config.get("label_names") or [str(i) for i in range(model.num_classes)])
    return Predictor("classification", model, names, timm.data.resolve_data_config(model=model),
                     description=f"merged classifier {folder}")


def _numbered(count: int) -> list[str]:
    return [str(label) for label in range(1, count + 1)]


def _as_rgb(image) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise PredictError(f"an image array must be H x W x 3 uint8, got {image.shape} {image.dtype}")
        return image
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    from visionlora.data.common import load_rgb

    return load_rgb(image)
