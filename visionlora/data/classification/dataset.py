"""A map-style dataset over in-memory uint8 images or image files, with an albumentations transform."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..common import load_rgb


class FewShotDataset(Dataset):
    """``(image, label)`` pairs: ``image`` is what ``transform`` makes of an ``H x W x 3`` uint8 array.

    Args:
        images: ``[N, H, W, 3]`` uint8 array held in memory, or ``N`` image paths read with PIL (as RGB) on access.
        labels: ``N`` class indices.
        transform: Called as ``transform(image=array)["image"]`` (e.g. a
            :func:`~visionlora.data.classification.presets.train_transform`); ``None`` returns the uint8
            ``H x W x 3`` tensor.
    """

    def __init__(
        self,
        images: np.ndarray | Sequence[str | os.PathLike],
        labels: Sequence[int] | np.ndarray,
        transform: Callable[..., dict] | None = None,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"FewShotDataset: {len(images)} images but {len(labels)} labels")
        if isinstance(images, np.ndarray) and (images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8):
            raise ValueError(f"FewShotDataset: expected [N, H, W, 3] uint8 images, got {images.shape} {images.dtype}")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.images[index]
        image = item if isinstance(item, np.ndarray) else load_rgb(item)
        label = torch.tensor(self.labels[index], dtype=torch.int64)
        if self.transform is None:
            return torch.from_numpy(np.array(image)), label
        return self.transform(image=image)["image"], label

