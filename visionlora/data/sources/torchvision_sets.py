"""The FGVC few-shot suite from torchvision's dataset classes, read from where the user keeps them (no download).

Oxford-IIIT Pets, Flowers-102, FGVC-Aircraft, Food-101 and Stanford Cars, as used by the FGVC few-shot protocol
(e.g. Jie & Deng 2022, arXiv:2207.07039). torchvision checks the files and parses the official split lists; the
image paths and labels are taken from the dataset object so images are read lazily like any ImageFolder. Each set
is registered as the source ``torchvision:<name>``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torchvision

from .base import ClassificationPools, ClassificationSource, LabelledImages, SourceOptions
from .imagefolder import relative_paths

PREFIX = "torchvision:"

# benchmark name -> (torchvision class, constructor arguments of the training pool, of the test split)
SETS: dict[str, tuple[str, dict, dict]] = {
    "pets": ("OxfordIIITPet", {"split": "trainval"}, {"split": "test"}),
    "flowers102": ("Flowers102", {"split": "train"}, {"split": "test"}),
    "aircraft": ("FGVCAircraft", {"split": "trainval"}, {"split": "test"}),
    "food101": ("Food101", {"split": "train"}, {"split": "test"}),
    "cars": ("StanfordCars", {"split": "train"}, {"split": "test"}),
}


def torchvision_split(name: str, root: str | Path, part: str) -> tuple[list[str], np.ndarray, list[str]]:
    """``(image paths, labels, class names)`` of the ``train`` pool or the ``test`` split of dataset ``name``.

    Raises:
        ValueError: Unknown ``name`` or ``part``.
        FileNotFoundError: The dataset is not under ``root`` in torchvision's layout (the message says which).
    """
    if name not in SETS:
        raise ValueError(f"torchvision dataset must be one of {sorted(SETS)}, got {name!r}")
    if part not in ("train", "test"):
        raise ValueError(f"part must be 'train' or 'test', got {part!r}")
    class_name, train_args, test_args = SETS[name]
    try:
        dataset = getattr(torchvision.datasets, class_name)(str(root), download=False,
                                                            **(train_args if part == "train" else test_args))
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise FileNotFoundError(f"{class_name} not found under {root} ({error})") from error
    paths, labels = _files_and_labels(dataset)
    classes = list(getattr(dataset, "classes", [])) or [str(c) for c in range(int(labels.max()) + 1)]
    return paths, labels, classes


def _files_and_labels(dataset) -> tuple[list[str], np.ndarray]:
    if hasattr(dataset, "_samples"):  # StanfordCars
        paths, labels = zip(*dataset._samples, strict=True)
    else:
        paths = getattr(dataset, "_image_files", None) or dataset._images
        labels = dataset._labels
    return [str(p) for p in paths], np.asarray(labels, dtype=np.int64)


def _list_classes(name: str, options: SourceOptions) -> list[str]:
    return torchvision_split(name, options.root, "train")[2]


def _read(name: str, options: SourceOptions) -> ClassificationPools:
    train, labels, names = torchvision_split(name, options.root, "train")
    test, test_labels, _ = torchvision_split(name, options.root, "test")
    return ClassificationPools(names, LabelledImages(train, labels), LabelledImages(test, test_labels), None,
                               partial(relative_paths, train, options.root))


# Registered as ``torchvision:<name>``; preprocessing as for any ImageFolder of photos.
SOURCES = tuple(
    ClassificationSource(
        name=f"{PREFIX}{name}",
        list_classes=partial(_list_classes, name),
        read=partial(_read, name),
        selection_column="path",
        root_help=f"the folder torchvision's {class_name} dataset lives in",
    )
    for name, (class_name, _, _) in SETS.items()
)
