"""K-shot instance sampling for few-shot object detection, following TFA's protocol.

Wang et al. 2020, "Frustratingly Simple Few-Shot Object Detection" (TFA, arXiv:2003.06957), count shots as
annotated *instances*, not images: a K-shot set holds K boxes of every class. Their sampler
(``datasets/prepare_coco_few_shot.py`` in ucbdrive/few-shot-object-detection) works class by class:

1. Group the class's non-crowd annotations by image.
2. Draw images at random; an image already taken is skipped, and so is an image whose instances of the class
   would push the count past K. Otherwise all of its instances of the class are taken.
3. Stop when the count is exactly K. The draws go up a ladder of shot counts (1, 2, 3, 5, 10, 30) without
   resetting, so for one seed the 10-shot set contains the 5-shot set.
4. The K-shot file of a class lists the chosen images with *only that class's* annotations; other objects in
   those images stay unannotated (background).

:func:`sample_k_instances` does the same, with numpy streams seeded per ``(seed, label)`` instead of Python's
global ``random`` (so the exact images differ from TFA's published seed files). Two things differ on purpose:

* An image chosen for several classes becomes one record holding the chosen boxes of each of those classes.
  TFA's loader (``fsdet/data/meta_coco.py``) instead makes one record per chosen instance, the image with that
  single box; the (image, box) pairs are the same, only fewer of a class's boxes count as background here.
* Where no choice of whole images adds up to exactly K (TFA's loop would never end), up to
  :data:`_ATTEMPTS` fresh orders are tried and the closest count below K is kept, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ...files import write_text_atomic
from .coco import DetectionRecord

logger = logging.getLogger(__name__)

TFA_SHOT_LADDER = (1, 2, 3, 5, 10, 30)
_ATTEMPTS = 100
_STREAM = 2  # distinct from the classification sampler's streams in classification/sampling.py


@dataclass(frozen=True)
class InstanceSample:
    """The result of :func:`sample_k_instances`.

    Attributes:
        records: The chosen images, ascending image id, each with only the boxes of the classes it was chosen for.
        counts: ``{label: instances taken}`` for every label ``1..C``; K unless a warning said otherwise.
        image_ids: ``{label: image ids chosen for it}``, in the order they were drawn.
    """

    records: list[DetectionRecord]
    counts: dict[int, int]
    image_ids: dict[int, list[int]]


def sample_k_instances(
    records: Sequence[DetectionRecord], k: int, seed: int, class_names: Sequence[str] | None = None
) -> InstanceSample:
    """Pick images so that every class has K annotated instances (TFA's rule; see the module docstring).

    Args:
        records: The training pool (e.g. :attr:`CocoSplit.records`); labels ``1..C``.
        k: Instances per class; at least 1.
        seed: Non-negative seed; the same seed and pool always give the same sample, whatever the order of
            ``records``.
        class_names: Names of labels ``1..C``; when given, classes without any instance are caught too and
            messages name the class.

    Returns:
        The chosen records, the count per class and the image ids per class.

    Raises:
        ValueError: If ``k < 1``, ``seed < 0``, a class has fewer than ``k`` instances in the pool, or every image
            holding a class has more than ``k`` of its instances (so none can be taken).
    """
    if k < 1 or seed < 0:
        raise ValueError(f"sample_k_instances: need k >= 1 and seed >= 0, got k={k}, seed={seed}")
    by_image = {int(record.image_id): record for record in records}
    if len(by_image) != len(records):
        raise ValueError("sample_k_instances: records hold duplicate image ids")
    per_class = _instances_per_image(by_image.values(), class_names)
    short = {label: sum(c.values()) for label, c in per_class.items() if sum(c.values()) < k}
    if short:
        described = ", ".join(f"{_name(label, class_names)} has {n}" for label, n in short.items())
        raise ValueError(f"sample_k_instances: fewer than k={k} instances in the pool: {described}")
    chosen = {label: _draw_class(counts, k, seed, label, class_names) for label, counts in per_class.items()}
    counts = {label: sum(per_class[label][i] for i in ids) for label, ids in chosen.items()}
    return InstanceSample(_restrict(by_image, chosen), counts, chosen)


def write_fewshot_selection(
    path: str | os.PathLike, sample: InstanceSample, class_names: Sequence[str], **info
) -> Path:
    """Write the chosen image ids and counts per class as json, atomically (temporary file, then rename).

    Args:
        path: Destination ``.json`` file; its folder is created if needed.
        sample: What :func:`sample_k_instances` returned.
        class_names: Names of labels ``1..C``.
        **info: Extra top-level fields (seed, shots, annotation file, ...).
    """
    path = Path(path)
    content = {
        **info,
        "counts": {class_names[label - 1]: n for label, n in sample.counts.items()},
        "image_ids": {class_names[label - 1]: ids for label, ids in sample.image_ids.items()},
        "images": [
            {"image_id": r.image_id, "file_name": r.path.name, "annotation_ids": r.annotation_ids.tolist()}
            for r in sample.records
        ],
    }
    # The bytes json.dump wrote before (no trailing newline), so existing selection files compare equal.
    return write_text_atomic(path, json.dumps(content, indent=2))


def _instances_per_image(records, class_names: Sequence[str] | None) -> dict[int, dict[int, int]]:
    """``{label: {image_id: instances of label in it}}``, labels ascending, image ids ascending."""
    per_class: dict[int, dict[int, int]] = {}
    if class_names is not None:
        per_class = {label: {} for label in range(1, len(class_names) + 1)}
    for record in sorted(records, key=lambda r: r.image_id):
        for label, n in zip(*np.unique(record.labels, return_counts=True), strict=True):
            if label < 1 or (class_names is not None and label > len(class_names)):
                raise ValueError(f"sample_k_instances: image id {record.image_id} has label {label} outside 1..C")
            per_class.setdefault(int(label), {})[int(record.image_id)] = int(n)
    return dict(sorted(per_class.items()))


def _draw_class(counts: dict[int, int], k: int, seed: int, label: int, class_names) -> list[int]:
    """TFA's draw for one class: whole images, never past ``k``, up the shot ladder so smaller K nest inside."""
    rng = np.random.default_rng([_STREAM, int(seed), int(label)])
    taken: list[int] = []
    for target in [s for s in TFA_SHOT_LADDER if s < k] + [k]:
        taken = _fill(counts, taken, target, rng)
    total = sum(counts[i] for i in taken)
    if total == 0:
        raise ValueError(
            f"sample_k_instances: every image holding {_name(label, class_names)} has more than k={k} instances "
            "of it, so no image can be taken; use a larger k"
        )
    if total < k:
        logger.warning(
            "sample_k_instances: %s: no set of whole images holds exactly k=%d instances; took %d",
            _name(label, class_names), k, total,
        )  # fmt: skip
    return taken


def _fill(counts: dict[int, int], taken: list[int], target: int, rng: np.random.Generator) -> list[int]:
    """Extend ``taken`` towards ``target`` instances with images in random order, skipping any that overshoot.

    One pass over a random order is what TFA's repeated random draws amount to (an image that does not fit now
    never fits later). If it ends short of ``target``, other orders are tried and the fullest kept.
    """
    best = taken
    for _ in range(_ATTEMPTS):
        order = rng.permutation(sorted(set(counts) - set(taken)))
        current, total = list(taken), sum(counts[i] for i in taken)
        for image_id in order.tolist():
            if total + counts[image_id] <= target:
                current.append(image_id)
                total += counts[image_id]
            if total == target:
                return current
        if total > sum(counts[i] for i in best):
            best = current
    return best


def _restrict(by_image: dict[int, DetectionRecord], chosen: dict[int, list[int]]) -> list[DetectionRecord]:
    """Each chosen image with only the boxes of the classes it was chosen for, ascending image id."""
    labels_of: dict[int, set[int]] = {}
    for label, image_ids in chosen.items():
        for image_id in image_ids:
            labels_of.setdefault(image_id, set()).add(label)
    out = []
    for image_id in sorted(labels_of):
        record = by_image[image_id]
        keep = np.isin(record.labels, sorted(labels_of[image_id]))
        out.append(replace(record, boxes=record.boxes[keep], labels=record.labels[keep],
                           annotation_ids=record.annotation_ids[keep]))  # fmt: skip
    return out


def _name(label: int, class_names: Sequence[str] | None) -> str:
    return f"class {class_names[label - 1]!r} (label {label})" if class_names is not None else f"label {label}"
