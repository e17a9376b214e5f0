"""CocoDetectionDataModule: the batch contract, seeding, and generating the synthetic scenes under root."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionlora.data.detection.datamodule import CocoDetectionDataModule
from visionlora.data.sources import synthetic_scenes
from visionlora.data.sources.synthetic_scenes import CLASS_NAMES, generate_scenes


@pytest.fixture(scope="module")
def scenes_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    generate_scenes(root, 24, image_size=64, seed=0, split="train")
    generate_scenes(root, 4, image_size=64, seed=0, split="val")
    return root


def _check_batch(images, targets, size: int, num_classes: int = 6) -> None:
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets)
    for image, target in zip(images, targets, strict=True):
        assert image.dtype == torch.float32 and image.shape == (3, size, size)
        assert 0.0 <= image.min() and image.max() <= 1.0
        boxes, labels = target["boxes"], target["labels"]
        assert boxes.dtype == torch.float32 and boxes.shape == (len(labels), 4) and labels.dtype == torch.int64
        assert target["image_id"].dtype == torch.int64 and target["image_id"].ndim == 0
        assert ((labels >= 1) & (labels <= num_classes)).all()
        assert (boxes >= 0).all() and (boxes <= size).all() and (boxes[:, 2:] > boxes[:, :2]).all()


def test_datamodule_batches_match_the_contract(scenes_root, tmp_path):
    dm = CocoDetectionDataModule(dataset="coco", root=str(scenes_root), shots=2, seed=1, batch_size=4, image_size=64,
                                 run_dir=str(tmp_path))  # fmt: skip
    assert dm.num_classes == 6 and dm.class_names == list(CLASS_NAMES)  # before setup
    dm.setup("fit")
    assert Counter(int(x) for r in dm.split_records("train") for x in r.labels) == {c: 2 for c in range(1, 7)}
    selection = json.loads((tmp_path / "fewshot_selection.json").read_text())
    assert selection["counts"] == {name: 2 for name in CLASS_NAMES} and selection["shots"] == 2
    batches = list(dm.train_dataloader())
    assert sum(len(images) for images, _ in batches) == len(dm.split_records("train"))
    for images, targets in batches:
        _check_batch(images, targets, 64)
    val_images, val_targets = next(iter(dm.val_dataloader()))
    _check_batch(val_images, val_targets, 64)
    assert [int(t["image_id"]) for t in val_targets] == [1, 2, 3, 4]
    assert dm.test_dataloader() == []
    samples = dm.sample_batch(2)
    assert len(samples) == 2 and torch.equal(samples[0], val_images[0])


def _first_train_batch(root: Path, seed: int):
    dm = CocoDetectionDataModule(dataset="coco", root=str(root), shots=2, seed=seed, batch_size=4, image_size=64)
    dm.setup()
    return next(iter(dm.train_dataloader()))


def test_datamodule_same_seed_same_batches_other_seed_other_shots(scenes_root):
    (images, targets), (again, again_targets) = _first_train_batch(scenes_root, 3), _first_train_batch(scenes_root, 3)
    assert all(torch.equal(a, b) for a, b in zip(images, again, strict=True))
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(targets, again_targets, strict=True))
    other = _first_train_batch(scenes_root, 4)[1]
    assert [int(t["image_id"]) for t in other] != [int(t["image_id"]) for t in targets]


def test_datamodule_synthetic_generates_under_root(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic_scenes, "DEFAULT_SPLITS", {"train": 16, "val": 2, "test": 2})
    dm = CocoDetectionDataModule(root=str(tmp_path / "scenes"), shots=1, batch_size=16, image_size=64)
    dm.setup()
    assert json.loads((tmp_path / "scenes" / "generation.json").read_text())["splits"]["train"] == 16
    images, targets = next(iter(dm.train_dataloader()))
    _check_batch(images, targets, 64)
    assert sum(len(t["labels"]) for t in targets) <= 6  # one instance per class before augmentation
    assert [x.shape for x in dm.sample_batch(2)] == [(3, 64, 64), (3, 64, 64)]  # 128 px scenes, longer side 64


# Setup checks every image file of every split before training (issue items 15 and 6).
def _coco_split(folder: Path, sizes: dict[str, tuple[int, int]], recorded: dict[str, tuple[int, int]] | None = None,
                annotate: bool = True) -> Path:
    """``folder/annotations.json`` and ``folder/images/<name>`` (JPEG noise pictures of ``sizes`` = (w, h)), one
    box of each of two categories per image; ``recorded`` overrides the width/height the json states."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id, (name, (width, height)) in enumerate(sizes.items(), start=1):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / name, quality=90)
        w, h = (recorded or {}).get(name, (width, height))
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for category in (1, 2):
            annotations.append({"id": 10 * image_id + category, "image_id": image_id, "category_id": category,
                                "bbox": [2 * category, 3, 10, 8], "area": 80, "iscrowd": 0})
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    data = {"images": images, "annotations": annotations if annotate else [], "categories": categories}
    (folder / "annotations.json").write_text(json.dumps(data))
    return folder / "annotations.json"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _coco_root(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    _coco_split(root / "train", {f"t{i}.jpg": (40, 30) for i in range(4)})
    _coco_split(root / "test", {f"e{i}.jpg": (40, 30) for i in range(3)})
    return root


def test_setup_drops_a_truncated_training_jpeg_with_one_counted_warning(tmp_path, caplog):
    root = _coco_root(tmp_path)
    _truncate(root / "train" / "images" / "t2.jpg")
    dm = CocoDetectionDataModule(dataset="coco", root=str(root), shots=None, batch_size=4, image_size=32)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 unreadable image file" in warnings[0] and "t2.jpg" in warnings[0]
    assert [r.path.name for r in dm.split_records("train")] == ["t0.jpg", "t1.jpg", "t3.jpg"]
    assert sum(len(images) for images, _ in dm.train_dataloader()) == 3


def test_setup_error_mode_names_a_truncated_test_jpeg_before_training(tmp_path):
    root = _coco_root(tmp_path)
    _truncate(root / "test" / "images" / "e1.jpg")
    dm = CocoDetectionDataModule(dataset="coco", root=str(root), shots=1, on_bad="error", image_size=32)
    with pytest.raises(ValueError, match=r"(?s)1 unreadable image file.*e1\.jpg"):
        dm.setup("fit")


def test_setup_names_an_image_whose_size_differs_from_its_record(tmp_path):
    root = _coco_root(tmp_path)
    _coco_split(root / "test", {f"e{i}.jpg": (40, 30) for i in range(3)}, recorded={"e2.jpg": (30, 40)})
    dm = CocoDetectionDataModule(dataset="coco", root=str(root), shots=1, image_size=32)
    with pytest.raises(ValueError, match=r"e2\.jpg is 40x30 but its annotation record says 30x40"):
        dm.setup()


# An empty training set is a one-line error naming the file at setup, not torch's num_samples=0 (issue item 17).
@pytest.mark.parametrize("shots", [None, 2])
def test_training_json_without_annotations_is_named_before_any_image_is_read(tmp_path, shots):
    root = _coco_root(tmp_path)
    train_json = _coco_split(root / "train", {f"t{i}.jpg": (40, 30) for i in range(4)}, annotate=False)
    _truncate(root / "train" / "images" / "t0.jpg")  # would be the first error if images were scanned first
    dm = CocoDetectionDataModule(dataset="coco", root=str(root), shots=shots, on_bad="error", image_size=32)
    with pytest.raises(ValueError) as error:
        dm.setup()
    message = str(error.value)
    assert len(message.splitlines()) == 1 and str(train_json) in message and "no annotations" in message
    assert "train" in message and "unreadable" not in message


def test_training_split_left_empty_by_dropped_images_is_named(tmp_path):
    root = _coco_root(tmp_path)
    for i in range(4):
        _truncate(root / "train" / "images" / f"t{i}.jpg")
    dm = CocoDetectionDataModule(dataset="coco", root=str(root), shots=None, image_size=32)
    with pytest.raises(ValueError, match=r"no training image left.*train[/\\]annotations\.json") as error:
        dm.setup()
    assert len(str(error.value).splitlines()) == 1
