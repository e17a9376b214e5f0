"""Few-shot detection data: synthetic scenes, COCO checks, TFA K-instance sampling, box-aware presets, DataModule."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image

from visionlora.data import synthetic_scenes
from visionlora.data.coco import DetectionRecord, load_coco
from visionlora.data.detection_datamodule import CocoDetectionDataModule
from visionlora.data.detection_dataset import DetectionDataset
from visionlora.data.detection_presets import bbox_params, eval_detection_transform, train_detection_transform
from visionlora.data.detection_sampling import sample_k_instances
from visionlora.data.synthetic_scenes import (
    CLASS_NAMES,
    ensure_synthetic_scenes,
    generate_scenes,
    mask_box,
    render_scene,
    scene_rng,
    shape_mask,
)


def _split_bytes(root: Path, split: str = "train") -> tuple[str, list[bytes]]:
    pngs = sorted((root / split / "images").glob("*.png"))
    return (root / split / "annotations.json").read_text(), [p.read_bytes() for p in pngs]


# ---------------------------------------------------------------- synthetic scenes


def test_generator_same_seed_identical_other_seed_differs(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        generate_scenes(tmp_path / name, 4, image_size=64, seed=seed)
    first, again, other = (_split_bytes(tmp_path / name) for name in "abc")
    assert first == again and len(first[1]) == 4
    assert first[0] != other[0] and all(a != b for a, b in zip(first[1], other[1], strict=True))
    coco = json.loads(first[0])
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4, 5, 6]
    assert [c["name"] for c in coco["categories"]] == list(CLASS_NAMES)
    assert all(a["iscrowd"] == 0 and len(a["bbox"]) == 4 for a in coco["annotations"])


def test_single_shape_box_is_the_drawn_pixels_not_the_nominal_shape():
    upright = shape_mask("square", (32, 32), 10 * np.sqrt(2), 0.0, 64)  # side 20: corners at 22 and 42
    assert mask_box(upright) == (22, 22, 43, 43) and upright.sum() == 441
    # Turned 45 degrees, the corners reach 32 +- 14.14: the drawn pixels span 17..46.
    turned = shape_mask("square", (32, 32), 10 * np.sqrt(2), np.pi / 4, 64)
    assert mask_box(turned) == (17, 17, 47, 47)
    ring = shape_mask("ring", (32, 32), 10, 0.0, 64)
    assert mask_box(ring) == (22, 22, 43, 43) and not ring[32, 32]  # the hole is not part of the object


def test_scene_boxes_are_tight_around_visible_pixels(tmp_path):
    coco = json.loads(generate_scenes(tmp_path, 6, image_size=64, seed=3).read_text())
    for image in coco["images"]:
        scene = render_scene(scene_rng(3, "train", image["id"] - 1), 64)
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert [a["category_id"] for a in anns] == scene.labels
        for ann, mask in zip(anns, scene.masks, strict=True):
            x0, y0, x1, y1 = mask_box(mask)
            assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0] and ann["area"] == int(mask.sum())
        stack = np.stack(scene.masks)
        assert stack.sum(axis=0).max() == 1  # visible masks never overlap


def test_ensure_generates_once_atomically_and_refuses_other_settings(tmp_path, monkeypatch):
    root = tmp_path / "scenes"
    splits = {"train": 3, "val": 2}
    ensure_synthetic_scenes(root, splits, image_size=64, seed=0)
    before = _split_bytes(root, "val")
    monkeypatch.setattr(synthetic_scenes, "generate_scenes", lambda *a, **k: pytest.fail("regenerated"))
    assert ensure_synthetic_scenes(root, splits, image_size=64, seed=0) == root
    assert _split_bytes(root, "val") == before and len(before[1]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scenes"]  # no temporary folder left behind
    with pytest.raises(ValueError, match="scenes exists but holds"):
        ensure_synthetic_scenes(root, splits, image_size=64, seed=1)


def test_night_camera_sees_the_same_objects_in_grey_with_sensor_noise():
    colour = render_scene(scene_rng(0, "train", 5), 64)
    night = render_scene(scene_rng(0, "train", 5), 64, camera="night")
    assert night.labels == colour.labels and all(np.array_equal(a, b) for a, b in zip(night.masks, colour.masks,
                                                                                         strict=True))
    again = render_scene(scene_rng(0, "train", 5), 64, camera="night")
    assert np.array_equal(night.image, again.image)
    # Luminance only: the colour scene's channel mean, plus zero-mean noise of std NIGHT_NOISE in every channel.
    noise = night.image.astype(np.float32) - colour.image.astype(np.float32).mean(axis=2, keepdims=True)
    assert abs(float(noise.mean())) < 2.0 and 25.0 < float(noise.std()) < synthetic_scenes.NIGHT_NOISE + 1
    with pytest.raises(ValueError, match="camera must be one of"):
        render_scene(scene_rng(0, "train", 5), 64, camera="infrared")


def test_night_scenes_are_their_own_dataset(tmp_path):
    splits = {"train": 2}
    ensure_synthetic_scenes(tmp_path / "night", splits, image_size=64, camera="night")
    marker = json.loads((tmp_path / "night" / "generation.json").read_text())
    assert marker["camera"] == "night"
    with pytest.raises(ValueError, match="exists but holds"):  # a colour request must not reuse night scenes
        ensure_synthetic_scenes(tmp_path / "night", splits, image_size=64)
    info = json.loads((tmp_path / "night" / "train" / "annotations.json").read_text())["info"]
    assert info["camera"] == "night"
    module = CocoDetectionDataModule("synthetic_night")
    assert module.root == Path("data/synthetic_scenes_night") and module.num_classes == 6


# ---------------------------------------------------------------- COCO reading and checking


def _write_png(path: Path, width: int = 40, height: int = 30) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 90, dtype=np.uint8)).save(path)


def _bad_coco(tmp_path: Path, **extra) -> Path:
    """Three 40x30 images (c.png missing on disk, e.png without annotations) and one annotation per problem."""
    for name in ("a.png", "b.png", "e.png"):
        _write_png(tmp_path / "images" / name)
    images = [{"id": i, "file_name": f, "width": 40, "height": 30} for i, f in ((1, "a.png"), (2, "b.png"),
              (3, "c.png"), (4, "e.png"))]  # fmt: skip
    ann = [
        (1, 1, 7, [2, 3, 10, 5]),  # good
        (2, 1, 3, [30, 20, 20, 20]),  # past the right and bottom border: clipped to [30, 20, 40, 30]
        (3, 2, 7, [50, 40, 5, 5]),  # entirely outside
        (4, 2, 7, [5, 5, 0, 4]),  # zero width
        (5, 2, 99, [1, 1, 4, 4]),  # unknown category
        (6, 8, 3, [1, 1, 4, 4]),  # unknown image
        (7, 3, 3, [1, 1, 4, 4]),  # image file missing
        (8, 2, 3, [0, 0, 40, 30.4]),  # 0.4 px over: clipped silently
        (9, 2, 3, [1, 1, 5, 5]),  # crowd
    ]
    annotations = [
        {"id": i, "image_id": im, "category_id": c, "bbox": b, "iscrowd": int(i == 9)} for i, im, c, b in ann
    ]
    categories = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]
    data = {"images": images, "annotations": annotations, "categories": categories, **extra}
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(data))
    return path


def test_load_coco_drops_and_clips_with_one_counted_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="visionlora.data.coco"):
        split = load_coco(_bad_coco(tmp_path), tmp_path / "images", on_bad="drop")
    assert split.category_ids == [3, 7] and split.class_names == ["three", "seven"]  # ids sorted -> labels 1, 2
    assert split.problems == {"missing_file": 1, "unknown_image": 1, "unknown_category": 1, "outside_image": 1,
                              "invalid_box": 1, "clipped_box": 1}  # fmt: skip
    assert split.num_crowd == 1 and split.num_empty_dropped == 0
    assert [r.image_id for r in split.records] == [1, 2, 4]  # 3 has no file; 4 kept as a negative
    one, two, empty = split.records
    np.testing.assert_array_equal(one.boxes, [[2, 3, 12, 8], [30, 20, 40, 30]])
    assert one.labels.tolist() == [2, 1] and one.annotation_ids.tolist() == [1, 2]
    np.testing.assert_array_equal(two.boxes, [[0, 0, 40, 30]])
    assert empty.boxes.shape == (0, 4) and empty.labels.dtype == np.int64
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "6 problem(s)" in warnings[0].getMessage()
    assert "unknown_category: 1" in warnings[0].getMessage() and "annotation id 5" in warnings[0].getMessage()


def test_load_coco_can_drop_empty_images(tmp_path):
    split = load_coco(_bad_coco(tmp_path), tmp_path / "images", keep_empty=False)
    assert [r.image_id for r in split.records] == [1, 2] and split.num_empty_dropped == 1


@pytest.mark.parametrize(
    ("drop_ids", "match"),
    [
        ({2, 3, 4, 6, 7}, r"annotation id 5 \(image id 2, file '.*b\.png', category id 99\).*not in 'categories'"),
        ({2, 3, 4, 5, 7}, r"annotation id 6 \(image id 8, .*category id 3\).*image id missing"),
        ({3, 4, 5, 6, 7}, r"annotation id 2 .*bbox \[30, 20, 20, 20\] in a 40x30 image"),
        ({2, 3, 5, 6, 7}, r"annotation id 4 .*bbox \[5, 5, 0, 4\]"),
    ],
)
def test_load_coco_error_names_the_record(tmp_path, drop_ids, match):
    path = _bad_coco(tmp_path)
    data = json.loads(path.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["id"] not in drop_ids]
    data["images"] = [i for i in data["images"] if i["file_name"] != "c.png"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        load_coco(path, tmp_path / "images", on_bad="error")


def test_load_coco_error_names_missing_file_and_rejects_non_coco(tmp_path):
    with pytest.raises(ValueError, match=r"image id 3, file '.*c\.png'.*not found"):
        load_coco(_bad_coco(tmp_path), tmp_path / "images", on_bad="error")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": [], "categories": []}))
    with pytest.raises(ValueError, match="'categories' is empty"):
        load_coco(broken, tmp_path)


# ---------------------------------------------------------------- TFA K-instance sampling


def _pool(num_images: int = 60, seed: int = 0) -> list[DetectionRecord]:
    """Images holding 1 to 3 boxes of random labels 1..3."""
    rng = np.random.default_rng(seed)
    records = []
    for image_id in range(1, num_images + 1):
        labels = rng.integers(1, 4, size=int(rng.integers(1, 4)))
        boxes = np.tile(np.array([0, 0, 5, 5], dtype=np.float32), (len(labels), 1))
        ids = np.arange(len(labels), dtype=np.int64) + 10 * image_id
        records.append(DetectionRecord(image_id, Path(f"{image_id}.png"), 8, 8, boxes, labels.astype(np.int64), ids))
    return records


def test_k_instances_per_class_whole_images_and_deterministic():
    pool = _pool()
    by_id = {r.image_id: r for r in pool}
    sample = sample_k_instances(pool, 5, seed=1, class_names=["a", "b", "c"])
    assert sample.counts == {1: 5, 2: 5, 3: 5}
    assert Counter(int(x) for r in sample.records for x in r.labels) == {1: 5, 2: 5, 3: 5}
    for label, image_ids in sample.image_ids.items():
        for image_id in image_ids:  # TFA takes all of an image's instances of the class, never part of them
            record = next(r for r in sample.records if r.image_id == image_id)
            assert (record.labels == label).sum() == (by_id[image_id].labels == label).sum()
    again = sample_k_instances(list(reversed(pool)), 5, seed=1)
    assert again.image_ids == sample.image_ids
    assert sample_k_instances(pool, 5, seed=2).image_ids != sample.image_ids
    bigger = sample_k_instances(pool, 10, seed=1)  # TFA's shot ladder: the 5-shot images stay in the 10-shot set
    assert bigger.counts == {1: 10, 2: 10, 3: 10}
    assert all(set(sample.image_ids[c]) <= set(bigger.image_ids[c]) for c in (1, 2, 3))


def test_k_instances_errors_name_the_class_and_warn_when_k_is_not_reachable(caplog):
    pool = _pool(4)
    with pytest.raises(ValueError, match=r"class 'c' \(label 3\) has"):
        sample_k_instances(pool, 30, seed=0, class_names=["a", "b", "c"])
    pairs = [DetectionRecord(i, Path(f"{i}.png"), 8, 8, np.zeros((2, 4), np.float32), np.array([1, 1]),
                             np.array([2 * i, 2 * i + 1])) for i in range(1, 5)]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        sample = sample_k_instances(pairs, 3, seed=0, class_names=["pair"])
    assert sample.counts == {1: 2} and "took 2" in caplog.text


# ---------------------------------------------------------------- box-aware presets


def _run(transform, image, boxes, labels):
    out = transform(image=image, bboxes=np.asarray(boxes, dtype=np.float32), labels=np.asarray(labels))
    return out["image"], np.asarray(out["bboxes"]).reshape(-1, 4), np.asarray(out["labels"]).tolist()


def test_eval_resize_scales_boxes_exactly():
    image = np.zeros((40, 80, 3), dtype=np.uint8)
    out, boxes, labels = _run(eval_detection_transform(160), image, [[10, 5, 30, 25]], [2])
    assert out.shape == (80, 160, 3) and labels == [2]
    np.testing.assert_allclose(boxes, [[20, 10, 60, 50]], atol=1e-4)
    out, boxes, _ = _run(eval_detection_transform(40, pad_to_square=True), image, [[10, 5, 30, 25]], [2])
    assert out.shape == (40, 40, 3)
    np.testing.assert_allclose(boxes, [[5, 2.5, 15, 12.5]], atol=1e-4)


def test_train_flip_moves_box_with_pixels():
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[8:24, 10:30] = 255  # the object: pixels 10..29 x 8..23, box [10, 8, 30, 24]
    transform = train_detection_transform(64, scale=(1.0, 1.0), hflip=True, color_jitter=0.0)
    seen = set()
    for seed in range(8):
        transform.set_random_seed(seed)
        out, boxes, labels = _run(transform, image, [[10, 8, 30, 24]], [4])
        flipped = bool(out[10, 50, 0] == 255)
        expected = [64 - 30, 8, 64 - 10, 24] if flipped else [10, 8, 30, 24]
        np.testing.assert_allclose(boxes, [expected], atol=1e-4)
        assert labels == [4]
        seen.add(flipped)
    assert seen == {True, False}


def test_crop_drops_boxes_with_their_labels_and_clips_the_rest():
    image = np.zeros((60, 60, 3), dtype=np.uint8)
    crop = A.Compose([A.Crop(0, 0, 40, 40)], bbox_params=bbox_params(min_visibility=0.3))
    boxes = [[5, 5, 15, 15], [50, 50, 60, 60], [35, 5, 45, 15], [38, 20, 48, 30]]
    _, out, labels = _run(crop, image, boxes, [1, 2, 3, 4])
    # 2 is outside; 3 keeps half its area (clipped); 4 keeps a fifth, under min_visibility: dropped.
    assert labels == [1, 3]
    np.testing.assert_allclose(out, [[5, 5, 15, 15], [35, 5, 40, 15]], atol=1e-4)


def test_train_boxes_stay_inside_and_follow_the_pixels():
    rng = np.random.default_rng(0)
    image = np.zeros((50, 70, 3), dtype=np.uint8)
    image[20:36, 40:62] = 255
    transform = train_detection_transform(48, scale=(0.6, 1.6), color_jitter=0.0, min_visibility=0.0, min_area=1)
    followed = 0
    for seed in range(20):
        transform.set_random_seed(seed)
        edges = rng.uniform(0, 8, size=(3, 2))
        boxes = [[0, 0, 10 + e[0], 10 + e[1]] for e in edges] + [[40, 20, 62, 36]]
        out, got, labels = _run(transform, image, boxes, [1, 2, 3, 5])
        assert out.shape == (48, 48, 3) and len(got) == len(labels)
        assert (got >= 0).all() and (got[:, [0, 2]] <= 48).all() and (got[:, [1, 3]] <= 48).all()
        if 5 in labels:  # the white patch's box follows its pixels (up to interpolation blur)
            ys, xs = np.nonzero(out[..., 0] > 127)
            np.testing.assert_allclose(got[labels.index(5)], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1.5)
            followed += 1
    assert followed >= 10


def test_dataset_item_and_size_mismatch(tmp_path):
    _write_png(tmp_path / "a.png", 40, 30)
    empty = np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    image, target = DetectionDataset([DetectionRecord(5, tmp_path / "a.png", 40, 30, *empty)])[0]
    assert (
        image.shape == (3, 30, 40) and image.dtype == torch.float32 and float(image[0, 0, 0]) == pytest.approx(90 / 255)
    )
    assert target["boxes"].shape == (0, 4) and target["labels"].dtype == torch.int64 and int(target["image_id"]) == 5
    with pytest.raises(ValueError, match=r"a\.png is 40x30 but its annotation says 50x30 \(image id 5\)"):
        DetectionDataset([DetectionRecord(5, tmp_path / "a.png", 50, 30, *empty)])[0]


# ---------------------------------------------------------------- data module


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
