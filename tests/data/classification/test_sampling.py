"""k-shot sampling, stratified splits and the selection file."""

from __future__ import annotations

import csv
from collections import Counter

import numpy as np
import pytest

from visionlora.data import sample_k_shot, stratified_split, write_selection

# Four classes of different sizes, interleaved.
LABELS = [0, 1, 2, 3, 0, 1, 2, 0, 1, 3, 0, 2, 0, 1, 3, 0, 2, 1, 0, 3, 0, 1, 2, 3, 0]


def test_k_shot_exactly_k_per_class_sorted_and_unique():
    chosen = sample_k_shot(LABELS, k=3, seed=0)
    assert chosen == sorted(set(chosen))
    assert Counter(LABELS[i] for i in chosen) == {0: 3, 1: 3, 2: 3, 3: 3}


def test_k_shot_same_seed_same_indices_other_seed_other_indices():
    assert sample_k_shot(LABELS, 3, seed=7) == sample_k_shot(LABELS, 3, seed=7)
    draws = {tuple(sample_k_shot(LABELS, 3, seed=s)) for s in range(5)}
    assert len(draws) == 5


def test_k_shot_independent_of_class_order():
    # Reorder the items so classes first appear as 3, 2, 1, 0 while each class keeps its own item order: every
    # class must get the same items (tracked by their original index) as before.
    ids = np.arange(len(LABELS))
    order = sorted(ids, key=lambda i: (-LABELS[i], i))
    reordered = [LABELS[i] for i in order]
    assert reordered[0] == 3
    before = set(sample_k_shot(LABELS, 2, seed=3))
    after = {int(order[i]) for i in sample_k_shot(reordered, 2, seed=3)}
    assert after == before


def test_k_shot_class_draw_unchanged_by_other_classes():
    labels = np.array(LABELS)
    without_3 = np.flatnonzero(labels != 3)
    full = {i for i in sample_k_shot(labels, 2, seed=1) if labels[i] != 3}
    reduced = {int(without_3[i]) for i in sample_k_shot(labels[without_3], 2, seed=1)}
    assert reduced == full


def test_too_few_items_names_the_class():
    # class 3 has 5 items
    with pytest.raises(ValueError, match=r"'lynx' \(label 3\) has 5"):
        sample_k_shot(LABELS, 6, seed=0, class_names=["cat", "dog", "fox", "lynx"])
    with pytest.raises(ValueError, match=r"label 3 has 5"):
        sample_k_shot(LABELS, 6, seed=0)


def test_named_class_without_items_is_an_error():
    with pytest.raises(ValueError, match=r"'owl' \(label 4\) has 0"):
        sample_k_shot(LABELS, 1, seed=0, class_names=["cat", "dog", "fox", "lynx", "owl"])


@pytest.mark.parametrize("k, seed", [(0, 0), (1, -1)])
def test_bad_k_or_seed(k, seed):
    with pytest.raises(ValueError, match="k must be|seed must be"):
        sample_k_shot(LABELS, k, seed)


def test_stratified_split_counts_and_disjointness():
    kept, taken = stratified_split(LABELS, 0.3, seed=0)
    assert set(kept).isdisjoint(taken) and sorted(kept + taken) == list(range(len(LABELS)))
    # class sizes 9, 6, 5, 5; round half up of 0.3 * n: 3, 2, 2, 2
    assert Counter(LABELS[i] for i in taken) == {0: 3, 1: 2, 2: 2, 3: 2}
    assert Counter(LABELS[i] for i in kept) == {0: 6, 1: 4, 2: 3, 3: 3}


def test_stratified_split_cap_and_one_left_each_side():
    _, capped = stratified_split(LABELS, 0.9, seed=0, max_per_class=2)
    assert Counter(LABELS[i] for i in capped) == {0: 2, 1: 2, 2: 2, 3: 2}
    kept, taken = stratified_split([0, 0, 1, 1, 1], 0.01, seed=0)  # rounds to 0 but each class gives one
    assert Counter([0, 0, 1, 1, 1][i] for i in taken) == {0: 1, 1: 1} and len(kept) == 3


def test_write_selection_writes_rows_and_replaces_atomically(tmp_path):
    path = tmp_path / "run" / "sel.csv"
    rows = [{"path": "cat/a.png", "label": 0}, {"path": "dog/b.png", "label": 1}]
    assert write_selection(path, rows) == path
    with path.open(newline="") as handle:
        assert list(csv.DictReader(handle)) == [
            {"path": "cat/a.png", "label": "0"},
            {"path": "dog/b.png", "label": "1"},
        ]
    # A failing write (a row with a key the header lacks) leaves the previous file whole and no temporary file.
    with pytest.raises(ValueError):
        write_selection(path, [{"path": "x"}, {"path": "y", "extra": 1}])
    assert path.read_text().count("\n") == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["sel.csv"]
