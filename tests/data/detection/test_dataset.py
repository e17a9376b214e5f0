"""DetectionDataset: items in the detector's convention, and a file whose size differs from its annotation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visionlora.data.detection.coco import DetectionRecord
from visionlora.data.detection.dataset import DetectionDataset

from .conftest import _write_png


def test_dataset_item_and_size_mismatch(tmp_path):
    _write_png(tmp_path / "a.png", 40, 30)
    empty = np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    image, target = DetectionDataset([DetectionRecord(5, tmp_path / "a.png", 40, 30, *empty)])[0]
    assert (
        image.shape == (3, 30, 40) and image.dtype == torch.float32 and float(image[0, 0, 0]) == pytest.approx(90 / 255)
    )
    assert target["boxes"].shape == (0, 4) and target["labels"].dtype == torch.int64 and int(target["image_id"]) == 5
    with pytest.raises(ValueError, match=r"a\.png is 40x30 but its annotation says 50x30 \(image id 5\)"):
        DetectionDataset([DetectionRecord(5, tmp_path / "a.png", 50, 30, *empty)])[0]
