"""Small pieces both the classification and the detection data code use: image reading and checking, and seeded
augmentation.

Images are read the same way by both tasks: 16-bit grey images (PIL modes ``I;16*`` and ``I``) are scaled to the
8-bit range (``round(v / 257)``) instead of being clipped to white, palette, grey and alpha images become RGB.
Classification turns photos upright by their EXIF orientation (what a viewer shows, and what a client's PIL
pipeline should do too); detection reads the pixels as stored, the frame COCO's boxes and width/height refer to.

:func:`find_bad_images` and :func:`report_bad_images` are the setup scan both data modules run on every image file
before training (a corrupt file is reported, or skipped, before an epoch crashes on it).

Kept apart from either task's modules so that neither imports the other, and free of albumentations imports so
that the presets modules, which set albumentations' import options first, stay the only place that imports it.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, get_worker_info

# PIL modes of 16-bit (and 32-bit integer) grey images, whose convert("RGB") clips every value above 255 to white.
_WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_UINT16_TO_UINT8 = 257.0  # 65535 / 255
_SHOWN_PATHS = 5  # paths quoted in the skip warning; the error lists up to _LISTED_PATHS
_LISTED_PATHS = 20


def load_rgb(path: str | os.PathLike, exif_transpose: bool = True) -> np.ndarray:
    """An image file as an ``H x W x 3`` uint8 array.

    Args:
        path: The image file.
        exif_transpose: Turn the image by its EXIF orientation (``PIL.ImageOps.exif_transpose``), as viewers show
            it; False keeps the pixels as stored (COCO's convention for boxes).

    Grey, palette and alpha images are converted to RGB; 16-bit grey images (modes ``I;16*``, and ``I`` taken as
    16-bit, clipped to 0..65535) are scaled to 0..255 by ``round(v / 257)``.
    """
    with Image.open(path) as image:
        if exif_transpose:
            image = ImageOps.exif_transpose(image)
        return to_rgb_array(image)


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """``image`` as an ``H x W x 3`` uint8 array, 16-bit grey scaled to 8 bits (see :func:`load_rgb`)."""
    if image.mode in _WIDE_GREY_MODES:
        wide = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
        grey = np.round(wide / _UINT16_TO_UINT8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.array(image.convert("RGB"))


def find_bad_images(paths: Sequence[Path], num_threads: int = 8) -> dict[Path, str]:
    """``{path: reason}`` for every file PIL cannot open, verify and fully decode."""
    # Decoding is mostly I/O and C code that releases the GIL, so threads speed up large folders.
    with ThreadPoolExecutor(max_workers=max(1, min(num_threads, len(paths)))) as pool:
        reasons = list(pool.map(_unreadable_reason, paths))
    return {path: reason for path, reason in zip(paths, reasons, strict=True) if reason is not None}


def report_bad_images(bad: Mapping[Path, str], owner: str, where: str, skip: bool, log: logging.Logger) -> set[Path]:
    """Raise for unreadable files, or warn once and return them to be left out.

    Args:
        bad: What :func:`find_bad_images` found.
        owner: Who scanned, the message prefix (``"imagefolder"``, ``"coco"``).
        where: The folder (or annotation file) the files belong to, for the message.
        skip: True: log one warning with their count and first paths; False: raise.
        log: The logger of the module that scanned.

    Returns:
        The bad paths (empty when there are none).

    Raises:
        ValueError: With ``skip=False`` and any bad file, listing up to 20 of them with the reason.
    """
    if not bad:
        return set()
    if not skip:
        listed = "\n".join(f"  {path}: {reason}" for path, reason in sorted(bad.items())[:_LISTED_PATHS])
        more = f"\n  ... and {len(bad) - _LISTED_PATHS} more" if len(bad) > _LISTED_PATHS else ""
        raise ValueError(f"{owner}: {len(bad)} unreadable image file(s) under {where!r}:\n{listed}{more}")
    shown = ", ".join(str(path) for path in sorted(bad)[:_SHOWN_PATHS])
    more = ", ..." if len(bad) > _SHOWN_PATHS else ""
    log.warning("%s: skipping %d unreadable image file(s) under %s: %s%s", owner, len(bad), where, shown, more)
    return set(bad)


def _unreadable_reason(path: Path) -> str | None:
    try:
        # verify() checks the container without decoding; load() then decodes every pixel (and catches truncation).
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
    except Exception as err:  # noqa: BLE001 - any failure of PIL on this file means "unreadable"
        return f"{type(err).__name__}: {err}"
    return None


def seed_transform(transform, seed: int) -> None:
    """Give every step of ``transform`` (an ``A.Compose``) one shared random stream seeded with ``seed``.

    ``A.Compose(seed=...)`` seeds each step with the *same* seed, so e.g. the flip and the crop would draw the
    same numbers; sharing one generator avoids that correlation.
    """
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: give each worker's augmentation its own reproducible random stream.

    Without it, every worker would hold a copy of the same albumentations generator state and apply identical
    augmentations. ``info.seed`` comes from the loader's seeded generator, so runs stay reproducible.
    """
    info = get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_random_state"):
        seed_transform(transform, info.seed % 2**32)


def make_loader(dataset, batch_size: int, num_workers: int, shuffle: bool = False, generator=None, sampler=None,
                collate_fn=None, batch_sampler=None) -> DataLoader:
    """The DataLoader of both data modules: seeded worker augmentation (:func:`seed_worker`), workers kept
    between epochs when there are any, pinned memory when CUDA is there; the last batch may be smaller.
    A ``batch_sampler`` replaces ``batch_size``, ``shuffle`` and ``sampler``: it forms the batches itself."""
    batching = {"batch_sampler": batch_sampler} if batch_sampler is not None else {
        "batch_size": batch_size, "shuffle": shuffle, "sampler": sampler, "drop_last": False}
    return DataLoader(dataset, **batching, generator=generator, collate_fn=collate_fn, num_workers=num_workers,
                      worker_init_fn=seed_worker, persistent_workers=num_workers > 0,
                      pin_memory=torch.cuda.is_available())
