"""FewShotDataModule end to end: batches, seeding, splits, preprocessing resolution, selection file, CLI."""

from __future__ import annotations

import csv
import inspect
import re
from collections import Counter

import numpy as np
import pytest
import timm
import torch
from jsonargparse import ArgumentParser
from sklearn.datasets import load_digits

from visionlora.data import FewShotDataModule, data_config_from_model, digits_split

from ..conftest import CLASS_SIZES


def _digits(**kwargs) -> FewShotDataModule:
    kwargs.setdefault("image_size", 16)
    dm = FewShotDataModule(dataset="digits", **kwargs)
    dm.setup("fit")
    return dm


def _all_batches(loader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def test_digits_batches():
    dm = _digits(shots=5, batch_size=16)
    batches = list(dm.train_dataloader())
    assert [tuple(x.shape) for x, _ in batches] == [(16, 3, 16, 16), (9, 3, 16, 16)]
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in batches)
    assert Counter(torch.cat([y for _, y in batches]).tolist()) == {c: 5 for c in range(5)}
    images, labels = _all_batches(dm.test_dataloader())
    assert images.shape == (449, 3, 16, 16) and labels.tolist() == digits_split("novel", "test")[1].tolist()
    assert dm.val_dataloader() == []


def test_same_seed_same_batches_other_seed_other_shots():
    first, again = _all_batches(_digits(seed=3).train_dataloader()), _all_batches(_digits(seed=3).train_dataloader())
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    other = _all_batches(_digits(seed=4).train_dataloader())
    assert not torch.equal(first[0].sum((1, 2, 3)).sort().values, other[0].sum((1, 2, 3)).sort().values)
    # the test set never depends on the seed
    assert torch.equal(_digits(seed=3).sample_batch(8), _digits(seed=4).sample_batch(8))


def test_two_workers_reproducible_and_epochs_differ():
    dm = _digits(shots=2, batch_size=2, num_workers=2)
    loader = dm.train_dataloader()
    epoch1, epoch2 = _all_batches(loader)[0], _all_batches(loader)[0]
    assert not torch.equal(epoch1, epoch2)
    assert torch.equal(epoch1, _all_batches(_digits(shots=2, batch_size=2, num_workers=2).train_dataloader())[0])


def test_validation_from_pool_minus_shots():
    dm = _digits(shots=5, val_fraction=0.1, run_dir=None)
    val = dm.val_dataloader().dataset
    # pool per class 91, 90, 89, 87, 90 minus 5 shots, 10 % rounded half up: 9, 9, 8, 8, 9
    assert Counter(val.labels.tolist()) == {0: 9, 1: 9, 2: 8, 3: 8, 4: 9}
    train = dm.train_dataloader().dataset
    pool = digits_split("novel", "train")[0]
    rows = {arr.tobytes() for arr in pool}
    assert len(rows & {a.tobytes() for a in val.images}) == len({a.tobytes() for a in val.images})
    assert not {a.tobytes() for a in val.images} & {a.tobytes() for a in train.images}
    capped = _digits(shots=5, val_fraction=0.5).val_dataloader().dataset
    assert Counter(capped.labels.tolist()) == {c: 20 for c in range(5)}


def test_all_shots_leave_validation_out():
    dm = _digits(shots=None, val_fraction=0.1)
    # pool 447; validation 9 + 9 + 9 + 9 + 9 (10 % of 91, 90, 89, 87, 90 rounded half up)
    assert len(dm.val_dataloader().dataset) == 45 and len(dm.train_dataloader().dataset) == 447 - 45


