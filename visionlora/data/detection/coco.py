"""Reading and checking COCO-format detection annotations (``images``, ``annotations``, ``categories``).

Real annotation files carry mistakes: boxes past the image border, zero-size boxes, unknown category ids,
annotations of images that are not listed or whose file is missing. :func:`load_coco` finds every one before
training starts and either drops it (one summarising warning with a count per kind of problem and a first
example) or raises naming the record. A file that is not COCO at all (no ``images`` list, an image without
``file_name``, duplicate ids) always raises.

Category ids, which COCO leaves sparse (1..90 for 80 classes), become contiguous labels ``1..C`` in ascending id
order; label 0 is the background, as torchvision's detectors expect. Crowd annotations (``iscrowd=1``) are valid
COCO but mark regions a plain detector cannot learn from; like torchvision's reference scripts and TFA's
few-shot sampler, they are left out of the targets (and counted in a log line).

:func:`check_image_files` is the second half of the check, run by the data module at setup on every split: each
image file is decoded once (the classification scan, :func:`~visionlora.data.common.find_bad_images`), unreadable
ones are dropped with one counted warning or raise, and a file whose stored size differs from its record's
``width``/``height`` is an error (the boxes would be misplaced). Pixels count as stored, COCO's convention: the
EXIF orientation is not applied.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..common import find_bad_images, report_bad_images

logger = logging.getLogger(__name__)

BAD_POLICIES = ("drop", "error")
_LISTED_MISMATCHES = 5  # size mismatches quoted in the error
_EXIF_ORIENTATION = 0x0112
_EXIF_TURNS = frozenset({5, 6, 7, 8})  # orientations that swap width and height
CLIP_TOLERANCE = 1.0  # pixels a box may pass the border by (rounding) before it counts as a problem
PROBLEMS = {
    "unknown_image": "annotation refers to an image id missing from 'images'",
    "missing_file": "image file not found on disk (the image and its annotations are dropped)",
    "unknown_category": "annotation's category_id is not in 'categories'",
    "invalid_box": "bbox is not 4 finite numbers with width > 0 and height > 0",
    "outside_image": "box lies entirely outside the image",
    "clipped_box": f"box extends more than {CLIP_TOLERANCE:g} px beyond the image (clipped to it)",
}


@dataclass(frozen=True)
class DetectionRecord:
    """One image and its object boxes.

    Attributes:
        image_id: The COCO image id.
        path: The image file.
        width: Image width in pixels, as the json states it.
        height: Image height in pixels.
        boxes: ``float32 [N, 4]`` absolute ``x0, y0, x1, y1`` pixel-edge coordinates, inside the image.
        labels: ``int64 [N]`` contiguous labels ``1..C``.
        annotation_ids: ``int64 [N]`` COCO annotation ids of the boxes.
    """

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    annotation_ids: np.ndarray


@dataclass(frozen=True)
class CocoSplit:
    """The result of :func:`load_coco`.

    Attributes:
        records: One per kept image, in ascending image id.
        class_names: Category names; label ``i + 1`` is ``class_names[i]``.
        category_ids: COCO category ids; label ``i + 1`` is ``category_ids[i]``.
        problems: ``{kind: count}`` of the problems found (kinds as in :data:`PROBLEMS`).
        num_crowd: Crowd annotations left out.
        num_empty_dropped: Images dropped because they had no (usable) annotation.
    """

    records: list[DetectionRecord]
    class_names: list[str]
    category_ids: list[int]
    problems: dict[str, int]
    num_crowd: int = 0
    num_empty_dropped: int = 0


def read_coco_categories(annotation_json: str | os.PathLike) -> tuple[list[int], list[str]]:
    """``(category ids ascending, their names)`` of a COCO file, checked (non-empty, unique ids, names present)."""
    path = Path(annotation_json)
    return _categories(_read_json(path), path)


def load_coco(
    annotation_json: str | os.PathLike,
    image_dir: str | os.PathLike,
    on_bad: str = "drop",
    keep_empty: bool = True,
) -> CocoSplit:
    """Read a COCO detection file, check every image and annotation, and return clean records.

    Args:
        annotation_json: The COCO json file.
        image_dir: Folder that ``file_name`` is relative to.
        on_bad: ``"drop"``: leave out bad annotations (and images whose file is missing), clip boxes that pass
            the border, and log one warning with the count of each kind of problem and its first example;
            ``"error"``: raise a ValueError at the first problem, naming the annotation id, image file and
            category id. Boxes within :data:`CLIP_TOLERANCE` px of the border are clipped silently either way.
        keep_empty: Keep images without any usable annotation (negatives: they teach the detector what is not
            an object); False drops them.

    Returns:
        The records (ascending image id), class names and category ids, and the problem counts.

    Raises:
        ValueError: If the file is not COCO detection json (missing lists or fields, duplicate ids), or a
            problem is found with ``on_bad="error"``.
    """
    if on_bad not in BAD_POLICIES:
        raise ValueError(f"load_coco: on_bad must be one of {BAD_POLICIES}, got {on_bad!r}")
    path, image_dir = Path(annotation_json), Path(image_dir)
    data = _read_json(path)
    category_ids, class_names = _categories(data, path)
    images = _images(data, path)
    problems = _Problems(path, on_bad)
    missing = _missing_files(images, image_dir, problems)
    label_of = {cat_id: label for label, cat_id in enumerate(category_ids, start=1)}
    boxes: dict[int, list[tuple[list[float], int, int]]] = {image_id: [] for image_id in images}
    num_crowd = 0
    for index, ann in enumerate(_list(data, "annotations", path)):
        if ann.get("iscrowd", 0):
            num_crowd += 1
            continue
        checked = _check_annotation(ann, index, images, label_of, problems, image_dir)
        if checked is not None and checked[0] not in missing:
            boxes[checked[0]].append(checked[1:])
    present = {image_id: found for image_id, found in sorted(boxes.items()) if image_id not in missing}
    records = [_record(i, images[i], image_dir, found) for i, found in present.items() if found or keep_empty]
    num_empty = len(present) - len(records)
    problems.warn_once()
    if num_crowd or num_empty:
        logger.info("coco: %s: left out %d crowd annotations and %d empty images", path, num_crowd, num_empty)
    return CocoSplit(records, class_names, category_ids, problems.counts, num_crowd, num_empty)


def check_image_files(records: Sequence[DetectionRecord], on_bad: str, where: str | os.PathLike
                      ) -> list[DetectionRecord]:
    """Decode every record's image file; leave out (``"drop"``) or raise on (``"error"``) unreadable ones.

    Args:
        records: What :func:`load_coco` returned (their files exist).
        on_bad: ``"drop"``: one warning with the count and first paths, the records left out; ``"error"``: a
            ValueError listing the files and why PIL cannot read them.
        where: The annotation file, for the messages.

    Returns:
        The records whose image decodes, in their order.

    Raises:
        ValueError: Unreadable files with ``on_bad="error"``, or (either way) an image whose stored size is not
            its record's ``width`` x ``height``, naming the file and both sizes.
    """
    if on_bad not in BAD_POLICIES:
        raise ValueError(f"check_image_files: on_bad must be one of {BAD_POLICIES}, got {on_bad!r}")
    bad = find_bad_images([record.path for record in records])
    dropped = report_bad_images(bad, "coco", str(where), on_bad == "drop", logger)
    kept = [record for record in records if record.path not in dropped]
    _check_sizes(kept, where)
    return kept


def _check_sizes(records: Sequence[DetectionRecord], where: str | os.PathLike) -> None:
    """Raise naming the images whose stored size differs from their record (boxes are in the record's frame)."""
    wrong = []
    for record in records:
        with Image.open(record.path) as image:  # only the header is read
            size = image.size
            turned = image.getexif().get(_EXIF_ORIENTATION, 1) in _EXIF_TURNS
        if size != (record.width, record.height):
            hint = " (its EXIF orientation turns it: COCO sizes and boxes are of the stored pixels)" if turned else ""
            wrong.append(f"{record.path} is {size[0]}x{size[1]} but its annotation record says "
                         f"{record.width}x{record.height} (image id {record.image_id}){hint}")
    if wrong:
        more = f"; and {len(wrong) - _LISTED_MISMATCHES} more" if len(wrong) > _LISTED_MISMATCHES else ""
        raise ValueError(f"coco: {where}: {len(wrong)} image(s) differ in size from their annotation record: "
                         f"{'; '.join(wrong[:_LISTED_MISMATCHES])}{more}")


class _Problems:
    """Counts problems by kind with a first example each (``"drop"``), or raises at the first (``"error"``)."""

    def __init__(self, path: Path, on_bad: str) -> None:
        self.path, self.on_bad = path, on_bad
        self.counts: dict[str, int] = {}
        self.examples: dict[str, str] = {}

    def add(self, kind: str, where: str) -> None:
        if self.on_bad == "error":
            raise ValueError(f"coco: {self.path}: {where}: {PROBLEMS[kind]}")
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.examples.setdefault(kind, where)

    def warn_once(self) -> None:
        if not self.counts:
            return
        lines = [f"  {kind}: {n} ({PROBLEMS[kind]}), e.g. {self.examples[kind]}" for kind, n in self.counts.items()]
        logger.warning("coco: %s: %d problem(s) handled:\n%s", self.path, sum(self.counts.values()), "\n".join(lines))


def _missing_files(images: dict[int, dict], image_dir: Path, problems: _Problems) -> set[int]:
    """Ids of the images whose file is not on disk (each reported as a ``missing_file`` problem)."""
    missing = set()
    for image_id, image in images.items():
        if not (image_dir / image["file_name"]).is_file():
            problems.add("missing_file", f"image id {image_id}, file {str(image_dir / image['file_name'])!r}")
            missing.add(image_id)
    return missing


def _check_annotation(ann: dict, index: int, images: dict, label_of: dict, problems: _Problems, image_dir: Path):
    """``(image_id, box xyxy, label, annotation id)`` of a usable annotation (clipped if needed), else None."""
    ann_id, image_id, cat_id = ann.get("id", f"#{index}"), ann.get("image_id"), ann.get("category_id")
    image = images.get(image_id)
    file_name = str(image_dir / image["file_name"]) if image is not None else "<not listed>"
    where = f"annotation id {ann_id} (image id {image_id}, file {file_name!r}, category id {cat_id})"
    if image is None:
        problems.add("unknown_image", where)
        return None
    if cat_id not in label_of:
        problems.add("unknown_category", where)
        return None
    box = _xyxy(ann.get("bbox"))
    if box is None:
        problems.add("invalid_box", f"{where}: bbox {ann.get('bbox')!r}")
        return None
    clipped = _clip(box, image["width"], image["height"])
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        problems.add("outside_image", f"{where}: bbox {ann['bbox']} in a {image['width']}x{image['height']} image")
        return None
    if max(abs(a - b) for a, b in zip(box, clipped, strict=True)) > CLIP_TOLERANCE:
        problems.add("clipped_box", f"{where}: bbox {ann['bbox']} in a {image['width']}x{image['height']} image")
    return image_id, clipped, label_of[cat_id], int(ann_id) if isinstance(ann_id, int) else -1


def _xyxy(bbox) -> list[float] | None:
    """COCO ``[x, y, w, h]`` as ``[x0, y0, x1, y1]``, or None unless 4 finite numbers with ``w > 0`` and ``h > 0``."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        return None
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h] if w > 0 and h > 0 else None


def _clip(box: list[float], width: int, height: int) -> list[float]:
    x0, y0, x1, y1 = box
    return [min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height)]


def _record(image_id: int, image: dict, image_dir: Path, found: list) -> DetectionRecord:
    boxes = np.asarray([box for box, _, _ in found], dtype=np.float32).reshape(-1, 4)
    return DetectionRecord(
        image_id=int(image_id),
        path=image_dir / image["file_name"],
        width=int(image["width"]),
        height=int(image["height"]),
        boxes=boxes,
        labels=np.asarray([label for _, label, _ in found], dtype=np.int64),
        annotation_ids=np.asarray([ann_id for _, _, ann_id in found], dtype=np.int64),
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"coco: annotation file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"coco: {path} is not valid json: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"coco: {path} holds a {type(data).__name__}, expected a COCO object with 'images' etc.")
    return data


def _list(data: dict, key: str, path: Path) -> list[dict]:
    value = data.get(key)
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ValueError(f"coco: {path}: '{key}' must be a list of objects, got {type(value).__name__}")
    return value


def _categories(data: dict, path: Path) -> tuple[list[int], list[str]]:
    categories = _list(data, "categories", path)
    if not categories:
        raise ValueError(f"coco: {path}: 'categories' is empty")
    names: dict[int, str] = {}
    for index, cat in enumerate(categories):
        cat_id, name = cat.get("id"), cat.get("name")
        if not isinstance(cat_id, int) or isinstance(cat_id, bool) or not isinstance(name, str):
            raise ValueError(f"coco: {path}: category #{index} {cat} needs an integer 'id' and a string 'name'")
        if cat_id in names:
            raise ValueError(f"coco: {path}: category id {cat_id} appears twice ({names[cat_id]!r}, {name!r})")
        names[cat_id] = name
    ids = sorted(names)
    return ids, [names[i] for i in ids]


def _images(data: dict, path: Path) -> dict[int, dict]:
    images: dict[int, dict] = {}
    for index, image in enumerate(_list(data, "images", path)):
        image_id, size = image.get("id"), (image.get("width"), image.get("height"))
        usable = isinstance(image_id, int) and isinstance(image.get("file_name"), str)
        if not usable or not all(isinstance(v, int) and v > 0 for v in size):
            raise ValueError(
                f"coco: {path}: image #{index} {image} needs an integer 'id', a 'file_name' and positive integer "
                "'width' and 'height'"
            )
        if image_id in images:
            raise ValueError(f"coco: {path}: image id {image_id} appears twice")
        images[image_id] = image
    return images
