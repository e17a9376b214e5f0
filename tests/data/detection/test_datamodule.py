"""CocoDetectionDataModule: the batch contract, seeding, and generating the synthetic scenes under root."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

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
