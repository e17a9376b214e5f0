"""Scanning an ImageFolder-style dataset (``root/<class>/<images>``) and checking every image before training.

Two layouts are understood:

* ``root/train/<class>/...`` next to ``root/test/<class>/...`` and/or ``root/val/<class>/...``: the given split is
  used as is (``test/`` is the test set; without ``test/``, ``val/`` is).
* ``root/<class>/...``: each class is split once, stratified and with a fixed seed, into a training pool and a test
  set, so the test set never changes with the few-shot seed.

Every image is opened and decoded with PIL at scan time (:func:`~visionlora.data.common.find_bad_images`, the scan
the detection data module runs too), so a corrupt or unreadable file is reported (or skipped) before training
starts instead of crashing an epoch halfway through.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..common import find_bad_images, report_bad_images
from .sampling import stratified_split

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
BAD_IMAGE_POLICIES = ("skip", "error")
SPLIT_SEED = 0


@dataclass(frozen=True)
class ImageList:
    """Image files and their labels (indices into the dataset's class names)."""

    paths: list[Path]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class ImageFolderSplits:
    """The result of :func:`scan_imagefolder`.

    Attributes:
        class_names: Class folder names, sorted; label ``i`` is ``class_names[i]``.
        train: The training pool (few-shot images are drawn from it).
        test: The test set.
        val: The ``val/`` folder when it exists next to ``train/`` and ``test/``, else ``None``.
        bad_images: Files that could not be read and were skipped.
    """

    class_names: list[str]
    train: ImageList
    test: ImageList
    val: ImageList | None
    bad_images: list[Path]


def imagefolder_classes(root: str | os.PathLike) -> list[str]:
    """Class names of an ImageFolder dataset from its folder names alone (cheap: no image is opened).

    Raises:
        ValueError: If ``root`` is missing or not a folder, or holds fewer than two class folders.
    """
    return _class_folders(_layout(Path(root))["train"])


def scan_imagefolder(
    root: str | os.PathLike,
    test_fraction: float = 0.3,
    on_bad_image: str = "skip",
    split_seed: int = SPLIT_SEED,
) -> ImageFolderSplits:
    """List, check and split the images of an ImageFolder dataset.

    Args:
        root: Dataset folder (either layout in the module docstring).
        test_fraction: Share of each class held out as the test set when ``root`` has no ``train/``+``test/``
            split of its own; in ``(0, 1)``.
        on_bad_image: ``"skip"`` drops unreadable files and logs one warning with their count and first paths;
            ``"error"`` raises a ValueError listing them.
        split_seed: Seed of the train/test split of the single-folder layout.

    Returns:
        The class names, the training pool, the test set, the optional validation set and the skipped files.

    Raises:
        ValueError: A missing root, fewer than two class folders, a class folder with no image, different class
            folders across ``train/``/``test/``/``val/``, unreadable files with ``on_bad_image="error"``, or a
            class left with no readable image.
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
    root = Path(root)
    folders = _layout(root)
    class_names = _class_folders(folders["train"])
    for part, folder in folders.items():
        if part != "train" and folder is not None:
            _check_same_classes(folder, class_names, folders["train"])
    lists = {part: _list_images(folder, class_names) for part, folder in folders.items() if folder is not None}
    bad = _handle_bad_images(root, [p for images in lists.values() for p in images.paths], on_bad_image)
    lists = {part: _drop(images, bad, folders[part], class_names) for part, images in lists.items()}
    if "test" not in lists:
        lists["train"], lists["test"] = _split(lists["train"], test_fraction, split_seed)
    return ImageFolderSplits(class_names, lists["train"], lists["test"], lists.get("val"), sorted(bad))


def _layout(root: Path) -> dict[str, Path | None]:
    """``{"train": folder, "test": folder | None, "val": folder | None}`` for either layout."""
    if not root.is_dir():
        raise ValueError(f"imagefolder: root {str(root)!r} does not exist or is not a folder")
    train, test, val = (root / name for name in ("train", "test", "val"))
    if train.is_dir() and (test.is_dir() or val.is_dir()):
        if not test.is_dir():
            return {"train": train, "test": val, "val": None}
        return {"train": train, "test": test, "val": val if val.is_dir() else None}
    return {"train": root, "test": None, "val": None}


def _class_folders(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise ValueError(f"imagefolder: {str(folder)!r} does not exist or is not a folder")
    # Hidden folders (.ipynb_checkpoints, .git, ...) are never classes.
    names = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
    if not names:
        raise ValueError(f"imagefolder: no class folders in {str(folder)!r}; expected {folder}/<class>/<images>")
    if len(names) == 1:
        raise ValueError(
            f"imagefolder: only one class folder ({names[0]!r}) in {str(folder)!r}; root should be the folder "
            "that holds one folder per class"
        )
    return names


def _check_same_classes(folder: Path, class_names: list[str], train: Path) -> None:
    names = set(_class_folders(folder))
    missing, extra = sorted(set(class_names) - names), sorted(names - set(class_names))
    if missing or extra:
        raise ValueError(
            f"imagefolder: class folders of {str(folder)!r} differ from {str(train)!r}: "
            f"missing {missing}, not in training {extra}"
        )


def _list_images(folder: Path, class_names: list[str]) -> ImageList:
    """Image files under each class folder (recursively, sorted); raises naming every class folder with none."""
    paths: list[Path] = []
    labels: list[int] = []
    empty: list[str] = []
    for label, name in enumerate(class_names):
        files = sorted(_image_files(folder / name))
        if not files:
            empty.append(str(folder / name))
        paths += files
        labels += [label] * len(files)
    if empty:
        raise ValueError(f"imagefolder: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {empty}")
    return ImageList(paths, np.asarray(labels, dtype=np.int64))


def _image_files(folder: Path) -> list[Path]:
    # Hidden files are skipped: macOS "._name.jpg" resource forks carry image extensions but hold no image.
    return [
        Path(dirpath) / name
        for dirpath, _, filenames in os.walk(folder)
        for name in filenames
        if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS
    ]


def _handle_bad_images(root: Path, paths: list[Path], on_bad_image: str) -> set[Path]:
    return report_bad_images(find_bad_images(paths), "imagefolder", str(root), on_bad_image == "skip", logger)


def _drop(images: ImageList, bad: set[Path], folder: Path, class_names: list[str]) -> ImageList:
    """``images`` without the ``bad`` files; raises if that empties a class."""
    keep = [i for i, path in enumerate(images.paths) if path not in bad]
    labels = images.labels[keep]
    emptied = [str(folder / name) for label, name in enumerate(class_names) if not np.any(labels == label)]
    if emptied:
        raise ValueError(f"imagefolder: no readable image left in {emptied}")
    return ImageList([images.paths[i] for i in keep], labels)


def _split(images: ImageList, test_fraction: float, seed: int) -> tuple[ImageList, ImageList]:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"imagefolder: test_fraction must be in (0, 1), got {test_fraction}")
    train, test = stratified_split(images.labels, test_fraction, seed)
    return _subset(images, train), _subset(images, test)


def _subset(images: ImageList, indices: Sequence[int]) -> ImageList:
    return ImageList([images.paths[i] for i in indices], images.labels[list(indices)])
