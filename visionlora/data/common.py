"""Small pieces both the classification and the detection data code use: image reading and seeded augmentation.

Kept apart from either task's modules so that neither imports the other, and free of albumentations imports so
that the presets modules, which set albumentations' import options first, stay the only place that imports it.
"""

from __future__ import annotations

import os
import random

import numpy as np
from PIL import Image
from torch.utils.data import get_worker_info


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file as an ``H x W x 3`` uint8 array (grey, palette and alpha images converted to RGB)."""
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


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
