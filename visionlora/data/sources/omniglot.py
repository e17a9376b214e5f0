"""Omniglot (Lake, Salakhutdinov & Tenenbaum 2015, Science 350(6266)) read from the official archive layout.

The archives (``images_background_small1.zip``, ``images_background_small2.zip``, ``all_runs.zip``, from the
``python/`` folder of the official repository, brendenlake/omniglot on GitHub) or their unpacked folders are read
by path; nothing is downloaded or copied. Characters are black ink on white 105x105 PNGs.

Renders (every one returns ink bright on black, ``[H, W, 3]`` uint8):

- ``"native"``: the 105x105 binary image as stored.
- ``"digits"``: the 8x8, 0..16-intensity format of scikit-learn's handwritten digits (ink bounding box, centred in a
  square, 32x32 bitmap, 4x4 block counts: the UCI digits' own preprocessing), so a backbone pretrained on Omniglot
  sees the same kind of image as the digits few-shot task.
- ``"centred"``: the input of the one-shot benchmark's ConvNets. The ink's bounding box is centred in a square
  (aspect ratio kept), a margin of ``CENTRED_MARGIN`` of the box side is added all round, and the square is
  area-averaged down to ``CENTRED_SIDE`` (28) pixels of grey. Centring the ink removes where on the 105 px canvas a
  drawer happened to write, as Lake et al.'s modified-Hausdorff baseline does with centred ink coordinates, and
  scaling to the box removes the drawer's writing size; the margin leaves room for shift augmentation. Pretraining
  (``omniglot_background_part``) and the one-shot runs (``omniglot_one_shot_runs``) use this same render.
- ``"centred56"``: the same at 56 pixels (``CENTRED_RENDERS``).

The 20 official one-shot runs (``all_runs.zip``) are each a 20-way 1-shot problem inside one evaluation alphabet:
one training image of each of 20 characters and 20 test images drawn by other people. The archive renames every
file (``runNN/training/classKK.png``), so the alphabet of a run is not recoverable from it.

Registered as the classification sources ``digits+omniglot`` and ``omniglot`` (bottom of the file). The one-shot
runs and the validation episodes built in their style are in :mod:`.omniglot_episodes`.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterator, Sequence
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from PIL import Image

from . import digits
from .base import ClassificationPools, ClassificationSource, LabelledImages, SourceOptions

BACKGROUND_SMALL = ("images_background_small1", "images_background_small2")
RENDERS = ("native", "digits", "centred", "centred56")
CENTRED_SIDE = 28
# The centred renders by name and side: "centred56" keeps twice the detail of "centred" (for a 56 px input it is
# the native resolution instead of a 2x upsampling of 28 px).
CENTRED_RENDERS = {"centred": CENTRED_SIDE, "centred56": 56}
CENTRED_MARGIN = 0.1
# Each background character was drawn by 20 people; files are named <image id>_<drawer 01..20>.png. A fixed split
# by drawer keeps every character in both parts, so pretraining reports accuracy on unseen handwriting.
DRAWERS = 20
TRAIN_DRAWERS = range(1, 17)
TEST_DRAWERS = range(17, 21)
# Two background-small alphabets held out of the validation backbones' pretraining: the within-alphabet 20-way
# 1-shot validation episodes (omniglot_validation_episodes) are drawn from them. They are the two alphabets of at
# least 20 characters that appear in one split only (Greek and Latin are in both; Tagalog has 17 characters).
VALIDATION_ALPHABETS = ("Balinese", "Early_Aramaic")
_DRAWER_PATTERN = re.compile(r"_(\d{2})\.png$")
OFFICIAL_REPOSITORY = ("the official Omniglot repository (brendenlake/omniglot on GitHub, folder python/: "
                       "https://github.com/brendenlake/omniglot/tree/master/python)")




def omniglot_background(root: str | Path, splits: tuple[str, ...] = BACKGROUND_SMALL, render: str = "digits"
                        ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All images of the given background splits.

    Returns:
        ``(images uint8 [N, H, W, 3] ink bright on black, labels int64 [N], class names "split/alphabet/char")``.
    """
    images, labels, names, _ = _read_background(Path(root), tuple(splits), render)
    return images, labels, names