def test_selection_file_for_digits(tmp_path):
    _digits(shots=3, seed=1, run_dir=str(tmp_path / "run"))
    with (tmp_path / "run" / "fewshot_selection.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert Counter(row["class_name"] for row in rows) == {str(d): 3 for d in range(5, 10)}
    target = load_digits().target
    assert all(str(target[int(row["digits_index"])]) == row["class_name"] for row in rows)
    assert all(int(row["label"]) == int(row["class_name"]) - 5 for row in rows)


def test_imagefolder_end_to_end(folder_root, tmp_path):
    dm = FewShotDataModule(
        dataset="imagefolder",
        root=str(folder_root),
        shots=3,
        image_size=24,
        batch_size=4,
        run_dir=str(tmp_path / "run"),
    )
    assert dm.num_classes == 3 and dm.class_names == ["cat", "dog", "fox"]
    dm.setup("fit")
    shapes = [tuple(x.shape) for x, _ in dm.train_dataloader()]
    assert shapes == [(4, 3, 24, 24), (4, 3, 24, 24), (1, 3, 24, 24)]
    images, labels = _all_batches(dm.test_dataloader())
    assert images.shape == (6, 3, 24, 24) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    with (tmp_path / "run" / "fewshot_selection.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert Counter(row["class_name"] for row in rows) == {"cat": 3, "dog": 3, "fox": 3}
    assert all(row["path"].startswith(row["class_name"] + "/") and "broken" not in row["path"] for row in rows)


def test_num_classes_before_setup_without_opening_images(folder_root):
    dm = FewShotDataModule(dataset="imagefolder", root=str(folder_root))
    assert dm.num_classes == 3 and dm._parts is None
    assert FewShotDataModule(classes="all").num_classes == 10 and FewShotDataModule().class_names[0] == "5"


def test_too_few_images_names_the_class(folder_root):
    # dog has 6 readable images
    dm = FewShotDataModule(dataset="imagefolder", root=str(folder_root), shots=5)
    with pytest.raises(ValueError, match=r"'dog' \(label 1\) has 4"):
        dm.setup("fit")


def test_bad_image_error_mode_raises_at_setup(folder_root):
    dm = FewShotDataModule(dataset="imagefolder", root=str(folder_root), on_bad_image="error")
    with pytest.raises(ValueError, match="broken.png"):
        dm.setup("fit")


def test_sample_batch_is_spread_over_the_test_set():
    dm = FewShotDataModule(image_size=16)
    batch = dm.sample_batch(5)
    assert batch.shape == (5, 3, 16, 16) and batch.dtype == torch.float32
    images, labels = _all_batches(dm.test_dataloader())
    # classes in turn: the first test image of each class, then the second of class 0
    firsts = [int(np.flatnonzero(labels.numpy() == c)[0]) for c in range(5)]
    torch.testing.assert_close(batch, images[firsts])
    second_of_0 = int(np.flatnonzero(labels.numpy() == 0)[1])
    torch.testing.assert_close(dm.sample_batch(6)[5], images[second_of_0])
    with pytest.raises(ValueError, match="n must be in"):
        dm.sample_batch(450)


def test_preprocessing_resolution():
    backbone = {"image_size": 160, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 0.9}
    dm = FewShotDataModule(image_size=32)
    dm.set_data_config(backbone)
    prep = dm.preprocessing
    assert prep["image_size"] == 32 and prep["mean"] == (0.5, 0.5, 0.5)
    assert prep["crop_pct"] == 1.0 and prep["hflip"] is False  # digits: no crop, no flips
    explicit = FewShotDataModule(hflip=True, crop_pct=0.8).preprocessing
    assert (explicit["hflip"], explicit["crop_pct"]) == (True, 0.8)
    default = FewShotDataModule().preprocessing
    assert default["image_size"] == 224 and default["std"] == (0.229, 0.224, 0.225)
    with pytest.raises(ValueError, match=r"unknown keys \['img_size'\]"):
        dm.set_data_config({"img_size": 224})


def test_timm_data_config_accepted_and_attributes_read_resolved_values():
    model = timm.create_model("test_vit", pretrained=False)
    dm = FewShotDataModule(dataset="digits", std=(0.2, 0.2, 0.2))
    assert (dm.image_size, dm.mean, dm.crop_pct, dm.hflip) == (224, (0.485, 0.456, 0.406), 1.0, False)
    dm.set_data_config(timm.data.resolve_model_data_config(model))  # input_size, interpolation, crop_mode, ...
    assert (dm.image_size, dm.mean, dm.std) == (160, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    dm.set_data_config(data_config_from_model(model))
    assert dm.image_size == 160 and dm.preprocessing["interpolation"] == "bicubic"
    with pytest.raises(AttributeError, match="read-only"):
        dm.image_size = 32


def test_imagefolder_defaults_follow_the_backbone(folder_root):
    dm = FewShotDataModule(dataset="imagefolder", root=str(folder_root), shots=2)
    assert dm.preprocessing["crop_pct"] == 0.875 and dm.preprocessing["hflip"] is True
    dm.set_data_config({"crop_pct": 0.95, "image_size": 20})
    dm.setup()
    assert dm.preprocessing["crop_pct"] == 0.95 and dm.sample_batch(2).shape == (2, 3, 20, 20)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"dataset": "cifar"}, "dataset"),
        ({"dataset": "imagefolder"}, "root"),
        ({"root": "/data"}, "root"),
        ({"shots": 0}, "shots"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"on_bad_image": "ignore"}, "on_bad_image"),
        ({"classes": "odd"}, "classes"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FewShotDataModule(**kwargs)


def test_every_argument_is_documented_and_cli_builds_it():
    doc = inspect.getdoc(FewShotDataModule)
    documented = set(re.findall(r"^    (\w+): ", doc.split("Args:")[1], flags=re.M))
    assert documented == set(inspect.signature(FewShotDataModule).parameters)
    parser = ArgumentParser()
    parser.add_class_arguments(FewShotDataModule, "data")
    assert "Training images per class" in parser.format_help()
    cfg = parser.parse_args(["--data.shots", "2", "--data.mean", "[0.1, 0.2, 0.3]", "--data.image_size", "8"])
    dm = parser.instantiate(cfg).data
    assert (dm.shots, dm.preprocessing["mean"], dm.num_classes) == (2, (0.1, 0.2, 0.3), 5)


def test_dataloader_before_setup_is_an_error():
    with pytest.raises(RuntimeError, match="setup"):
        FewShotDataModule().train_dataloader()
    assert sum(CLASS_SIZES.values()) == 21


def test_crop_mode_resolves_to_timm_default_and_is_checked():
    assert FewShotDataModule().preprocessing["crop_mode"] == "center"
    dm = FewShotDataModule(crop_mode="squash", image_size=16)
    dm.set_data_config({"input_size": (3, 24, 24), "crop_mode": "border"})  # the backbone's does not override it
    assert dm.crop_mode == "squash" and dm.image_size == 16
    with pytest.raises(ValueError, match="crop_mode"):
        FewShotDataModule(crop_mode="middle")


def test_validation_draw_that_leaves_no_training_image_is_named_at_setup(tmp_path):
    """One training image per class and val_fraction 0.5 of the whole pool: all of them would go to validation."""
    from ..conftest import make_class_folders

    root = make_class_folders(tmp_path / "pairs", {"a": 2, "b": 2})  # 1 train + 1 test per class
    dm = FewShotDataModule(dataset="imagefolder", root=str(root), shots=None, val_fraction=0.5)
    with pytest.raises(ValueError, match=r"no training image left.*imagefolder.*val_fraction=0\.5") as error:
        dm.setup()
    assert len(str(error.value).splitlines()) == 1
