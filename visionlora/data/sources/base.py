"""What a named dataset tells the data modules: the entry types of the source registry (``visionlora.data.sources``).

A *classification source* says, from its name alone, its class names (cheap: before ``setup``), how to read its
training pool, test split and optional validation split, what identifies a training image in the selection file,
its preprocessing defaults and whether it needs a ``root``. A *detection source* says its class names, its default
root and how to generate its scenes, or that it reads an existing COCO folder. The data modules only ever ask
these questions, so a new dataset is a new entry, never a new branch on its name.

Entries hold module-level functions (or ``functools.partial`` of them) so that they pickle, as Lightning's
spawning strategies need.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The preprocessing keys a classification source may set a default for; the data module falls back to the
# backbone's or its own defaults for the rest.
PREPROCESSING_DEFAULT_KEYS = ("crop_pct", "hflip", "crop_scale", "affine")


@dataclass(frozen=True)
class SourceOptions:
    """The data module's arguments a classification source may use.

    Attributes:
        root: The dataset's folder (ImageFolder, Omniglot archives, torchvision's layout), or None.
        classes: Digits class set: ``"novel"``, ``"base"`` or ``"all"``.
        test_fraction: ImageFolder: share of each class held out for testing when there is no test split.
        on_bad_image: ImageFolder: ``"skip"`` or ``"error"`` for unreadable files.
    """

    root: str | None = None
    classes: str = "novel"
    test_fraction: float = 0.3
    on_bad_image: str = "skip"


@dataclass(frozen=True, eq=False)  # eq on numpy fields would raise, not compare
class LabelledImages:
    """Images, ``[N, H, W, 3]`` uint8 in memory or ``N`` file paths, and their ``[N]`` int64 labels."""

    images: np.ndarray | Sequence[str | os.PathLike]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True, eq=False)
class ClassificationPools:
    """What a classification source reads at setup.

    Attributes:
        class_names: Class names in label order (the same as the source listed before setup).
        train: The training pool the shots are drawn from.
        test: The test split.
        val: The validation split when the dataset has its own, else None.
        selection_ids: Called only when a selection file is written: one id per training-pool image, what
            identifies it outside this package (listing them can cost time on large datasets).
    """

    class_names: list[str]
    train: LabelledImages
    test: LabelledImages
    val: LabelledImages | None
    selection_ids: Callable[[], list]


@dataclass(frozen=True)
class ClassificationSource:
    """A named classification dataset, as ``FewShotDataModule(dataset=name)`` reads it.

    Attributes:
        name: The registry name (``FewShotDataModule``'s ``dataset``).
        list_classes: ``(options) -> class names`` in label order, cheap (folder or file names, no decoding).
        read: ``(options) -> ClassificationPools``.
        selection_column: The selection file's id column: ``digits_index``, ``omniglot_file`` or ``path``.
        needs_root: Whether ``root`` is required (True) or must be left unset (False).
        root_help: What ``root`` is, for the error when it is missing.
        preprocessing: Defaults for any of :data:`PREPROCESSING_DEFAULT_KEYS`; explicit arguments win.
    """

    name: str
    list_classes: Callable[[SourceOptions], list[str]]
    read: Callable[[SourceOptions], ClassificationPools]
    selection_column: str
    needs_root: bool = True
    root_help: str = ""
    preprocessing: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.preprocessing) - set(PREPROCESSING_DEFAULT_KEYS))
        if unknown:
            raise ValueError(f"source {self.name!r}: unknown preprocessing keys {unknown}; "
                             f"expected some of {PREPROCESSING_DEFAULT_KEYS}")


@dataclass(frozen=True)
class DetectionSource:
    """A named detection dataset, as ``CocoDetectionDataModule(dataset=name)`` reads it: COCO json per split.

    Attributes:
        name: The registry name (``CocoDetectionDataModule``'s ``dataset``).
        categories: ``(training json path) -> (COCO category ids or None, class names)``, cheap (before setup):
            label ``i + 1`` is ``class_names[i]``. Generated scenes know theirs without reading the json (ids None:
            nothing to compare the splits' ids with); a COCO folder reads them from the json.
        default_root: Where the scenes are generated when no ``root`` is given (relative to the working
            directory); None for a COCO folder.
        scenes: Keyword arguments of :func:`~visionlora.data.sources.synthetic_scenes.ensure_synthetic_scenes`
            that generate the dataset under its root; None for a COCO folder, which is read as it is.
    """

    name: str
    categories: Callable[[Path], tuple[list[int] | None, list[str]]]
    default_root: str | None = None
    scenes: Mapping[str, object] | None = None

    def __post_init__(self) -> None:
        if (self.scenes is None) != (self.default_root is None):
            raise ValueError(f"source {self.name!r}: generated scenes need both default_root and scenes, "
                             "a COCO folder neither")

    @property
    def generated(self) -> bool:
        """Whether the data is generated here (its layout is known before it exists) rather than read."""
        return self.scenes is not None
