"""Omniglot (Lake, Salakhutdinov & Tenenbaum 2015, Science 350(6266)) read from the official archive layout.

The archives (``images_background_small1.zip``, ``images_background_small2.zip``, ``all_runs.zip``) or their
unpacked folders are read by path; nothing is downloaded or copied. Characters are black ink on white 105x105 PNGs.

``render="digits"`` turns each character into the 8x8, 0..16-intensity format of scikit-learn's handwritten digits
(ink bounding box, centred in a square, 32x32 bitmap, 4x4 block counts: the UCI digits' own preprocessing), so a
backbone pretrained on Omniglot sees the same kind of image as the digits few-shot task.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from . import digits

BACKGROUND_SMALL = ("images_background_small1", "images_background_small2")
RENDERS = ("native", "digits")


def omniglot_background(root: str | Path, splits: tuple[str, ...] = BACKGROUND_SMALL, render: str = "digits"
                        ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All images of the given background splits.

    Returns:
        ``(images uint8 [N, H, W, 3] ink bright on black, labels int64 [N], class names "split/alphabet/char")``.
    """
    if render not in RENDERS:
        raise ValueError(f"omniglot: render must be one of {RENDERS}, got {render!r}")
    images, labels, names = [], [], {}
    for split in splits:
        for member, data in _split_pngs(Path(root), split):
            parts = member.split("/")
            name = "/".join([split, *parts[-3:-1]])
            labels.append(names.setdefault(name, len(names)))
            images.append(_render(data, render))
    if not images:
        raise ValueError(f"omniglot: no images for splits {splits} under {root}")
    return np.stack(images), np.asarray(labels, dtype=np.int64), list(names)


def digits_with_omniglot(root: str | Path, classes: str = "base", part: str = "train"
                         ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pretraining data for the digits task: a digits class set plus every Omniglot background-small character.

    The training part holds the digits' training pool and all Omniglot images (rendered like digits); the test
    part holds only the digits' test images, so the reported accuracy is on the source digit classes.
    """
    images, labels, names = digits.digits_split(classes, part)
    if part != "train":
        return images, labels, names + _cached_background(str(root))[2]
    extra_images, extra_labels, extra_names = _cached_background(str(root))
    return (np.concatenate([images, extra_images]), np.concatenate([labels, extra_labels + len(names)]),
            names + extra_names)


def digits_with_omniglot_class_names(root: str | Path, classes: str = "base") -> list[str]:
    return digits.digits_class_names(classes) + _cached_background(str(root))[2]


@lru_cache(maxsize=2)
def _cached_background(root: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    return omniglot_background(root, render="digits")


def _split_pngs(root: Path, split: str) -> Iterator[tuple[str, bytes]]:
    """(relative path, PNG bytes) of one split, from ``<split>.zip`` or the unpacked ``<split>/`` folder."""
    archive, folder = root / f"{split}.zip", root / split
    if archive.is_file():
        with zipfile.ZipFile(archive) as handle:
            for member in sorted(handle.namelist()):
                if member.endswith(".png"):
                    yield member, handle.read(member)
    elif folder.is_dir():
        for path in sorted(folder.rglob("*.png")):
            yield str(path.relative_to(root)), path.read_bytes()
    else:
        raise FileNotFoundError(f"omniglot: neither {archive} nor {folder} exists")


def _render(png: bytes, render: str) -> np.ndarray:
    ink = np.asarray(Image.open(io.BytesIO(png)).convert("L")) < 128
    if render == "native":
        grey = (ink * 255).astype(np.uint8)
    else:
        # The same 0..16 -> 0..255 scaling as visionlora.data.digits.
        grey = np.rint(render_like_digits(ink) * (255.0 / 16.0)).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def render_like_digits(ink: np.ndarray) -> np.ndarray:
    """A boolean ink mask as an 8x8 image of 0..16 counts, the way the UCI handwritten digits were made."""
    rows, cols = np.nonzero(ink)
    if len(rows) == 0:
        return np.zeros((8, 8), dtype=np.int64)
    crop = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = crop.shape
    side = max(height, width)
    square = np.zeros((side, side), dtype=bool)
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = crop
    bitmap = np.asarray(Image.fromarray(square.astype(np.uint8) * 255).resize((32, 32), Image.BILINEAR)) > 64
    return bitmap.reshape(8, 4, 8, 4).sum(axis=(1, 3))
