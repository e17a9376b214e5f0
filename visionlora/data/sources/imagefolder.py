"""The ``imagefolder`` source: any ``root/<class>/<images>`` folder, through the scan of ``classification.imagefolder``.

Its own split is used when the folder has one (``train/`` with ``test/`` and/or ``val/``); otherwise each class is
split once with a fixed seed. The selection file records each training image's path relative to ``root``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from ..classification.imagefolder import ImageList, imagefolder_classes, scan_imagefolder
from .base import ClassificationPools, ClassificationSource, LabelledImages, SourceOptions


def relative_paths(paths: Sequence[str | os.PathLike], root: str | os.PathLike) -> list[str]:
    """``paths`` relative to ``root``, with forward slashes (the ``path`` column of a selection file)."""
    return [Path(path).relative_to(root).as_posix() for path in paths]


def _list_classes(options: SourceOptions) -> list[str]:
    return imagefolder_classes(options.root)


def _read(options: SourceOptions) -> ClassificationPools:
    found = scan_imagefolder(options.root, options.test_fraction, options.on_bad_image)
    val = _labelled(found.val) if found.val is not None else None
    return ClassificationPools(found.class_names, _labelled(found.train), _labelled(found.test), val,
                               partial(relative_paths, found.train.paths, options.root))


def _labelled(images: ImageList) -> LabelledImages:
    return LabelledImages(images.paths, images.labels)


IMAGEFOLDER = ClassificationSource(
    name="imagefolder",
    list_classes=_list_classes,
    read=_read,
    selection_column="path",
    root_help="the image folder, root/<class>/<images> or root/train + root/test and/or root/val",
)
