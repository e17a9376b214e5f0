"""Class-balanced training batches: P classes with K images each, for losses that compare images of one class.

A batch of ``batch_size`` random images from a few hundred classes rarely holds two images of one class, so a
loss that builds class prototypes inside the batch (the prototypical loss of Snell, Swersky & Zemel 2017,
arXiv:1703.05175, see :func:`visionlora.tasks.prototypes.leave_one_out_prototype_loss`) has nothing to compare.
:class:`ClassBalancedBatchSampler` builds every batch from ``batch_size // per_class`` groups of ``per_class``
images of one class each: the "P x K" batches of Hermans, Beyer & Leibe 2017 (arXiv:1703.07737).

An epoch still shows each training image at most once: every class's images are shuffled and cut into groups
of ``per_class`` (a remainder smaller than a group waits for a later epoch's shuffle), the groups of all classes
are shuffled together and dealt out ``batch_size // per_class`` at a time. Everything is drawn from the loader's
generator when the epoch starts, so its state alone (what a checkpoint saves) fixes the rest of the run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size // per_class`` groups of ``per_class`` same-class indices, seeded by ``generator``.

    Args:
        labels: The class label of every training item.
        batch_size: Items per batch; must be a multiple of ``per_class``. Each batch is full (no short last batch).
        per_class: Items of one class per group, at least 2 (a prototype needs another image of its class).
        generator: The torch generator the groups and their order are drawn from.

    Raises:
        ValueError: If ``per_class < 2``, ``batch_size`` is not a positive multiple of it, or not even one batch
            of groups can be formed (the message gives the counts).
    """

    def __init__(self, labels: Sequence[int], batch_size: int, per_class: int, generator: torch.Generator) -> None:
        if per_class < 2:
            raise ValueError(f"ClassBalancedBatchSampler: per_class must be >= 2, got {per_class}")
        if batch_size < per_class or batch_size % per_class:
            raise ValueError(f"ClassBalancedBatchSampler: batch_size {batch_size} must be a positive multiple of "
                             f"per_class {per_class}")
        labels = np.asarray(labels)
        self._members = [np.flatnonzero(labels == label) for label in np.unique(labels)]
        self.batch_size, self.per_class, self.generator = batch_size, per_class, generator
        groups = sum(len(members) // per_class for members in self._members)
        if groups < batch_size // per_class:
            raise ValueError(f"ClassBalancedBatchSampler: {len(labels)} images in {len(self._members)} classes make "
                             f"{groups} groups of {per_class}, fewer than the {batch_size // per_class} of one batch "
                             f"of {batch_size}")
        self._batches = groups // (batch_size // per_class)

    def __len__(self) -> int:
        return self._batches

    def __iter__(self) -> Iterator[list[int]]:
        groups = []
        for members in self._members:
            shuffled = members[self._permutation(len(members))]
            usable = len(members) - len(members) % self.per_class
            groups.extend(shuffled[:usable].reshape(-1, self.per_class))
        order = self._permutation(len(groups))
        per_batch = self.batch_size // self.per_class
        for start in range(0, self._batches * per_batch, per_batch):
            yield [int(i) for g in order[start:start + per_batch] for i in groups[g]]

    def _permutation(self, n: int) -> np.ndarray:
        return torch.randperm(n, generator=self.generator).numpy()
