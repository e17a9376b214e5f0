"""The embedded synthetic detection scenes: determinism, tight boxes, one atomic generation, night camera."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from visionlora.data.detection.datamodule import CocoDetectionDataModule
from visionlora.data.sources import synthetic_scenes
from visionlora.data.sources.synthetic_scenes import (
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


@pytest.mark.parametrize("other_seed, wins", [(0, True), (1, False)])
def test_ensure_when_another_process_finished_first(tmp_path, monkeypatch, other_seed, wins):
    root, splits = tmp_path / "scenes", {"train": 2}
    generate = synthetic_scenes.generate_scenes

    def racing(*args, **kwargs):
        # While this call generates, "another process" publishes the same root (with the same or other settings).
        monkeypatch.setattr(synthetic_scenes, "generate_scenes", generate)
        ensure_synthetic_scenes(root, splits, image_size=64, seed=other_seed)
        return generate(*args, **kwargs)

    monkeypatch.setattr(synthetic_scenes, "generate_scenes", racing)
    if wins:
        assert ensure_synthetic_scenes(root, splits, image_size=64, seed=0) == root
    else:
        with pytest.raises(ValueError, match="scenes exists but holds"):
            ensure_synthetic_scenes(root, splits, image_size=64, seed=0)
    assert json.loads((root / "generation.json").read_text())["seed"] == other_seed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scenes"]  # our staging folder is gone
