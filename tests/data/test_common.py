"""Image decoding shared by both tasks: 16-bit images scaled to 8 bits, EXIF orientation for classification only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionlora.data import FewShotDataModule
from visionlora.data.common import load_rgb

from .conftest import make_class_folders

EXIF_ORIENTATION = 0x0112
ROTATE_90_CW = 6  # "the stored picture must be turned 90 degrees clockwise to be seen upright"


def _gradient16(height: int = 6, width: int = 9) -> np.ndarray:
    """A 16-bit ramp over the whole 0..65535 range (dark to bright), not just its low byte."""
    return np.linspace(0, 65535, height * width).round().astype(np.uint16).reshape(height, width)


def _stored_pattern(height: int = 20, width: int = 40) -> np.ndarray:
    """Four flat quadrants, so a rotation is visible and survives JPEG's blocks."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[: height // 2, : width // 2] = (250, 0, 0)
    image[: height // 2, width // 2 :] = (0, 250, 0)
    image[height // 2 :, : width // 2] = (0, 0, 250)
    image[height // 2 :, width // 2 :] = (250, 250, 250)
    return image


def _save_with_orientation(path: Path, array: np.ndarray, orientation: int = ROTATE_90_CW) -> Path:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(array).save(path, exif=exif, **({"quality": 95} if path.suffix == ".jpg" else {}))
    return path


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16bit_grey_is_scaled_to_8bit_not_clipped_to_white(tmp_path, mode):
    ramp = _gradient16()
    image = Image.fromarray(ramp) if mode == "I;16" else Image.fromarray(ramp.astype(np.int32), mode="I")
    path = tmp_path / ("g.png" if mode == "I;16" else "g.tif")
    image.save(path)
    assert Image.open(path).mode == mode
    expected = np.round(ramp / 257.0).astype(np.uint8)  # 65535 / 255 = 257 exactly
    array = load_rgb(path)
    assert array.shape == (6, 9, 3) and array.dtype == np.uint8
    np.testing.assert_array_equal(array, np.repeat(expected[..., None], 3, axis=-1))
    assert array.min() == 0 and array.max() == 255


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_is_applied_for_classification(tmp_path, suffix):
    stored = _stored_pattern()
    path = _save_with_orientation(tmp_path / f"turned{suffix}", stored)
    upright = np.rot90(stored, k=-1)  # turned 90 degrees clockwise: 40 high, 20 wide
    array = load_rgb(path)
    assert array.shape == (40, 20, 3)
    error = np.abs(array.astype(int) - upright.astype(int))
    if suffix == ".png":
        assert error.max() == 0
    else:  # JPEG's chroma subsampling smears the colour edges; turned the wrong way, the mean error is ~100
        assert error.mean() < 10


def test_detection_reads_pixels_as_stored(tmp_path):
    """COCO's boxes and width/height refer to the stored pixels, so detection must not turn the image."""
    stored = _stored_pattern()
    path = _save_with_orientation(tmp_path / "turned.png", stored)
    np.testing.assert_array_equal(load_rgb(path, exif_transpose=False), stored)


def test_imagefolder_run_sees_16bit_and_turned_images_as_they_look(tmp_path):
    root = make_class_folders(tmp_path / "ds", {"a": 3, "b": 3})
    Image.fromarray(_gradient16(10, 12)).save(root / "a" / "deep.png")
    _save_with_orientation(root / "b" / "turned.png", _stored_pattern())
    dm = FewShotDataModule(dataset="imagefolder", root=str(root), shots=1, test_fraction=0.5)
    dm.setup()
    everything = [dm.raw_split(part) for part in ("train", "test")]
    items = {Path(str(path)).name: data[i][0].numpy() for data in everything for i, path in enumerate(data.images)}
    assert items["deep.png"].max() == 255 and items["deep.png"].mean() == pytest.approx(127.5, abs=1.0)
    assert items["turned.png"].shape == (40, 20, 3)
