"""The registry of named sources: every name resolves, unknown names list the valid ones, torchvision sets work."""

from __future__ import annotations

import csv
import pickle
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torchvision
from PIL import Image

from visionlora.data import CocoDetectionDataModule, FewShotDataModule
from visionlora.data import sources as registry
from visionlora.data.sources import (
    ClassificationPools,
    ClassificationSource,
    DetectionSource,
    LabelledImages,
    classification_source,
    classification_source_names,
    detection_source,
    detection_source_names,
    register_classification_source,
)

CLASSIFICATION = ("digits", "imagefolder", "digits+omniglot", "omniglot", "omniglot-unique", "omniglot-dev",
                  "omniglot-unique56", "omniglot-dev56", "omniglot-unique-rot4", "omniglot-dev-rot4",
                  "torchvision:pets",
                  "torchvision:flowers102", "torchvision:aircraft", "torchvision:food101", "torchvision:cars")
DETECTION = ("synthetic", "synthetic_night", "synthetic_base", "coco")


def test_every_registered_name_resolves_to_its_entry():
    assert classification_source_names() == CLASSIFICATION and detection_source_names() == DETECTION
    for name in CLASSIFICATION:
        source = classification_source(name)
        assert isinstance(source, ClassificationSource) and source.name == name
        assert source.selection_column in ("digits_index", "omniglot_file", "path")
    for name in DETECTION:
        source = detection_source(name)
        assert isinstance(source, DetectionSource) and source.name == name
        assert source.generated == (name != "coco") and (source.default_root is None) == (name == "coco")


def test_sources_state_their_root_and_preprocessing_defaults():
    stroke = {"crop_pct": 1.0, "hflip": False, "crop_scale": (0.85, 1.0)}
    assert not classification_source("digits").needs_root
    assert all(classification_source(name).needs_root for name in CLASSIFICATION if name != "digits")
    assert dict(classification_source("digits").preprocessing) == stroke
    assert dict(classification_source("digits+omniglot").preprocessing) == stroke
    assert dict(classification_source("omniglot").preprocessing) == {**stroke, "affine": True}
    assert dict(classification_source("imagefolder").preprocessing) == {}
    assert dict(classification_source("torchvision:cars").preprocessing) == {}
    assert detection_source("synthetic_base").scenes["seed"] == 1
    assert detection_source("synthetic_night").scenes["camera"] == "night"


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="classification dataset must be one of") as caught:
        classification_source("cifar")
    assert all(repr(name) in str(caught.value) for name in CLASSIFICATION) and "'cifar'" in str(caught.value)
    with pytest.raises(ValueError, match="detection dataset must be one of") as caught:
        detection_source("voc")
    assert all(repr(name) in str(caught.value) for name in DETECTION)
    with pytest.raises(ValueError, match=r"FewShotDataModule: classification dataset .*'torchvision:cars'"):
        FewShotDataModule(dataset="torchvision:imagenet", root="/data")
    with pytest.raises(ValueError, match=r"CocoDetectionDataModule: detection dataset .*'synthetic_base'"):
        CocoDetectionDataModule(dataset="voc")


def test_a_registered_source_is_a_dataset_name_and_names_are_unique(monkeypatch):
    monkeypatch.setattr(registry, "_CLASSIFICATION", dict(registry._CLASSIFICATION))
    images = np.zeros((6, 4, 4, 3), dtype=np.uint8)
    images[3:] = 200
    labels = np.array([0, 0, 0, 1, 1, 1])
    pools = ClassificationPools(["dark", "light"], LabelledImages(images, labels), LabelledImages(images, labels),
                                None, partial(list, range(6)))
    source = ClassificationSource(name="tiles", list_classes=lambda options: ["dark", "light"],
                                  read=lambda options: pools, selection_column="tile", needs_root=False,
                                  preprocessing={"hflip": False})
    assert register_classification_source(source) is source
    data = FewShotDataModule(dataset="tiles", shots=2, image_size=8)
    assert data.class_names == ["dark", "light"] and data.hflip is False and data.crop_pct == 0.875
    data.setup()
    assert np.bincount(data.raw_split("train").labels).tolist() == [2, 2]
    with pytest.raises(ValueError, match="'tiles' is already registered"):
        register_classification_source(source)
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        ClassificationSource(name="x", list_classes=list, read=list, selection_column="path",
                             preprocessing={"crop": 1.0})


def test_data_modules_pickle_for_spawned_processes():
    data = FewShotDataModule(dataset="digits", shots=1)
    again = pickle.loads(pickle.dumps(data))
    assert again.class_names == data.class_names and again.preprocessing == data.preprocessing


class _FakePets:
    """Stands in for torchvision.datasets.OxfordIIITPet: the attributes torchvision_split reads, no download."""

    def __init__(self, root, download, split):
        assert download is False and split in ("trainval", "test")
        count = 9 if split == "trainval" else 6
        self._images = [Path(root) / "oxford-iiit-pet" / "images" / f"{split}_{i}.jpg" for i in range(count)]
        self._labels = [i % 3 for i in range(count)]
        self.classes = ["Abyssinian", "Beagle", "Chihuahua"]


def test_torchvision_set_is_a_data_module_dataset(tmp_path, monkeypatch):
    for split, count in (("trainval", 9), ("test", 6)):
        for i in range(count):
            path = tmp_path / "oxford-iiit-pet" / "images" / f"{split}_{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((20, 30, 3), 60 * (i % 3), dtype=np.uint8)).save(path, format="PNG")
    monkeypatch.setattr(torchvision.datasets, "OxfordIIITPet", _FakePets)
    data = FewShotDataModule(dataset="torchvision:pets", root=str(tmp_path), shots=2, image_size=16,
                             run_dir=str(tmp_path / "run"))
    assert data.class_names == ["Abyssinian", "Beagle", "Chihuahua"] and data.num_classes == 3
    assert (data.hflip, data.crop_pct, data.crop_scale, data.affine) == (True, 0.875, (0.6, 1.0), False)
    data.setup()
    assert np.bincount(data.raw_split("train").labels).tolist() == [2, 2, 2] and len(data.raw_split("test")) == 6
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (6, 3, 16, 16) and sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
    with (tmp_path / "run" / "fewshot_selection.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"].rsplit("_", 1)[0] for row in rows] == ["oxford-iiit-pet/images/trainval"] * 6
    assert {row["class_name"] for row in rows} == {"Abyssinian", "Beagle", "Chihuahua"}
    with pytest.raises(ValueError, match=r"root is required for 'torchvision:pets' \(the folder torchvision's "):
        FewShotDataModule(dataset="torchvision:pets")
