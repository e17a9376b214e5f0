"""The one-shot problems of Omniglot: the 20 official runs and validation episodes built in their style.

The 20 official one-shot runs (Lake, Salakhutdinov & Tenenbaum 2015; ``all_runs.zip``) are each a 20-way 1-shot
problem inside one evaluation alphabet: one training image of each of 20 characters and 20 test images drawn by
other people. The validation episodes are the same kind of problem drawn from background alphabets, for choosing a
recipe without looking at the runs. Images come in the renders of :mod:`.omniglot`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .omniglot import (
    BACKGROUND_SMALL,
    DRAWERS,
    VALIDATION_ALPHABETS,
    _cached_read_background,
    _check_render,
    _drawers,
    _read_tree,
    _render,
)

RUNS_ARCHIVE = "all_runs"
NUM_RUNS = 20
RUN_WAYS = 20


@dataclass(frozen=True, eq=False)  # eq on numpy fields would raise, not compare
class OneShotRun:
    """One official 20-way 1-shot run: a training image per character, 20 test images to classify.

    Attributes:
        run_id: 1..20 (``runNN`` in the archive).
        train_images: ``[20, H, W, 3]`` uint8, ink bright on black; row ``k`` is ``training/class{k+1:02d}.png``.
        train_labels: ``[20]`` int64, ``0..19`` (the row index: each character appears once).
        test_images: ``[20, H, W, 3]`` uint8; row ``i`` is ``test/item{i+1:02d}.png``.
        test_labels: ``[20]`` int64, the training label of each test item as ``class_labels.txt`` gives it.
    """

    run_id: int
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def omniglot_validation_episodes(root: str | Path, episodes: int = 30, seed: int = 0,
                                 alphabets: Sequence[str] = VALIDATION_ALPHABETS, ways: int = RUN_WAYS,
                                 render: str = "centred") -> list[OneShotRun]:
    """Within-alphabet ``ways``-way 1-shot episodes in the official runs' style, from background alphabets.

    Episode ``e`` (drawn with ``numpy.random.default_rng([seed, e])``) takes the alphabet ``alphabets[e % len]``,
    ``ways`` of its characters, one support drawer and another query drawer: one support image per character from
    the first drawer, one query image per character from the second, queries in a shuffled order. Only the
    validation backbones' pretraining (``omniglot-dev``) leaves these alphabets out; a backbone trained on all
    background characters has seen them.

    Returns:
        ``episodes`` :class:`OneShotRun` (``run_id`` = episode number), support labels ``0..ways-1``.
    """
    if episodes < 1 or ways < 2:
        raise ValueError(f"omniglot: validation episodes need episodes >= 1 and ways >= 2, got {episodes}, {ways}")
    images, labels, names, files = _cached_read_background(str(root), BACKGROUND_SMALL, render)
    drawers = _drawers(files)
    by_alphabet = {a: [c for c, name in enumerate(names) if name.split("/")[1] == a] for a in alphabets}
    for alphabet, characters in by_alphabet.items():
        if len(characters) < ways:
            raise ValueError(f"omniglot: validation alphabet {alphabet!r} has {len(characters)} characters in "
                             f"{BACKGROUND_SMALL}, a {ways}-way episode needs {ways}")
    lookup = {(int(c), int(d)): i for i, (c, d) in enumerate(zip(labels, drawers, strict=True))}
    runs = []
    for episode in range(episodes):
        rng = np.random.default_rng([seed, episode])
        characters = np.sort(rng.choice(by_alphabet[alphabets[episode % len(alphabets)]], ways, replace=False))
        support_drawer, query_drawer = rng.choice(np.arange(1, DRAWERS + 1), 2, replace=False)
        order = rng.permutation(ways)
        support = [lookup[(int(c), int(support_drawer))] for c in characters]
        query = [lookup[(int(characters[k]), int(query_drawer))] for k in order]
        runs.append(OneShotRun(run_id=episode, train_images=images[support],
                               train_labels=np.arange(ways, dtype=np.int64), test_images=images[query],
                               test_labels=order.astype(np.int64)))
    return runs


def omniglot_one_shot_runs(root: str | Path, render: str = "centred") -> list[OneShotRun]:
    """The 20 official within-alphabet 20-way 1-shot runs of Lake et al. (2015), checked.

    Args:
        root: Folder holding ``all_runs.zip`` or its unpacked ``all_runs/`` folder (``all_runs/runNN/...``).
        render: One of ``RENDERS``; use the render the backbone was trained on (``"centred"`` for the bundled
            ``resnet_omniglot``).

    Returns:
        The runs in order ``run01``..``run20``.

    Raises:
        FileNotFoundError: If neither the archive nor the folder exists.
        ValueError: Naming the archive and file, if a run, image or ``class_labels.txt`` line is missing or wrong.
    """
    _check_render(render)
    source, files = _read_tree(Path(root), RUNS_ARCHIVE)
    run_names = sorted({name.split("/")[0] for name in files if re.fullmatch(r"run\d\d/.+", name)})
    expected = [f"run{i:02d}" for i in range(1, NUM_RUNS + 1)]
    if run_names != expected:
        raise ValueError(f"omniglot: {source} must hold run01..run{NUM_RUNS:02d}, found {run_names}")
    return [_one_shot_run(source, files, index, render) for index in range(1, NUM_RUNS + 1)]


def _one_shot_run(source: Path, files: dict[str, bytes], run_id: int, render: str) -> OneShotRun:
    run = f"run{run_id:02d}"
    train = [f"{run}/training/class{k:02d}.png" for k in range(1, RUN_WAYS + 1)]
    test = [f"{run}/test/item{k:02d}.png" for k in range(1, RUN_WAYS + 1)]
    missing = [name for name in train + test if name not in files]
    if missing:
        raise ValueError(f"omniglot: {source} lacks {len(missing)} image(s) of {run}, e.g. {missing[0]}")
    answers = _class_labels(source, files, run, train)
    unlabelled = [name for name in test if name not in answers]
    if unlabelled or len(answers) != RUN_WAYS:
        raise ValueError(f"omniglot: {source}: {run}/class_labels.txt must map each of the {RUN_WAYS} test items "
                         f"once; it maps {len(answers)}, missing {unlabelled[:3]}")
    images = [np.stack([_render(files[name], render) for name in names]) for names in (train, test)]
    return OneShotRun(run_id=run_id, train_images=images[0], train_labels=np.arange(RUN_WAYS, dtype=np.int64),
                      test_images=images[1],
                      test_labels=np.asarray([train.index(answers[n]) for n in test], dtype=np.int64))


def _class_labels(source: Path, files: dict[str, bytes], run: str, train: list[str]) -> dict[str, str]:
    """``{test item: training image}`` from ``runNN/class_labels.txt`` (one "test training" pair a line)."""
    name = f"{run}/class_labels.txt"
    if name not in files:
        raise ValueError(f"omniglot: {source} lacks {name}")
    answers = {}
    for number, line in enumerate(files[name].decode().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in train:
            raise ValueError(f"omniglot: {source}: {name} line {number} is not '<test item> <training image>' "
                             f"of {run}: {line!r}")
        answers[fields[0]] = fields[1]
    return answers
