"""Box-aware presets: boxes move, scale, clip and drop together with the pixels."""

from __future__ import annotations

import albumentations as A
import numpy as np

from visionlora.data.detection.presets import bbox_params, eval_detection_transform, train_detection_transform


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
