"""TFA K-instance sampling: K instances per class in whole images, deterministic, errors naming the class."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from visionlora.data.detection.coco import DetectionRecord
from visionlora.data.detection.sampling import sample_k_instances


def _pool(num_images: int = 60, seed: int = 0) -> list[DetectionRecord]:
    """Images holding 1 to 3 boxes of random labels 1..3."""
    rng = np.random.default_rng(seed)
    records = []
    for image_id in range(1, num_images + 1):
        labels = rng.integers(1, 4, size=int(rng.integers(1, 4)))
        boxes = np.tile(np.array([0, 0, 5, 5], dtype=np.float32), (len(labels), 1))
        ids = np.arange(len(labels), dtype=np.int64) + 10 * image_id
        records.append(DetectionRecord(image_id, Path(f"{image_id}.png"), 8, 8, boxes, labels.astype(np.int64), ids))
    return records


def test_k_instances_per_class_whole_images_and_deterministic():
    pool = _pool()
    by_id = {r.image_id: r for r in pool}
    sample = sample_k_instances(pool, 5, seed=1, class_names=["a", "b", "c"])
    assert sample.counts == {1: 5, 2: 5, 3: 5}
    assert Counter(int(x) for r in sample.records for x in r.labels) == {1: 5, 2: 5, 3: 5}
    for label, image_ids in sample.image_ids.items():
        for image_id in image_ids:  # TFA takes all of an image's instances of the class, never part of them
            record = next(r for r in sample.records if r.image_id == image_id)
            assert (record.labels == label).sum() == (by_id[image_id].labels == label).sum()
    again = sample_k_instances(list(reversed(pool)), 5, seed=1)
    assert again.image_ids == sample.image_ids
    assert sample_k_instances(pool, 5, seed=2).image_ids != sample.image_ids
    bigger = sample_k_instances(pool, 10, seed=1)  # TFA's shot ladder: the 5-shot images stay in the 10-shot set
    assert bigger.counts == {1: 10, 2: 10, 3: 10}
    assert all(set(sample.image_ids[c]) <= set(bigger.image_ids[c]) for c in (1, 2, 3))


def test_k_instances_errors_name_the_class_and_warn_when_k_is_not_reachable(caplog):
    pool = _pool(4)
    with pytest.raises(ValueError, match=r"class 'c' \(label 3\) has"):
        sample_k_instances(pool, 30, seed=0, class_names=["a", "b", "c"])
    pairs = [DetectionRecord(i, Path(f"{i}.png"), 8, 8, np.zeros((2, 4), np.float32), np.array([1, 1]),
                             np.array([2 * i, 2 * i + 1])) for i in range(1, 5)]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        sample = sample_k_instances(pairs, 3, seed=0, class_names=["pair"])
    assert sample.counts == {1: 2} and "took 2" in caplog.text
