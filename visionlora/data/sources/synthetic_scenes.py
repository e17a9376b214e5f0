"""Synthetic detection scenes: coloured shapes on cluttered backgrounds, written as COCO json + PNG files.

An embedded object detection dataset that needs no download, for few-shot detection recipes and tests. Six
classes differ in outline and texture (circle, square, triangle, cross, ring, striped bar); objects vary in size
(about 8% to 50% of the image side), colour, rotation and position, may partly hide each other (each keeps at
least :data:`MIN_VISIBLE` of its pixels), and sit on a gradient with noise, random lines and elongated blobs that
are not objects. Boxes are the tight boxes of the visible pixels of each object as drawn (COCO's convention of
boxes around the visible extent), not of its nominal shape.

Every scene is drawn from its own random stream, seeded with ``(seed, split, index)``: the same arguments give
byte-identical PNG files and json, and the first ``n`` images do not change when more are asked for.

Six other classes, :data:`BASE_CLASS_NAMES` (pentagon, hexagon, ellipse, arrow, L-shape, checkered square), make a
disjoint *base* dataset for pretraining a backbone before few-shot fine-tuning on the six *novel* classes above,
as in TFA's base/novel split (Wang et al. 2020, "Frustratingly Simple Few-Shot Object Detection",
arXiv:2003.06957): related outlines and textures, never the target classes themselves.

Registered as the detection sources ``synthetic``, ``synthetic_night`` and ``synthetic_base`` (bottom of the file).
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ...files import staged_folder
from .base import DetectionSource

logger = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "stripes")
DEFAULT_ROOT = "data/synthetic_scenes"
DEFAULT_SPLITS: dict[str, int] = {"train": 300, "val": 100, "test": 100}
# The base (pretraining) classes and their dataset: another seed, so no base scene shares a novel scene's background.
BASE_CLASS_NAMES: tuple[str, ...] = ("pentagon", "hexagon", "ellipse", "arrow", "lshape", "checker")
BASE_ROOT = "data/synthetic_scenes_base"
BASE_SPLITS: dict[str, int] = {"train": 2000, "val": 100, "test": 200}
BASE_SEED = 1
DEFAULT_IMAGE_SIZE = 128
# How scenes are seen: in colour, or by a grey, noisy "night" camera (the same scenes under a domain shift).
CAMERAS = ("colour", "night")
NIGHT_ROOT = "data/synthetic_scenes_night"
NIGHT_NOISE = 30.0
DEFAULT_SEED = 0
MAX_OBJECTS = 4
MIN_VISIBLE = 0.6  # share of an object's pixels that must stay visible when later objects overlap it
GENERATOR_VERSION = 1  # bump when the drawing changes, so an old folder is not silently reused
MARKER_FILE = "generation.json"
_MIN_CONTRAST = 70.0  # mean absolute RGB difference between an object and the background under it
_PLACEMENT_TRIES = 30


@dataclass(frozen=True)
class Scene:
    """One rendered scene: the ``H x W x 3`` uint8 image and, per object, its label (1..C) and visible mask."""

    image: np.ndarray
    labels: list[int]
    masks: list[np.ndarray]


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of scene ``index`` of ``split`` (crc32 keeps the split's stream stable across runs)."""
    return np.random.default_rng([int(seed), zlib.crc32(split.encode()), int(index)])


def shape_mask(class_name: str, centre: tuple[float, float], radius: float, angle: float, size: int) -> np.ndarray:
    """The pixels of one shape on a ``size x size`` canvas, as a bool mask (drawn without antialiasing).

    Args:
        class_name: One of :data:`CLASS_NAMES` or :data:`BASE_CLASS_NAMES`.
        centre: ``(x, y)`` of the shape's centre, in pixels.
        radius: Circumradius in pixels: the shape fits in the circle of this radius around ``centre``.
        angle: Rotation in radians (circles and rings look the same at any angle).
        size: Side of the square canvas.
    """
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = centre
    if class_name in ("circle", "ring"):
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=1)
        if class_name == "ring":
            inner = 0.55 * radius
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    else:
        draw.polygon(_outline(class_name, centre, radius, angle), fill=1)
    return np.array(canvas, dtype=bool)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight ``(x0, y0, x1, y1)`` box of a non-empty mask in pixel-edge coordinates (pixel ``i`` spans ``[i, i+1)``)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("mask_box: the mask is empty")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def render_scene(rng: np.random.Generator, size: int = DEFAULT_IMAGE_SIZE,
                 classes: tuple[str, ...] = CLASS_NAMES, camera: str = "colour") -> Scene:
    """Draw a cluttered background and 1 to :data:`MAX_OBJECTS` shapes of ``classes`` (labels 1..C) with ``rng``.

    ``camera`` is how the scene is seen (:data:`CAMERAS`): ``colour``, or ``night``, the same scene in luminance
    only with heavy sensor noise, a domain shift for cross-domain few-shot detection.
    """
    if camera not in CAMERAS:
        raise ValueError(f"camera must be one of {CAMERAS}, got {camera!r}")
    image = _background(rng, size)
    labels: list[int] = []
    full: list[np.ndarray] = []
    visible: list[np.ndarray] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        label = int(rng.integers(len(classes))) + 1
        placed = _place(rng, classes[label - 1], size, full, visible)
        if placed is None:
            continue
        mask, angle = placed
        _paint(rng, image, classes[label - 1], mask, angle)
        # Later objects hide parts of earlier ones: each box must follow what is left visible.
        visible = [vis & ~mask for vis in visible] + [mask]
        full.append(mask)
        labels.append(label)
    noisy = image.astype(np.float32) + rng.normal(0.0, 6.0, image.shape)
    image = np.clip(noisy, 0, 255).astype(np.uint8)
    return Scene(night_camera(image, rng) if camera == "night" else image, labels, visible)