def omniglot_background_class_names(root: str | Path, splits: tuple[str, ...] = BACKGROUND_SMALL) -> list[str]:
    """The class names of :func:`omniglot_background`, in label order, from the file names alone (nothing decoded)."""
    _require(Path(root), splits, "the background data needs")
    names: dict[str, None] = {}
    for split in splits:
        for member in _split_members(Path(root), split):
            names.setdefault("/".join([split, *member.split("/")[-3:-1]]))
    if not names:
        raise ValueError(f"omniglot: no images for splits {splits} under {root}")
    return list(names)


def omniglot_background_part(root: str | Path, part: str = "train", render: str = "centred"
                             ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """One drawer part of every background-small character: pretraining data with a held-out test set.

    ``"train"`` holds drawers 1-16 and ``"test"`` drawers 17-20 of all 292 characters (``TRAIN_DRAWERS``,
    ``TEST_DRAWERS``), so the test accuracy measures new handwriting of the training characters. Decoded once per
    ``(root, render)`` and cached.

    Returns:
        ``(images uint8 [N, H, W, 3], labels int64 [N], class names, archive paths of the N images)``.
    """
    drawers = {"train": TRAIN_DRAWERS, "test": TEST_DRAWERS}
    if part not in drawers:
        raise ValueError(f"omniglot: part must be 'train' or 'test', got {part!r}")
    images, labels, names, files = _cached_read_background(str(root), BACKGROUND_SMALL, render)
    keep = np.flatnonzero(np.isin(_drawers(files), drawers[part]))
    return images[keep], labels[keep], list(names), [files[i] for i in keep]


def omniglot_background_unique(root: str | Path, part: str = "train", render: str = "centred",
                                exclude_alphabets: Sequence[str] = ()
                                ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """:func:`omniglot_background_part` with each character once and ``exclude_alphabets`` left out.

    The two background-small splits share two alphabets: Greek (24 characters) and Latin (26) are in both, with
    byte-identical images, so the 292 split-named classes are 242 characters and 50 of them appear twice (two
    softmax classes with the same images). Here the second split's copy is dropped (names stay
    ``split/alphabet/char`` of the copy kept), and every character of an excluded alphabet (by alphabet name, in
    either split) is left out: the pretraining set of the validation backbones excludes ``VALIDATION_ALPHABETS``.

    Returns:
        ``(images, labels 0..C-1, class names, archive paths)`` of drawers ``TRAIN_DRAWERS`` or ``TEST_DRAWERS``.
    """
    images, labels, names, files = omniglot_background_part(root, part, render)
    unknown = sorted(set(exclude_alphabets) - {name.split("/")[1] for name in names})
    if unknown:
        raise ValueError(f"omniglot: exclude_alphabets {unknown} are not background-small alphabets")
    kept = _distinct_characters(names, tuple(exclude_alphabets))
    relabel = np.full(len(names), -1, dtype=np.int64)
    relabel[kept] = np.arange(len(kept))
    rows = np.flatnonzero(relabel[labels] >= 0)
    return images[rows], relabel[labels[rows]], [names[i] for i in kept], [files[i] for i in rows]



def digits_with_omniglot(root: str | Path, classes: str = "base", part: str = "train"
                         ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pretraining data for the digits task: a digits class set plus every Omniglot background-small character.

    The training part holds the digits' training pool and all Omniglot images (rendered like digits); the test
    part holds only the digits' test images, so the reported accuracy is on the source digit classes.
    """
    images, labels, names = digits.digits_split(classes, part)
    if part != "train":
        return images, labels, names + _cached_background(str(root))[2]
    extra_images, extra_labels, extra_names = _cached_background(str(root))
    return (np.concatenate([images, extra_images]), np.concatenate([labels, extra_labels + len(names)]),
            names + extra_names)


def digits_with_omniglot_class_names(root: str | Path, classes: str = "base") -> list[str]:
    return digits.digits_class_names(classes) + _cached_background(str(root))[2]


@lru_cache(maxsize=2)
def _cached_background(root: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    return omniglot_background(root, render="digits")


@lru_cache(maxsize=2)
def _cached_read_background(root: str, splits: tuple[str, ...], render: str
                            ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    return _read_background(Path(root), splits, render)


def _read_background(root: Path, splits: tuple[str, ...], render: str
                     ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Images, labels, class names and archive paths (``split/alphabet/char/file.png``) of the given splits."""
    _check_render(render)
    _require(root, splits, "the background data needs")
    images, labels, names, files = [], [], {}, []
    for split in splits:
        for member, data in _split_pngs(root, split):
            parts = member.split("/")
            name = "/".join([split, *parts[-3:-1]])
            labels.append(names.setdefault(name, len(names)))
            images.append(_render(data, render))
            files.append("/".join([split, *parts[-3:]]))
    if not images:
        raise ValueError(f"omniglot: no images for splits {splits} under {root}")
    return np.stack(images), np.asarray(labels, dtype=np.int64), list(names), files


def _drawers(files: list[str]) -> np.ndarray:
    """The drawer number (1..20) of each background file, from its ``<id>_<drawer>.png`` name."""
    numbers = []
    for name in files:
        match = _DRAWER_PATTERN.search(name)
        if match is None or not 1 <= int(match.group(1)) <= DRAWERS:
            raise ValueError(f"omniglot: {name} is not named <image id>_<drawer 01..{DRAWERS}>.png")
        numbers.append(int(match.group(1)))
    return np.asarray(numbers)


def _check_render(render: str) -> None:
    if render not in RENDERS:
        raise ValueError(f"omniglot: render must be one of {RENDERS}, got {render!r}")


def _split_members(root: Path, split: str) -> list[str]:
    """Relative paths of one split's PNGs, sorted, without reading them."""
    archive, folder = root / f"{split}.zip", root / split
    if archive.is_file():
        with zipfile.ZipFile(archive) as handle:
            return sorted(m for m in handle.namelist() if m.endswith(".png"))
    if folder.is_dir():
        return sorted(str(path.relative_to(root)) for path in folder.rglob("*.png"))
    raise _not_found(root, (split,), "the background data needs")


def _split_pngs(root: Path, split: str) -> Iterator[tuple[str, bytes]]:
    """(relative path, PNG bytes) of one split, from ``<split>.zip`` or the unpacked ``<split>/`` folder."""
    archive, members = root / f"{split}.zip", _split_members(root, split)
    if archive.is_file():
        with zipfile.ZipFile(archive) as handle:
            for member in members:
                yield member, handle.read(member)
    else:
        for member in members:
            yield member, (root / member).read_bytes()


def _read_tree(root: Path, name: str) -> tuple[Path, dict[str, bytes]]:
    """``(source, {path inside it: bytes})`` for every file of ``<name>.zip`` or of the unpacked ``<name>/``."""
    archive, folder = root / f"{name}.zip", root / name
    if archive.is_file():
        with zipfile.ZipFile(archive) as handle:
            return archive, {m: handle.read(m) for m in handle.namelist() if not m.endswith("/")}
    if folder.is_dir():
        return folder, {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    raise _not_found(root, (name,), "the one-shot runs need")


def _require(root: Path, names: Sequence[str], needed_by: str) -> None:
    """Raise, naming every expected archive, unless ``<name>.zip`` or the folder ``<name>/`` exists for each name."""
    if not all(_present(root, name) for name in names):
        raise _not_found(root, names, needed_by)


def _present(root: Path, name: str) -> bool:
    return (root / f"{name}.zip").is_file() or (root / name).is_dir()


def _not_found(root: Path, names: Sequence[str], needed_by: str) -> FileNotFoundError:
    """The error for missing archives: every file ``needed_by`` needs, which are missing, and where they come from."""
    expected = " and ".join(f"{name}.zip" for name in names)
    missing = ", ".join(f"{root / name}.zip (nor the folder {root / name}/)" for name in names
                        if not _present(root, name))  # fmt: skip
    return FileNotFoundError(
        f"omniglot: {needed_by} {expected} (or an unpacked folder of the same name for each) in {root}; not found: "
        f"{missing}. The files come from {OFFICIAL_REPOSITORY}."
    )


def _render(png: bytes, render: str) -> np.ndarray:
    ink = np.asarray(Image.open(io.BytesIO(png)).convert("L")) < 128
    if render == "native":
        grey = (ink * 255).astype(np.uint8)
    elif render in CENTRED_RENDERS:
        grey = render_centred(ink, side=CENTRED_RENDERS[render])
    else:
        # The same 0..16 -> 0..255 scaling as visionlora.data.sources.digits.
        grey = np.rint(render_like_digits(ink) * (255.0 / 16.0)).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def render_centred(ink: np.ndarray, side: int = CENTRED_SIDE, margin: float = CENTRED_MARGIN) -> np.ndarray:
    """A boolean ink mask as a ``side x side`` uint8 image: ink box centred with a margin, area-averaged to grey.

    Args:
        ink: ``[H, W]`` bool, True where there is ink.
        side: Side of the output square.
        margin: Empty border on each side, as a share of the ink box's longer side.

    Returns:
        ``[side, side]`` uint8, 255 where a pixel is fully covered by ink, 0 where there is none.
    """
    rows, cols = np.nonzero(ink)
    if len(rows) == 0:
        return np.zeros((side, side), dtype=np.uint8)
    crop = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = crop.shape
    full = int(round(max(height, width) * (1 + 2 * margin)))
    square = np.zeros((full, full), dtype=np.uint8)
    top, left = (full - height) // 2, (full - width) // 2
    square[top : top + height, left : left + width] = crop * 255
    # BOX resampling averages the covered source pixels: thin strokes turn grey instead of vanishing or aliasing.
    return np.asarray(Image.fromarray(square).resize((side, side), Image.BOX))


def render_like_digits(ink: np.ndarray) -> np.ndarray:
    """A boolean ink mask as an 8x8 image of 0..16 counts, the way the UCI handwritten digits were made."""
    rows, cols = np.nonzero(ink)
    if len(rows) == 0:
        return np.zeros((8, 8), dtype=np.int64)
    crop = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = crop.shape
    side = max(height, width)
    square = np.zeros((side, side), dtype=bool)
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = crop
    bitmap = np.asarray(Image.fromarray(square.astype(np.uint8) * 255).resize((32, 32), Image.BILINEAR)) > 64
    return bitmap.reshape(8, 4, 8, 4).sum(axis=(1, 3))


def _digits_with_omniglot_classes(options: SourceOptions) -> list[str]:
    return digits_with_omniglot_class_names(options.root, options.classes)


def _digits_with_omniglot_pools(options: SourceOptions) -> ClassificationPools:
    images, labels, names = digits_with_omniglot(options.root, options.classes, "train")
    test_images, test_labels, _ = digits_with_omniglot(options.root, options.classes, "test")
    return ClassificationPools(names, LabelledImages(images, labels), LabelledImages(test_images, test_labels), None,
                               partial(digits.selection_ids, options.classes, len(labels)))


def _background_classes(options: SourceOptions) -> list[str]:
    return omniglot_background_class_names(options.root)


def _background_pools(options: SourceOptions) -> ClassificationPools:
    images, labels, names, files = omniglot_background_part(options.root, "train")
    test_images, test_labels, _, _ = omniglot_background_part(options.root, "test")
    return ClassificationPools(names, LabelledImages(images, labels), LabelledImages(test_images, test_labels), None,
                               partial(list, files))


def _turn_suffixes(quarter_turns: int) -> list[str]:
    """The name suffix of each turn, ``""`` for the original: what listed and read class names both carry."""
    if quarter_turns < 1 or quarter_turns > 4:
        raise ValueError(f"omniglot: quarter_turns must be 1-4, got {quarter_turns}")
    return [""] + [f"@rot{90 * k}" for k in range(1, quarter_turns)]


def rotated_classes(images: np.ndarray, labels: np.ndarray, names: list[str], files: list[str],
                    quarter_turns: int) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Each character turned by 0, 90, ... degrees as a class of its own: ``quarter_turns`` times the classes.

    The class expansion of Omniglot few-shot training since Santoro et al. 2016 and Vinyals et al. 2016 (used by
    Snell et al. 2017): a character turned 90 degrees is a new shape, so the features learn from more classes
    without another image. Class ``k * C + c`` is class ``c`` turned ``k`` quarter turns counter-clockwise (named
    and identified ``...@rot<degrees>``); ``k = 0`` keeps the original labels, names and files first.
    """
    suffixes = _turn_suffixes(quarter_turns)
    if quarter_turns == 1:  # the plain sources: no copy of the images
        return images, labels, names, files
    count = len(names)
    turned = [np.rot90(images, k, axes=(1, 2)) for k in range(quarter_turns)]
    return (np.ascontiguousarray(np.concatenate(turned)),
            np.concatenate([labels + k * count for k in range(quarter_turns)]),
            [name + suffix for suffix in suffixes for name in names],
            [file + suffix for suffix in suffixes for file in files])


def _unique_pools(options: SourceOptions, exclude: tuple[str, ...] = (), render: str = "centred",
                  quarter_turns: int = 1) -> ClassificationPools:
    train = rotated_classes(*omniglot_background_unique(options.root, "train", render, exclude), quarter_turns)
    test = rotated_classes(*omniglot_background_unique(options.root, "test", render, exclude), quarter_turns)
    images, labels, names, files = train
    return ClassificationPools(names, LabelledImages(images, labels), LabelledImages(test[0], test[1]), None,
                               partial(list, files))


def _unique_classes(options: SourceOptions, exclude: tuple[str, ...] = (), quarter_turns: int = 1) -> list[str]:
    names = omniglot_background_class_names(options.root)
    kept = [names[i] for i in _distinct_characters(names, exclude)]
    return [name + suffix for suffix in _turn_suffixes(quarter_turns) for name in kept]


def _distinct_characters(names: list[str], exclude: tuple[str, ...]) -> list[int]:
    """Indices of the first ``split/alphabet/char`` name of each (alphabet, char), outside ``exclude``'s alphabets."""
    kept, seen = [], set()
    for index, name in enumerate(names):
        character = tuple(name.split("/")[1:])
        if character[0] not in exclude and character not in seen:
            kept.append(index)
        seen.add(character)
    return kept


_ROOT_HELP = "the folder of images_background_small1.zip and images_background_small2.zip or their folders"
# Pretraining data for the digits task: the digits of ``classes`` and every background-small character rendered
# like a digit; the test split holds only the digits.
DIGITS_WITH_OMNIGLOT = ClassificationSource(
    name="digits+omniglot",
    list_classes=_digits_with_omniglot_classes,
    read=_digits_with_omniglot_pools,
    selection_column="digits_index",
    root_help=_ROOT_HELP,
    preprocessing=digits.STROKE_PREPROCESSING,
)
# Pretraining data for the one-shot runs: drawers 1-16 of every background-small character, drawers 17-20 as the
# test split. The random affine is on: a new drawer writes the character slanted and placed differently.
OMNIGLOT = ClassificationSource(
    name="omniglot",
    list_classes=_background_classes,
    read=_background_pools,
    selection_column="omniglot_file",
    root_help=_ROOT_HELP,
    preprocessing={**digits.STROKE_PREPROCESSING, "affine": True},
)


def _distinct_source(name: str, exclude: tuple[str, ...] = (), render: str = "centred", quarter_turns: int = 1
                     ) -> ClassificationSource:
    """The drawers of :data:`OMNIGLOT` with each distinct character once, without the alphabets ``exclude``, each
    ``quarter_turns`` times (:func:`rotated_classes`)."""
    return ClassificationSource(
        name=name,
        list_classes=partial(_unique_classes, exclude=exclude, quarter_turns=quarter_turns),
        read=partial(_unique_pools, exclude=exclude, render=render, quarter_turns=quarter_turns),
        selection_column="omniglot_file",
        root_help=_ROOT_HELP,
        preprocessing=OMNIGLOT.preprocessing,
    )


# The same drawers with each of the 242 distinct characters once (Greek and Latin are in both splits).
OMNIGLOT_UNIQUE = _distinct_source("omniglot-unique")
# Recipe search: the distinct characters without VALIDATION_ALPHABETS, whose episodes validate the backbone.
OMNIGLOT_DEV = _distinct_source("omniglot-dev", exclude=VALIDATION_ALPHABETS)
# The same two at the 56 px centred render ("centred56"): the runs must then be read with render="centred56".
OMNIGLOT_UNIQUE_56 = _distinct_source("omniglot-unique56", render="centred56")
OMNIGLOT_DEV_56 = _distinct_source("omniglot-dev56", exclude=VALIDATION_ALPHABETS, render="centred56")
# The same two with every character also turned 90, 180 and 270 degrees, each turn a class (968 and 784 classes).
OMNIGLOT_UNIQUE_ROT4 = _distinct_source("omniglot-unique-rot4", quarter_turns=4)
OMNIGLOT_DEV_ROT4 = _distinct_source("omniglot-dev-rot4", exclude=VALIDATION_ALPHABETS, quarter_turns=4)
