"""ImageFolder scanning: layouts, the train/test split, corrupt files, empty or missing folders."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest

from visionlora.data import find_bad_images, imagefolder_classes, scan_imagefolder
from visionlora.data.common import load_rgb

from ..conftest import CLASS_SIZES, CORRUPT, make_class_folders, write_png


def test_classes_from_folder_names(folder_root):
    assert imagefolder_classes(folder_root) == ["cat", "dog", "fox"]


def test_skip_counts_and_excludes_the_corrupt_file(folder_root, caplog):
    with caplog.at_level(logging.WARNING, logger="visionlora.data.classification.imagefolder"):
        found = scan_imagefolder(folder_root)
    assert found.bad_images == [folder_root / CORRUPT]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipping 1 unreadable" in warnings[0] and str(CORRUPT) in warnings[0]
    every = found.train.paths + found.test.paths
    assert len(every) == sum(CLASS_SIZES.values()) == 21 and folder_root / CORRUPT not in every
    # .txt, hidden files and hidden folders are not images or classes
    assert all(p.suffix == ".png" and not p.name.startswith(".") for p in every)


def test_single_folder_split_is_stratified_and_fixed(folder_root):
    found = scan_imagefolder(folder_root, test_fraction=0.3)
    # cat 7, dog 6 (after the corrupt file), fox 8 -> round half up of 30 %: 2, 2, 2
    assert Counter(found.test.labels.tolist()) == {0: 2, 1: 2, 2: 2}
    assert Counter(found.train.labels.tolist()) == {0: 5, 1: 4, 2: 6}
    assert set(found.train.paths).isdisjoint(found.test.paths)
    assert scan_imagefolder(folder_root, test_fraction=0.3).test.paths == found.test.paths
    assert all(
        p.parent.name == ["cat", "dog", "fox"][y] for p, y in zip(found.test.paths, found.test.labels, strict=True)
    )


def test_error_mode_names_the_corrupt_file(folder_root):
    with pytest.raises(ValueError, match=r"(?s)1 unreadable image file.*dog/broken\.png: UnidentifiedImageError"):
        scan_imagefolder(folder_root, on_bad_image="error")


def test_truncated_png_is_found(tmp_path):
    good, cut = tmp_path / "good.png", tmp_path / "cut.png"
    write_png(good, 10, size=(64, 64))
    cut.write_bytes(good.read_bytes()[:-40])
    assert list(find_bad_images([good, cut])) == [cut]


def test_empty_class_folder_is_named(folder_root):
    (folder_root / "owl").mkdir()
    (folder_root / "owl" / "readme.txt").write_text("no images yet")
    with pytest.raises(ValueError, match=r"no image files.*owl"):
        scan_imagefolder(folder_root)


def test_missing_root_and_root_without_classes(tmp_path):
    with pytest.raises(ValueError, match=r"nowhere.*does not exist"):
        imagefolder_classes(tmp_path / "nowhere")
    write_png(tmp_path / "flat" / "a.png", 1)
    with pytest.raises(ValueError, match=r"no class folders in .*flat"):
        scan_imagefolder(tmp_path / "flat")
    make_class_folders(tmp_path / "one", {"only": 2})
    with pytest.raises(ValueError, match=r"only one class folder \('only'\)"):
        imagefolder_classes(tmp_path / "one")


def test_train_test_val_layout(tmp_path):
    root = tmp_path / "ds"
    make_class_folders(root / "train", {"a": 4, "b": 3})
    make_class_folders(root / "test", {"a": 2, "b": 1})
    make_class_folders(root / "val", {"a": 1, "b": 1})
    found = scan_imagefolder(root)
    assert found.class_names == ["a", "b"]
    assert (len(found.train), len(found.test), len(found.val)) == (7, 3, 2)
    assert all(p.parts[-3] == "test" for p in found.test.paths)


def test_train_val_layout_tests_on_val(tmp_path):
    root = tmp_path / "ds"
    make_class_folders(root / "train", {"a": 4, "b": 3})
    make_class_folders(root / "val", {"a": 2, "b": 2})
    found = scan_imagefolder(root)
    assert found.val is None and len(found.test) == 4 and all(p.parts[-3] == "val" for p in found.test.paths)


def test_split_folders_with_different_classes(tmp_path):
    root = tmp_path / "ds"
    make_class_folders(root / "train", {"a": 2, "b": 2})
    make_class_folders(root / "test", {"a": 1, "c": 1})
    with pytest.raises(ValueError, match=r"missing \['b'\], not in training \['c'\]"):
        scan_imagefolder(root)


def test_class_left_without_readable_images(tmp_path):
    root = make_class_folders(tmp_path / "ds", {"a": 2})
    (root / "b").mkdir()
    (root / "b" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"no readable image left in .*'.*b'"):
        scan_imagefolder(root)


def test_load_rgb_converts_grey_and_alpha(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((5, 4), 7, dtype=np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.full((5, 4, 4), 9, dtype=np.uint8), mode="RGBA").save(tmp_path / "a.png")
    for name, value in (("g.png", 7), ("a.png", 9)):
        array = load_rgb(tmp_path / name)
        assert array.shape == (5, 4, 3) and array.dtype == np.uint8 and (array == value).all()
