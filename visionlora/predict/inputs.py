"""What to predict on: image files, folders (recursive), glob patterns or text files listing paths, checked first.

Every image is opened and decoded before any prediction, so an unreadable file is skipped with a count (and
listed in the output) or, with ``on_bad="error"``, stops the run before anything is written.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from visionlora.data import IMAGE_EXTENSIONS, find_bad_images

LIST_SUFFIXES = (".txt", ".lst")
BAD_POLICIES = ("skip", "error")


@dataclass
class Inputs:
    """The images to predict on, in order, and what was left out.

    Attributes:
        paths: Readable images, in the order given (folders sorted), each once.
        bad: ``{path: reason}`` of the unreadable ones that were skipped.
        labels: The true label name of each path when the input is one ImageFolder (``<root>/<class>/...``) whose
            class folders are all label names of the model; else None.
    """

    paths: list[Path]
    bad: dict[Path, str]
    labels: list[str] | None = None


def collect_inputs(items: list[str], on_bad: str = "skip", label_names: list[str] | None = None) -> Inputs:
    """Expand ``items`` into image paths and check each image.

    Raises:
        ValueError: An item that is no file, folder, matching pattern or list file; no image at all;
            unreadable images with ``on_bad="error"`` (each named).
    """
    if on_bad not in BAD_POLICIES:
        raise ValueError(f"on_bad must be one of {BAD_POLICIES}, got {on_bad!r}")
    paths = list(dict.fromkeys(path for item in items for path in _expand(item)))
    if not paths:
        raise ValueError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in INPUT {' '.join(items)}")
    bad = find_bad_images(paths)
    if bad and on_bad == "error":
        listed = "; ".join(f"{path}: {reason}" for path, reason in sorted(bad.items())[:5])
        raise ValueError(f"{len(bad)} unreadable image(s): {listed}")
    readable = [path for path in paths if path not in bad]
    if not readable:
        raise ValueError(f"none of the {len(paths)} images in INPUT can be read")
    return Inputs(readable, bad, _folder_labels(items, readable, label_names))


def _expand(item: str) -> list[Path]:
    path = Path(item)
    if path.is_dir():
        return sorted(_image_files(path))
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        listed = [Path(line.strip()) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        missing = [str(p) for p in listed if not p.is_file()]
        if missing:
            raise ValueError(f"INPUT list {path}: {len(missing)} listed file(s) do not exist, e.g. {missing[0]}")
        return listed
    if path.is_file():
        return [path]
    if glob.has_magic(item):
        return [Path(p) for p in sorted(glob.glob(item, recursive=True)) if _is_image(Path(p))]
    raise ValueError(f"INPUT {item}: no such file, folder or matching pattern")


def _image_files(folder: Path) -> list[Path]:
    # Hidden files and folders are skipped (macOS "._x.jpg" forks, .ipynb_checkpoints).
    return [Path(parent) / name for parent, folders, names in os.walk(folder)
            if not any(part.startswith(".") for part in Path(parent).relative_to(folder).parts)
            for name in names if not name.startswith(".") and _is_image(Path(name))]


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _folder_labels(items: list[str], paths: list[Path], label_names: list[str] | None) -> list[str] | None:
    """Each path's class folder name when ``items`` is one folder of class folders named like the model's labels."""
    if label_names is None or len(items) != 1 or not Path(items[0]).is_dir():
        return None
    root = Path(items[0])
    parts = [path.relative_to(root).parts for path in paths]
    if any(len(p) < 2 for p in parts) or not {p[0] for p in parts} <= set(label_names):
        return None
    return [p[0] for p in parts]


def annotated_inputs(annotations: str, items: list[str], on_bad: str = "skip") -> tuple[Inputs, list]:
    """The images a COCO file lists, in the one INPUT folder its ``file_name`` entries are relative to, with their
    records (boxes, labels and image ids) in the same order; unreadable images are left out of both."""
    from visionlora.data.detection.coco import load_coco

    if len(items) != 1 or not Path(items[0]).is_dir():
        raise ValueError("with --annotations, INPUT is the one folder its file_name entries are relative to")
    records = load_coco(annotations, items[0], on_bad="drop" if on_bad == "skip" else "error").records
    inputs = collect_inputs([str(record.path) for record in records], on_bad)
    readable = set(inputs.paths)
    kept = [record for record in records if record.path in readable]
    return Inputs([record.path for record in kept], inputs.bad), kept