def night_camera(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The scene in luminance only (colour contrast is gone) plus Gaussian sensor noise of std :data:`NIGHT_NOISE`."""
    grey = image.astype(np.float32).mean(axis=2, keepdims=True).repeat(3, axis=2)
    return np.clip(grey + rng.normal(0.0, NIGHT_NOISE, grey.shape), 0, 255).astype(np.uint8)


def generate_scenes(
    out_dir: str | os.PathLike,
    num_images: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = DEFAULT_SEED,
    split: str = "train",
    classes: tuple[str, ...] = CLASS_NAMES,
    camera: str = "colour",
) -> Path:
    """Write ``num_images`` scenes to ``out_dir/<split>/images/*.png`` and ``out_dir/<split>/annotations.json``.

    The json is valid COCO: ``images`` (ids from 1), ``annotations`` with ``bbox`` ``[x, y, w, h]`` (integers,
    tight around the visible pixels), ``area`` (visible pixel count) and ``iscrowd`` 0, and ``categories`` with
    ids ``1..C`` in ``classes`` order (:data:`CLASS_NAMES`, or :data:`BASE_CLASS_NAMES` for the base dataset).

    Returns:
        The path of the annotation file.
    """
    if num_images < 1 or image_size < 32:
        raise ValueError(f"generate_scenes: need num_images >= 1 and image_size >= 32, got {num_images}, {image_size}")
    image_dir = Path(out_dir) / split / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        scene = render_scene(scene_rng(seed, split, index), image_size, tuple(classes), camera)
        image_id, file_name = index + 1, f"{index:06d}.png"
        Image.fromarray(scene.image).save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for label, mask in zip(scene.labels, scene.masks, strict=True):
            x0, y0, x1, y1 = mask_box(mask)
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                 "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(mask.sum()), "iscrowd": 0}
            )  # fmt: skip
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(classes)]
    info = {"description": "visionlora synthetic scenes", "seed": seed, "split": split, "version": GENERATOR_VERSION,
            "camera": camera}
    coco = {"info": info, "images": images, "annotations": annotations, "categories": categories}
    path = Path(out_dir) / split / "annotations.json"
    path.write_text(json.dumps(coco), encoding="utf-8")
    return path


def ensure_synthetic_scenes(
    root: str | os.PathLike = DEFAULT_ROOT,
    splits: dict[str, int] | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = DEFAULT_SEED,
    classes: tuple[str, ...] = CLASS_NAMES,
    camera: str = "colour",
) -> Path:
    """Generate the scenes under ``root`` once; later calls with the same settings reuse them.

    Generation writes into a temporary folder next to ``root`` and renames it into place, so a crash or a
    concurrent run (several DDP ranks, parallel tests) never leaves or reads a half-written dataset.

    Args:
        root: Destination folder (relative paths are taken from the current directory).
        splits: ``{split: number of images}``; default :data:`DEFAULT_SPLITS`.
        image_size: Side of the square images.
        seed: Seed of the scenes.
        classes: Shape classes to draw: :data:`CLASS_NAMES` (the novel, few-shot classes) or
            :data:`BASE_CLASS_NAMES` (the disjoint pretraining classes, with :data:`BASE_ROOT` and :data:`BASE_SEED`).
        camera: ``colour`` or ``night`` (see :func:`render_scene`).

    Returns:
        ``root``, holding ``<split>/images/*.png``, ``<split>/annotations.json`` and ``generation.json``.

    Raises:
        ValueError: If ``root`` exists but was made with other settings or not by this function.
    """
    root = Path(root)
    wanted = {"version": GENERATOR_VERSION, "splits": dict(splits or DEFAULT_SPLITS), "image_size": image_size,
              "seed": seed}  # fmt: skip
    if tuple(classes) != CLASS_NAMES:
        # Only recorded when not the default, so folders generated before base classes existed stay valid.
        wanted["classes"] = list(classes)
    if camera != "colour":
        wanted["camera"] = camera
    if root.exists():
        return _check_marker(root, wanted)
    try:
        with staged_folder(root) as staging:
            for split, count in wanted["splits"].items():
                generate_scenes(staging, count, image_size, seed, split, tuple(classes), camera)
            (staging / MARKER_FILE).write_text(json.dumps(wanted, indent=2), encoding="utf-8")
    except OSError:
        # staged_folder has removed its folder. If another process finished first, the move onto its folder failed
        # (FileExistsError, or ENOTEMPTY when it appeared mid-move); its folder is as good as ours if the settings
        # match.
        if not root.exists():
            raise
        return _check_marker(root, wanted)
    logger.info("synthetic_scenes: generated %s under %s", wanted["splits"], root)
    return root


def _check_marker(root: Path, wanted: dict) -> Path:
    marker = root / MARKER_FILE
    found = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None
    if found != wanted:
        raise ValueError(
            f"synthetic_scenes: {root} exists but holds {found if found else 'no ' + MARKER_FILE} instead of "
            f"{wanted}; delete the folder to regenerate it, or pass another root"
        )
    return root


def _outline(class_name: str, centre: tuple[float, float], radius: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape: unit-circle outline, scaled by ``radius``, rotated by ``angle``, moved to centre."""
    if class_name == "square":
        points = [(np.cos(a), np.sin(a)) for a in np.pi / 4 + np.arange(4) * np.pi / 2]
    elif class_name == "triangle":
        points = [(np.cos(a), np.sin(a)) for a in -np.pi / 2 + np.arange(3) * 2 * np.pi / 3]
    elif class_name == "cross":
        # A plus sign with arms 2a wide, outlined one quarter turn at a time, scaled so its corners touch the circle.
        a = 0.33
        quarter = [(a, 1.0), (a, a), (1.0, a)]
        points = [(x, y) for turn in range(4) for x, y in _turned(quarter, -turn * np.pi / 2)]
        points = [(x / np.hypot(1.0, a), y / np.hypot(1.0, a)) for x, y in points]
    elif class_name == "stripes":
        points = [(0.9, 0.44), (0.9, -0.44), (-0.9, -0.44), (-0.9, 0.44)]
    elif class_name in _BASE_OUTLINES:
        points = _BASE_OUTLINES[class_name]
    else:
        raise ValueError(f"synthetic_scenes: unknown shape {class_name!r}; expected one of "
                         f"{CLASS_NAMES + BASE_CLASS_NAMES}")
    cx, cy = centre
    return [(cx + radius * x, cy + radius * y) for x, y in _turned(points, angle)]


def _regular(sides: int) -> list[tuple[float, float]]:
    return [(float(np.cos(a)), float(np.sin(a))) for a in -np.pi / 2 + np.arange(sides) * 2 * np.pi / sides]


# Unit-circle outlines of the base shapes. The ellipse (aspect 1.8) stays rounder than the background blobs
# (aspect >= 3); the checker is a square whose texture _paint draws.
_BASE_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "pentagon": _regular(5),
    "hexagon": _regular(6),
    "ellipse": [(float(np.cos(t)), float(np.sin(t)) / 1.8) for t in np.linspace(0, 2 * np.pi, 32, endpoint=False)],
    "arrow": [(1.0, 0.0), (0.2, 0.6), (0.2, 0.22), (-0.95, 0.22), (-0.95, -0.22), (0.2, -0.22), (0.2, -0.6)],
    "lshape": [(-0.65, -0.65), (-0.2, -0.65), (-0.2, 0.2), (0.65, 0.2), (0.65, 0.65), (-0.65, 0.65)],
    "checker": _regular(4),
}


def _turned(points, angle: float) -> list[tuple[float, float]]:
    """``points`` rotated by ``angle`` radians around the origin."""
    cos, sin = np.cos(angle), np.sin(angle)
    return [(float(x * cos - y * sin), float(x * sin + y * cos)) for x, y in points]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear gradient between two muted colours, crossed by random lines and elongated blobs (clutter)."""
    start, end = rng.uniform(30, 200, 3), rng.uniform(30, 200, 3)
    direction = rng.normal(size=2)
    yy, xx = np.mgrid[0:size, 0:size] / size
    t = (xx * direction[0] + yy * direction[1])[..., None]
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    canvas = Image.fromarray((start + t * (end - start)).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 7))):
        colour = tuple(int(c) for c in rng.uniform(20, 235, 3))
        if rng.random() < 0.5:
            draw.line([tuple(rng.uniform(0, size, 2)), tuple(rng.uniform(0, size, 2))], fill=colour,
                      width=int(rng.integers(1, 3)))  # fmt: skip
        else:
            # Blobs are long thin ellipses (aspect >= 3) so that none of them passes for a circle or ring.
            length, angle, (cx, cy) = rng.uniform(0.05, 0.2) * size, rng.uniform(0, np.pi), rng.uniform(0, size, 2)
            ts = np.linspace(0, 2 * np.pi, 24, endpoint=False)
            outline = zip(length * np.cos(ts), length / rng.uniform(3, 6) * np.sin(ts), strict=True)
            draw.polygon([(cx + x, cy + y) for x, y in _turned(outline, angle)], fill=colour)
    return np.array(canvas)


def _place(rng: np.random.Generator, class_name: str, size: int, full: list[np.ndarray], visible: list[np.ndarray]):
    """A ``(mask, angle)`` leaving each earlier object ``MIN_VISIBLE`` of its pixels visible; None after many tries."""
    low, high = max(4.0, 0.04 * size), 0.25 * size  # circumradius: diameters from ~8% to 50% of the side
    for _ in range(_PLACEMENT_TRIES):
        radius = float(np.exp(rng.uniform(np.log(low), np.log(high))))
        centre = (float(rng.uniform(radius, size - radius)), float(rng.uniform(radius, size - radius)))
        angle = float(rng.uniform(0, 2 * np.pi))
        mask = shape_mask(class_name, centre, radius, angle, size)
        kept = [(vis & ~mask).sum() >= MIN_VISIBLE * whole.sum() for whole, vis in zip(full, visible, strict=True)]
        if mask.any() and all(kept):
            return mask, angle
    return None


def _paint(rng: np.random.Generator, image: np.ndarray, class_name: str, mask: np.ndarray, angle: float) -> None:
    """Fill ``mask`` in place with a colour that stands out from the background; stripes and checker get two."""
    under = image[mask].astype(np.float32).mean(axis=0)
    colours = [_contrasting(rng, under)]
    colours.append(_contrasting(rng, colours[0].astype(np.float32)))
    if class_name not in ("stripes", "checker"):
        image[mask] = colours[0]
        return
    # Stripes run across the bar's long axis, about a fifth of the bar's length wide each.
    ys, xs = np.nonzero(mask)
    if class_name == "checker":
        # 3 x 3 cells along the square's sides (its vertices sit at angle - 90 degrees, so its sides at +45).
        angle += np.pi / 4
    along = (xs - xs.mean()) * np.cos(angle) + (ys - ys.mean()) * np.sin(angle)
    band = _bands(along, 5 if class_name == "stripes" else 3)
    if class_name == "checker":
        across = (ys - ys.mean()) * np.cos(angle) - (xs - xs.mean()) * np.sin(angle)
        band = (band + _bands(across, 3)) % 2
    image[ys, xs] = np.asarray(colours, dtype=np.uint8)[band]


def _bands(coordinate: np.ndarray, count: int) -> np.ndarray:
    """0/1 alternating bands, ``count`` across the extent of ``coordinate``."""
    width = max(float(np.ptp(coordinate)) / count, 1.0)
    return ((coordinate - coordinate.min()) // width).astype(np.int64) % 2


def _contrasting(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    colour = rng.uniform(0, 255, 3)
    for _ in range(20):
        if np.abs(colour - under).mean() >= _MIN_CONTRAST:
            break
        colour = rng.uniform(0, 255, 3)
    return colour.astype(np.uint8)


def _categories(classes: tuple[str, ...], annotations: Path) -> tuple[None, list[str]]:
    """The classes of generated scenes, known before they exist (category ids are ``1..C``, nothing to check)."""
    return None, list(classes)


SYNTHETIC = DetectionSource(name="synthetic", categories=partial(_categories, CLASS_NAMES),
                            default_root=DEFAULT_ROOT, scenes={"classes": CLASS_NAMES})
# The same scenes seen by a grey, noisy camera: a domain shift.
SYNTHETIC_NIGHT = DetectionSource(name="synthetic_night", categories=partial(_categories, CLASS_NAMES),
                                  default_root=NIGHT_ROOT, scenes={"classes": CLASS_NAMES, "camera": "night"})
# The six disjoint base shapes, 2000 training images, for pretraining a backbone.
SYNTHETIC_BASE = DetectionSource(
    name="synthetic_base",
    categories=partial(_categories, BASE_CLASS_NAMES),
    default_root=BASE_ROOT,
    scenes={"classes": BASE_CLASS_NAMES, "splits": BASE_SPLITS, "seed": BASE_SEED},
)
