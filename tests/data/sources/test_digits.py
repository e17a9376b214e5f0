"""The embedded digits dataset: split sizes, disjointness, class sets, re-indexing, pixel format."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from visionlora.data import BASE_CLASSES, NOVEL_CLASSES, digits_indices, digits_split

# Per-class sizes of the fixed 50/50 split (the test half rounds up); changing them changes every result.
SIZES = {
    ("novel", "train"): [91, 90, 89, 87, 90],
    ("novel", "test"): [91, 91, 90, 87, 90],
    ("base", "train"): [89, 91, 88, 91, 90],
    ("base", "test"): [89, 91, 89, 92, 91],
}


def test_class_sets():
    assert BASE_CLASSES == (0, 1, 2, 3, 4) and NOVEL_CLASSES == (5, 6, 7, 8, 9)


@pytest.mark.parametrize("classes, part", list(SIZES))
def test_split_sizes_and_reindexed_labels(classes, part):
    images, labels, names = digits_split(classes, part)
    assert names == [str(d) for d in (NOVEL_CLASSES if classes == "novel" else BASE_CLASSES)]
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == SIZES[classes, part]
    assert images.shape == (len(labels), 8, 8, 3) and images.dtype == np.uint8


def test_train_and_test_are_disjoint_and_cover_everything():
    train, test = digits_indices("all", "train"), digits_indices("all", "test")
    assert len(train) == 896 and len(test) == 901
    assert np.intersect1d(train, test).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
    # The test set is fixed for good: a fingerprint of its rows.
    assert test[:6].tolist() == [3, 5, 7, 8, 9, 11] and int(test.sum()) == 793473


def test_images_and_labels_match_sklearn():
    bunch = load_digits()
    images, labels, names = digits_split("novel", "test")
    rows = digits_indices("novel", "test")
    assert [names[label] for label in labels] == [str(t) for t in bunch.target[rows]]
    expected = np.rint(bunch.images[rows] * 255 / 16).astype(np.uint8)
    for channel in range(3):
        assert np.array_equal(images[..., channel], expected)
    assert images.max() == 255 and images.min() == 0


def test_all_keeps_digit_labels():
    _, labels, names = digits_split("all", "train")
    assert names == [str(d) for d in range(10)] and labels.max() == 9


def test_returned_arrays_are_copies():
    images, _, _ = digits_split("novel", "train")
    images[:] = 0
    assert digits_split("novel", "train")[0].max() == 255


@pytest.mark.parametrize("classes, part", [("odd", "train"), ("novel", "val")])
def test_bad_arguments(classes, part):
    with pytest.raises(ValueError, match="classes must be|part must be"):
        digits_split(classes, part)
