"""A map-style detection dataset over :class:`~visionlora.data.detection.coco.DetectionRecord` items, and its collate.

Each item is ``(image, target)`` in torchvision's detection convention: ``image`` a float32 ``[3, H, W]`` tensor
with values in 0..1 (not normalised: the detector does that), ``target`` a dict with ``boxes`` float32 ``[N, 4]``
(absolute ``x0, y0, x1, y1`` pixels of the transformed image), ``labels`` int64 ``[N]`` in ``1..C`` and
``image_id`` an int64 scalar. ``N`` may be 0 (an image without objects, or with every box cropped away).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..common import load_rgb
from .coco import DetectionRecord

Target = dict[str, torch.Tensor]


class DetectionDataset(Dataset):
    """``(image, target)`` pairs from records, read from disk on access and passed through ``transform``.

    Args:
        records: The images and their boxes.
        transform: A box-aware albumentations pipeline (see :mod:`~visionlora.data.detection.presets`), called
            as ``transform(image=..., bboxes=..., labels=...)``; ``None`` keeps the image as it is.
    """

    def __init__(self, records: Sequence[DetectionRecord], transform: Callable[..., dict] | None = None) -> None:
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        record = self.records[index]
        image = load_rgb(record.path, exif_transpose=False)  # COCO: boxes refer to the stored pixels
        if image.shape[:2] != (record.height, record.width):
            # Boxes are in the json's pixel frame; a different file size would silently misplace every box.
            raise ValueError(
                f"DetectionDataset: {record.path} is {image.shape[1]}x{image.shape[0]} but its annotation says "
                f"{record.width}x{record.height} (image id {record.image_id})"
            )
        boxes, labels = record.boxes, record.labels
        if self.transform is not None:
            out = self.transform(image=image, bboxes=boxes, labels=labels)
            image, boxes, labels = out["image"], out["bboxes"], out["labels"]
        return _to_tensor(image), _target(boxes, labels, record.image_id, image.shape[1], image.shape[0])


def collate_detection(batch: Sequence[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """Keep images and targets as lists: images may differ in size and targets in box count."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)


def _target(boxes, labels, image_id: int, width: int, height: int) -> Target:
    boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
    # albumentations works in normalised float coordinates; undo its last-bit overshoot past the border.
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0.0, float(width))
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0.0, float(height))
    return {
        "boxes": boxes,
        "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1)),
        "image_id": torch.tensor(int(image_id), dtype=torch.int64),
    }
