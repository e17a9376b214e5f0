"""COCO reading and checking: problems dropped or clipped with one counted warning, errors naming the record."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from visionlora.data.detection.coco import load_coco

from .conftest import _write_png


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
    with caplog.at_level(logging.WARNING, logger="visionlora.data.detection.coco"):
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


def test_check_image_files_keeps_stored_pixels_and_says_when_exif_explains_a_size_mismatch(tmp_path):
    """A phone photo stored 40x30 with EXIF "turn 90 degrees" whose record gives the turned 30x40 size."""
    from PIL import Image

    from visionlora.data.detection.coco import DetectionRecord, check_image_files

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8)).save(tmp_path / "p.png", exif=exif)
    empty = np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    stored = DetectionRecord(1, tmp_path / "p.png", 40, 30, *empty)
    assert check_image_files([stored], "error", "ann.json") == [stored]
    with pytest.raises(ValueError, match=r"ann\.json: 1 image\(s\) differ.*p\.png is 40x30 but its annotation "
                                         r"record says 30x40 \(image id 1\) \(its EXIF orientation turns it"):
        check_image_files([DetectionRecord(1, tmp_path / "p.png", 30, 40, *empty)], "drop", "ann.json")
