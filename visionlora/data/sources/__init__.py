"""The registry of named datasets: every ``dataset`` name the data modules and the benchmark accept.

Classification (``FewShotDataModule``): ``digits``, ``imagefolder``, ``digits+omniglot``, ``omniglot`` and
``torchvision:<pets|flowers102|aircraft|food101|cars>``. Detection (``CocoDetectionDataModule``): ``synthetic``,
``synthetic_night``, ``synthetic_base`` and ``coco``. Each entry (:mod:`.base`) answers what the data modules ask
of a dataset, so nothing outside this registry branches on a dataset's name; the entries sit beside the datasets
they describe (``digits``, ``omniglot``, ``imagefolder``, ``torchvision_sets``, ``synthetic_scenes``, ``coco``).

A dataset of one's own is one ``register_classification_source`` or ``register_detection_source`` call, made on
import of the module that defines it (so spawned worker processes, which re-import modules, know it too).
"""

from __future__ import annotations

from .base import (
    ClassificationPools,
    ClassificationSource,
    DetectionSource,
    LabelledImages,
    SourceOptions,
)
from .coco import COCO
from .digits import DIGITS
from .imagefolder import IMAGEFOLDER
from .omniglot import (
    DIGITS_WITH_OMNIGLOT,
    OMNIGLOT,
    OMNIGLOT_DEV,
    OMNIGLOT_DEV_56,
    OMNIGLOT_DEV_ROT4,
    OMNIGLOT_UNIQUE,
    OMNIGLOT_UNIQUE_56,
    OMNIGLOT_UNIQUE_ROT4,
)
from .synthetic_scenes import SYNTHETIC, SYNTHETIC_BASE, SYNTHETIC_NIGHT
from .torchvision_sets import SOURCES as TORCHVISION_SOURCES

_CLASSIFICATION: dict[str, ClassificationSource] = {}
_DETECTION: dict[str, DetectionSource] = {}


def register_classification_source(source: ClassificationSource) -> ClassificationSource:
    """Add ``source`` under ``source.name``; raises ValueError if the name is taken. Returns ``source``."""
    return _register(_CLASSIFICATION, source, ClassificationSource, "classification")


def register_detection_source(source: DetectionSource) -> DetectionSource:
    """Add ``source`` under ``source.name``; raises ValueError if the name is taken. Returns ``source``."""
    return _register(_DETECTION, source, DetectionSource, "detection")


def classification_source_names() -> tuple[str, ...]:
    """Every registered classification dataset name, in registration order."""
    return tuple(_CLASSIFICATION)


def detection_source_names() -> tuple[str, ...]:
    """Every registered detection dataset name, in registration order."""
    return tuple(_DETECTION)


def classification_source(name: str) -> ClassificationSource:
    """The classification source registered as ``name``.

    Raises:
        ValueError: If no source has that name; the message lists every registered name.
    """
    return _lookup(_CLASSIFICATION, name, "classification")


def detection_source(name: str) -> DetectionSource:
    """The detection source registered as ``name``.

    Raises:
        ValueError: If no source has that name; the message lists every registered name.
    """
    return _lookup(_DETECTION, name, "detection")


def _register(table: dict, source, kind: type, task: str):
    if not isinstance(source, kind):
        raise TypeError(f"register_{task}_source: expected a {kind.__name__}, got {type(source).__name__}")
    if source.name in table:
        raise ValueError(f"register_{task}_source: a {task} dataset named {source.name!r} is already registered")
    table[source.name] = source
    return source


def _lookup(table: dict, name: str, task: str):
    if name not in table:
        raise ValueError(f"{task} dataset must be one of {tuple(table)}, got {name!r}")
    return table[name]


for _source in (DIGITS, IMAGEFOLDER, DIGITS_WITH_OMNIGLOT, OMNIGLOT, OMNIGLOT_UNIQUE, OMNIGLOT_DEV,
                OMNIGLOT_UNIQUE_56, OMNIGLOT_DEV_56, OMNIGLOT_UNIQUE_ROT4, OMNIGLOT_DEV_ROT4,
                *TORCHVISION_SOURCES):
    register_classification_source(_source)
for _source in (SYNTHETIC, SYNTHETIC_NIGHT, SYNTHETIC_BASE, COCO):
    register_detection_source(_source)
del _source

__all__ = [
    "ClassificationPools",
    "ClassificationSource",
    "DetectionSource",
    "LabelledImages",
    "SourceOptions",
    "classification_source",
    "classification_source_names",
    "detection_source",
    "detection_source_names",
    "register_classification_source",
    "register_detection_source",
]
