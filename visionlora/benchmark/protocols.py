"""Few-shot protocols: which images each benchmark cell trains and tests on.

- ``kshot``: k labelled images per class (seeded), tested on the dataset's whole test split; the FGVC few-shot
  fine-tuning protocol (e.g. Jie & Deng 2022, "Convolutional bypasses are better vision transformer adapters").
- ``episodic``: N-way K-shot episodes with a query set drawn from the dataset's classes (Vinyals et al. 2016,
  "Matching networks for one shot learning", arXiv:1606.04080); reported as the mean over episodes with a 95% CI.
- ``omniglot``: the 20 official within-alphabet 20-way 1-shot runs of Lake, Salakhutdinov & Tenenbaum (2015,
  Science 350(6266)).
- ``omniglot-validation``: the same kind of task from the background data alone, for choosing a recipe without
  looking at the runs: within-alphabet 20-way 1-shot episodes (one support drawer, another query drawer) from the
  background alphabets ``VALIDATION_ALPHABETS``, which the validation backbones' pretraining (``omniglot-dev``)
  leaves out.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionlora.data import FewShotDataModule, sample_k_shot
from visionlora.data.classification.datamodule import resolve_preprocessing
from visionlora.data.classification.presets import normalize_data_config
from visionlora.data.sources import classification_source
from visionlora.data.sources.omniglot_episodes import (
    NUM_RUNS,
    RUNS_ARCHIVE,
    omniglot_one_shot_runs,
    omniglot_validation_episodes,
)

from .cells import CellData

PROTOCOLS = ("kshot", "episodic", "omniglot", "omniglot-validation")
ONE_SHOT_PROTOCOLS = ("omniglot", "omniglot-validation")  # 20-way 1-shot, reported as error rates
# A validation cell's trial is seed * EPISODES_PER_SEED + episode, so every (seed, episode) has its own key.
EPISODES_PER_SEED = 1000
__all__ = ["EPISODES_PER_SEED", "NUM_RUNS", "ONE_SHOT_PROTOCOLS", "PROTOCOLS", "CellKey", "check_runs_root",
           "data_module", "draw_episode", "episodic_cells",
           "kshot_cells", "omniglot_cells", "omniglot_validation_cells",
           "runs_preprocessing"]


@dataclass(frozen=True)
class CellKey:
    """What identifies a cell in the results file (with the method and backbone)."""

    shots: int
    ways: int
    trial: int  # the seed (kshot), the episode (episodic) or the official run (omniglot)


def data_module(dataset: str, root: str | None, classes: str) -> FewShotDataModule:
    """The dataset's whole training pool and test split (shots drawn here, not by the module).

    ``dataset`` is any ``FewShotDataModule`` dataset, ``torchvision:<name>`` for the FGVC suite (``pets``,
    ``flowers102``, ``aircraft``, ``food101``, ``cars``, under ``root`` in torchvision's layout) included.
    """
    return FewShotDataModule(dataset=dataset, root=root, classes=classes, shots=None, val_fraction=0.0)


def kshot_cells(data: FewShotDataModule, shots: list[int], seeds: list[int]) -> Iterator[tuple[CellKey, CellData]]:
    """k images per class from the training pool for every (k, seed); the test split is always the same."""
    pool, test = data.raw_split("train"), data.raw_split("test")
    for k in shots:
        for seed in seeds:
            chosen = np.asarray(sample_k_shot(pool.labels, k, seed, data.class_names))
            yield CellKey(k, data.num_classes, seed), CellData(
                _take(pool.images, chosen), pool.labels[chosen], test.images, test.labels, data.num_classes)


def episodic_cells(data: FewShotDataModule, ways: int, shots: list[int], queries: int, episodes: int,
                   first_episode: int = 0) -> Iterator[tuple[CellKey, CellData]]:
    """Episodes of ``ways`` classes, ``k`` support and ``queries`` query images each, from train pool + test split.

    Episode ``e`` is drawn with seed ``e`` (independent of k, so the classes of episode e are the same at every k).
    """
    pool, test = data.raw_split("train"), data.raw_split("test")
    images = _concat(pool.images, test.images)
    labels = np.concatenate([pool.labels, test.labels])
    if ways > data.num_classes:
        raise ValueError(f"episodic: {ways}-way episodes need {ways} classes, the dataset has {data.num_classes}")
    for k in shots:
        for episode in range(first_episode, first_episode + episodes):
            support, query, episode_labels = draw_episode(labels, ways, k, queries, episode)
            yield CellKey(k, ways, episode), CellData(
                _take(images, support), episode_labels[0], _take(images, query), episode_labels[1], ways)


def draw_episode(labels: np.ndarray, ways: int, shots: int, queries: int, seed: int
                 ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Indices of the support and query images and their episode labels ``0..ways-1`` (disjoint sets)."""
    rng = np.random.default_rng(seed)
    classes = np.sort(rng.choice(np.unique(labels), size=ways, replace=False))
    support, query = [], []
    for cls in classes:
        members = np.flatnonzero(labels == cls)
        if len(members) < shots + queries:
            raise ValueError(f"episodic: class {cls} has {len(members)} images, needs {shots} + {queries}")
        picked = rng.choice(members, size=shots + queries, replace=False)
        support.append(picked[:shots])
        query.append(picked[shots:])
    relabel = {int(c): i for i, c in enumerate(classes)}
    support_idx, query_idx = np.concatenate(support), np.concatenate(query)
    to_episode = np.vectorize(lambda c: relabel[int(c)])
    return support_idx, query_idx, (to_episode(labels[support_idx]), to_episode(labels[query_idx]))


def runs_preprocessing(backbone_config: dict) -> dict:
    """``FewShotDataModule("omniglot").preprocessing`` for a backbone (what ``resnet_omniglot`` was trained with),
    without building that module: listing its classes reads the background archives, which the runs do not need.

    Args:
        backbone_config: The backbone's data config (timm's ``resolve_model_data_config`` or our keys).
    """
    return resolve_preprocessing({}, classification_source("omniglot").preprocessing,
                                 normalize_data_config(backbone_config))


def check_runs_root(root: str) -> None:
    """Raise naming ``root`` unless it is a folder (``omniglot_one_shot_runs`` then names a missing all_runs.zip)."""
    if not Path(root).is_dir():
        raise FileNotFoundError(f"root {root} is not a folder: pass --root DIR, the folder holding Omniglot's "
                                f"{RUNS_ARCHIVE}.zip (or its unpacked {RUNS_ARCHIVE}/)")


def omniglot_cells(root: str, runs: list[int] | None = None, raw: bool = False, render: str = "centred"
                   ) -> Iterator[tuple[CellKey, CellData]]:
    """The official 20-way 1-shot runs (all 20 unless ``runs`` lists run numbers 1-20), in the centred render the
    backbones see (``render``: the one the backbone was trained on); with ``raw`` also their native 105x105 images
    (``CellData.raw_*``, for ``raw-nn``)."""
    native = {run.run_id: run for run in omniglot_one_shot_runs(root, render="native")} if raw else {}
    for run in omniglot_one_shot_runs(root, render):
        if runs is None or run.run_id in runs:
            stored = native.get(run.run_id)
            yield CellKey(1, 20, run.run_id), CellData(
                run.train_images, run.train_labels, run.test_images, run.test_labels,
                len(np.unique(run.train_labels)), raw_train_images=None if stored is None else stored.train_images,
                raw_test_images=None if stored is None else stored.test_images)


def omniglot_validation_cells(root: str, episodes: int, seeds: list[int], render: str = "centred"
                              ) -> Iterator[tuple[CellKey, CellData]]:
    """``episodes`` validation episodes per seed (``omniglot_validation_episodes``), in a centred render."""
    if episodes >= EPISODES_PER_SEED:
        raise ValueError(f"omniglot-validation: at most {EPISODES_PER_SEED - 1} episodes per seed, got {episodes}")
    for seed in seeds:
        for run in omniglot_validation_episodes(root, episodes, seed, render=render):
            yield CellKey(1, len(run.train_labels), seed * EPISODES_PER_SEED + run.run_id), CellData(
                run.train_images, run.train_labels, run.test_images, run.test_labels, len(run.train_labels))


def _take(images, indices: np.ndarray):
    return images[indices] if isinstance(images, np.ndarray) else [images[i] for i in indices]


def _concat(first, second):
    if isinstance(first, np.ndarray) and isinstance(second, np.ndarray):
        return np.concatenate([first, second])
    return list(first) + list(second)
