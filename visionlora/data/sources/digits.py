"""An embedded few-shot benchmark: scikit-learn's handwritten digits, split into base and novel classes.

The 1,797 real 8x8 scans of UCI's "Optical Recognition of Handwritten Digits" set ship inside scikit-learn
(``sklearn.datasets.load_digits``), so tests and examples need no download. Classes 0-4 are the BASE classes and
5-9 the NOVEL classes, following the base/novel protocol of low-shot recognition (Hariharan & Girshick 2017,
"Low-shot Visual Recognition by Shrinking and Hallucinating Features", arXiv:1606.02819): a backbone may be trained
on the base classes and then adapted with k shots per novel class. Each class is split once, 50/50 and stratified,
into a training pool and a test set with a fixed seed, so the test set never changes with the few-shot seed.
Registered as the classification source ``digits`` (:data:`DIGITS`).
"""

from __future__ import annotations

from functools import lru_cache, partial

import numpy as np

from ..classification.sampling import stratified_split
from .base import ClassificationPools, ClassificationSource, LabelledImages, SourceOptions

BASE_CLASSES: tuple[int, ...] = (0, 1, 2, 3, 4)
NOVEL_CLASSES: tuple[int, ...] = (5, 6, 7, 8, 9)
ALL_CLASSES: tuple[int, ...] = BASE_CLASSES + NOVEL_CLASSES
CLASS_SETS: dict[str, tuple[int, ...]] = {"base": BASE_CLASSES, "novel": NOVEL_CLASSES, "all": ALL_CLASSES}
PARTS = ("train", "test")
# Fixed for good: changing it changes every published digits number.
SPLIT_SEED = 0
TEST_FRACTION = 0.5
# 8x8 digits lose strokes to aggressive crops; a mild crop still varies position and thickness.
DIGITS_SCALE: tuple[float, float] = (0.85, 1.0)
# Handwritten strokes (digits and Omniglot): no centre crop (ink reaches the border), no flips (a mirrored
# character is another one), the mild crop above.
STROKE_PREPROCESSING = {"crop_pct": 1.0, "hflip": False, "crop_scale": DIGITS_SCALE}


def digits_class_names(classes: str = "novel") -> list[str]:
    """Names (``"0"`` .. ``"9"``) of the digits in a class set, in label order; needs no scikit-learn."""
    return [str(digit) for digit in _class_set(classes)]


def digits_split(classes: str = "novel", part: str = "train") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images and labels of one part of one class set.

    Args:
        classes: ``"novel"`` (digits 5-9), ``"base"`` (digits 0-4) or ``"all"``.
        part: ``"train"`` (the pool few-shot images are drawn from) or ``"test"``.

    Returns:
        ``(images, labels, class_names)``: ``images`` is ``[N, 8, 8, 3]`` uint8 (ink bright on black, the 0..16
        intensities scaled to 0..255, grey replicated to three channels; resizing is the transform's job),
        ``labels`` is ``[N]`` int64 re-indexed to ``0..C-1`` in the order of ``class_names``.
    """
    indices = digits_indices(classes, part)
    images, targets = _load()
    digits = _class_set(classes)
    relabel = np.full(10, -1, dtype=np.int64)
    relabel[list(digits)] = np.arange(len(digits))
    return images[indices], relabel[targets[indices]], digits_class_names(classes)


def digits_indices(classes: str = "novel", part: str = "train") -> np.ndarray:
    """Row numbers in ``sklearn.datasets.load_digits()`` of one part of one class set, ascending.

    These are what a few-shot selection file records, so a run can be reproduced outside this package.
    """
    if part not in PARTS:
        raise ValueError(f"digits: part must be one of {PARTS}, got {part!r}")
    digits = _class_set(classes)
    train, test = _split()
    chosen = train if part == "train" else test
    _, targets = _load()
    return chosen[np.isin(targets[chosen], digits)]


def _class_set(classes: str) -> tuple[int, ...]:
    if classes not in CLASS_SETS:
        raise ValueError(f"digits: classes must be one of {tuple(CLASS_SETS)}, got {classes!r}")
    return CLASS_SETS[classes]


@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 images as read-only ``[N, 8, 8, 3]`` uint8 and their digits as int64 (cached: read once)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from err
    bunch = load_digits()
    gray = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(gray[..., None], 3, axis=-1)
    targets = bunch.target.astype(np.int64)
    images.setflags(write=False)
    targets.setflags(write=False)
    return images, targets


@lru_cache(maxsize=1)
def _split() -> tuple[np.ndarray, np.ndarray]:
    """``(train_pool, test)`` row numbers over all ten digits; per class, the split does not depend on the others."""
    _, targets = _load()
    parts = tuple(np.asarray(p, dtype=np.int64) for p in stratified_split(targets, TEST_FRACTION, SPLIT_SEED))
    for part in parts:
        part.setflags(write=False)
    return parts


def selection_ids(classes: str, pool_size: int) -> list[int]:
    """The selection file's ``digits_index`` of each training-pool image: its row in ``load_digits()``.

    Images past the digits (the Omniglot characters of ``digits+omniglot``) are numbered -1, -2, ... in archive
    order, so every row of the file still names one image.
    """
    ids = [int(i) for i in digits_indices(classes, "train")]
    return ids + [-1 - i for i in range(pool_size - len(ids))]


def _list_classes(options: SourceOptions) -> list[str]:
    return digits_class_names(options.classes)


def _read(options: SourceOptions) -> ClassificationPools:
    images, labels, names = digits_split(options.classes, "train")
    test_images, test_labels, _ = digits_split(options.classes, "test")
    return ClassificationPools(names, LabelledImages(images, labels), LabelledImages(test_images, test_labels), None,
                               partial(selection_ids, options.classes, len(labels)))


DIGITS = ClassificationSource(
    name="digits",
    list_classes=_list_classes,
    read=_read,
    selection_column="digits_index",
    needs_root=False,
    preprocessing=STROKE_PREPROCESSING,
)
