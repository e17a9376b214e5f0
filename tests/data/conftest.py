"""Fixtures for the data tests: a small ImageFolder of generated PNGs with one corrupt file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Images per class in the generated folder; "dog" also holds one corrupt file.
CLASS_SIZES = {"cat": 7, "dog": 6, "fox": 8}
CORRUPT = Path("dog") / "broken.png"


def write_png(path: Path, value: int, size: tuple[int, int] = (10, 12)) -> None:
    """A small RGB PNG of one colour (``value`` in the red channel, fixed green and blue)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((*size, 3), dtype=np.uint8)
    array[..., 0], array[..., 1], array[..., 2] = value, 60, 200
    Image.fromarray(array).save(path)


def make_class_folders(root: Path, sizes: dict[str, int]) -> Path:
    for label, (name, count) in enumerate(sizes.items()):
        for i in range(count):
            write_png(root / name / f"img_{i:02d}.png", value=40 * label + i)
    return root


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    """``root/<class>/*.png`` (21 good images), one corrupt ``dog/broken.png``, and files that are not images."""
    root = make_class_folders(tmp_path / "pets", CLASS_SIZES)
    (root / CORRUPT).write_bytes(np.random.default_rng(0).bytes(300))
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / "._img_00.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
    (root / ".ipynb_checkpoints").mkdir()
    return root
