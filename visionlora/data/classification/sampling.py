"""Seeded, stratified sampling of few-shot training sets, validation and test splits.

Few-shot results depend heavily on which k images per class are drawn, so the draw must be reproducible and
reported. Every function here draws each class with its own random stream, seeded from ``(stream, seed, label)``:
the images picked for a class depend only on the seed, the label and the order of that class's items, never on
how many other classes there are or in which order they appear.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ...files import atomic_write

# Distinct stream ids keep the k-shot draw independent of the splits even when both use the same seed.
_SHOT_STREAM = 0
_SPLIT_STREAM = 1


def sample_k_shot(labels: Sequence[int], k: int, seed: int, class_names: Sequence[str] | None = None) -> list[int]:
    """Pick exactly ``k`` items of every class, reproducibly.

    Args:
        labels: Class label (``0..C-1``) of every item.
        k: Items per class; at least 1.
        seed: Non-negative seed; the same seed always gives the same indices.
        class_names: Names of the classes, indexed by label. When given, classes with no item at all are caught
            too, and errors name the class rather than its label.

    Returns:
        Indices into ``labels``, sorted ascending, ``k`` per class.

    Raises:
        ValueError: If ``k < 1``, ``seed < 0``, or a class has fewer than ``k`` items (the message names every
            such class and its count).
    """
    if k < 1:
        raise ValueError(f"sample_k_shot: k must be >= 1, got {k}")
    groups = _indices_by_class(labels, class_names)
    short = {label: len(idx) for label, idx in groups.items() if len(idx) < k}
    if short:
        described = ", ".join(f"{_describe(label, class_names)} has {n}" for label, n in short.items())
        raise ValueError(f"sample_k_shot: fewer than k={k} images in class {described}")
    chosen = [_class_rng(_SHOT_STREAM, seed, label).choice(idx, size=k, replace=False) for label, idx in groups.items()]
    return sorted(int(i) for i in np.concatenate(chosen))


def stratified_split(
    labels: Sequence[int], fraction: float, seed: int, max_per_class: int | None = None
) -> tuple[list[int], list[int]]:
    """Split items into ``(kept, taken)`` by taking about ``fraction`` of every class.

    Each class of ``n`` items gives ``round(fraction * n)`` to ``taken``, at most ``max_per_class``; while
    ``fraction > 0`` and ``n >= 2``, at least one item goes to each side, so no class vanishes from either part.

    Args:
        labels: Class label of every item.
        fraction: Share of each class to take, in ``[0, 1]``.
        seed: Non-negative seed.
        max_per_class: Cap on the items taken from one class (``None``: no cap).

    Returns:
        ``(kept, taken)``: disjoint lists of indices into ``labels``, each sorted ascending.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"stratified_split: fraction must be in [0, 1], got {fraction}")
    kept: list[int] = []
    taken: list[int] = []
    for label, idx in _indices_by_class(labels).items():
        n_take = _split_count(len(idx), fraction, max_per_class)
        order = _class_rng(_SPLIT_STREAM, seed, label).permutation(idx)
        taken.extend(int(i) for i in order[:n_take])
        kept.extend(int(i) for i in order[n_take:])
    return sorted(kept), sorted(taken)


def write_selection(path: str | os.PathLike, rows: Sequence[Mapping[str, object]]) -> Path:
    """Write the chosen training items as a CSV file, atomically.

    The file goes to a temporary name in the same folder first and is then renamed over ``path``, so a reader
    (or a crashed run) never sees half a file.

    Args:
        path: Destination ``.csv`` file; its folder is created if needed.
        rows: One mapping per item (e.g. ``{"path": ..., "label": ..., "class_name": ...}``); the first row's keys
            give the header, in order.

    Returns:
        The path written.
    """
    path = Path(path)
    if not rows:
        raise ValueError(f"write_selection: no rows to write to {path}")

    def write(temporary: str) -> None:
        # newline="": the csv module writes its own line ends.
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
            # On disk before the rename, so a crash right after it cannot leave an empty file under the final name.
            handle.flush()
            os.fsync(handle.fileno())

    return atomic_write(path, write)


def _indices_by_class(labels: Sequence[int], class_names: Sequence[str] | None = None) -> dict[int, np.ndarray]:
    """``{label: indices of its items, ascending}`` for every label seen (and every named class), sorted by label."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be >= 0, got {int(labels.min())}")
    present = {int(label) for label in np.unique(labels)}
    if class_names is not None:
        beyond = sorted(label for label in present if label >= len(class_names))
        if beyond:
            raise ValueError(f"labels {beyond} have no entry in class_names ({len(class_names)} names)")
        present |= set(range(len(class_names)))
    return {label: np.flatnonzero(labels == label) for label in sorted(present)}


def _class_rng(stream: int, seed: int, label: int) -> np.random.Generator:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng([stream, int(seed), int(label)])


def _split_count(n: int, fraction: float, max_per_class: int | None) -> int:
    """Items to take from a class of ``n``: rounded half up, at least one each side when possible."""
    n_take = int(n * fraction + 0.5)
    if fraction > 0 and n >= 2:
        n_take = min(max(n_take, 1), n - 1)
    if max_per_class is not None:
        n_take = min(n_take, max_per_class)
    return n_take


def _describe(label: int, class_names: Sequence[str] | None) -> str:
    return f"{class_names[label]!r} (label {label})" if class_names is not None else f"label {label}"
