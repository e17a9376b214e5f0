"""Albumentations presets: shapes, dtypes, normalisation, cropping, flips, seeding."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from visionlora.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FewShotDataModule,
    data_config_from_model,
    eval_transform,
    eval_transform_from,
    train_transform,
    train_transform_from,
)
from visionlora.data.classification.presets import timm_data_config
from visionlora.data.common import seed_transform


def _apply(transform, image: np.ndarray) -> torch.Tensor:
    return transform(image=image)["image"]


def _expected_constant(value: int, mean, std) -> torch.Tensor:
    return (value / 255.0 - torch.tensor(mean)) / torch.tensor(std)


@pytest.mark.parametrize("shape", [(8, 8, 3), (40, 60, 3)])
def test_shapes_and_dtypes(shape):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    for transform in (train_transform(32), eval_transform(32), eval_transform(32, crop_pct=1.0)):
        out = _apply(transform, image)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32


@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
def test_constant_image_maps_to_normalised_value(crop_pct):
    image = np.full((20, 30, 3), 100, dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    expected = _expected_constant(100, mean, std)[:, None, None].expand(3, 24, 24)
    torch.testing.assert_close(_apply(eval_transform(24, mean, std, crop_pct), image), expected)
    no_jitter = train_transform(24, mean, std, color_jitter=0.0)
    torch.testing.assert_close(_apply(no_jitter, image), expected)
    default = _expected_constant(100, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(_apply(eval_transform(24), image)[:, 5, 5], default)


def test_crop_pct_cuts_the_border_and_one_keeps_it():
    # 100x100 grey image with a white 4-pixel frame: resized to 73 (64 / 0.875) the frame is ~3 px wide and the
    # centre crop removes 4.5 px each side; crop_pct=1.0 keeps it.
    image = np.full((100, 100, 3), 50, dtype=np.uint8)
    image[:4], image[-4:], image[:, :4], image[:, -4:] = 255, 255, 255, 255
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    cropped = _apply(eval_transform(64, mean, std, crop_pct=0.875), image)
    torch.testing.assert_close(cropped, torch.full_like(cropped, 50 / 255))
    whole = _apply(eval_transform(64, mean, std, crop_pct=1.0), image)
    assert whole[:, 0, 0].tolist() == pytest.approx([1.0] * 3) and whole[0, 32, 32].item() == pytest.approx(50 / 255)


def _left_brighter(transform, draws: int = 24) -> list[bool]:
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[:, :8] = 200
    seed_transform(transform, 0)
    return [
        bool(out[0, :, :8].mean() > out[0, :, 8:].mean()) for out in (_apply(transform, image) for _ in range(draws))
    ]


def test_hflip_flag():
    assert all(_left_brighter(train_transform(16, scale=(1.0, 1.0), hflip=False, color_jitter=0.0)))
    flipped = _left_brighter(train_transform(16, scale=(1.0, 1.0), hflip=True, color_jitter=0.0)).count(False)
    assert 4 <= flipped <= 20  # p = 0.5 over 24 seeded draws


def test_seeded_transform_repeats_and_seeds_differ():
    image = np.random.default_rng(1).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    outs = []
    for seed in (5, 5, 6):
        transform = train_transform(16)
        seed_transform(transform, seed)
        outs.append(torch.stack([_apply(transform, image) for _ in range(3)]))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_bad_crop_pct_and_size():
    with pytest.raises(ValueError, match="crop_pct"):
        eval_transform(32, crop_pct=1.5)
    with pytest.raises(ValueError, match="image_size"):
        train_transform(0)


def test_data_config_from_timm_model():
    model = timm.create_model("test_vit", pretrained=False)
    assert data_config_from_model(model) == {
        "image_size": 160,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "crop_pct": 0.95,
    }


def test_transforms_from_preprocessing_match_the_explicit_pipelines():
    prep = {"image_size": 20, "mean": [0.3, 0.3, 0.3], "std": (0.4, 0.4, 0.4), "crop_pct": 0.9,
            "crop_scale": [0.7, 1.0], "hflip": False}
    image = np.random.default_rng(1).integers(0, 256, (30, 26, 3), dtype=np.uint8)
    torch.testing.assert_close(_apply(eval_transform_from(prep), image),
                               _apply(eval_transform(20, prep["mean"], prep["std"], 0.9), image))
    plain, explicit = train_transform_from(prep), train_transform(20, prep["mean"], prep["std"], (0.7, 1.0), False)
    seed_transform(plain, 5)
    seed_transform(explicit, 5)
    torch.testing.assert_close(_apply(plain, image), _apply(explicit, image))
    steps = [type(step).__name__ for step in train_transform_from({**prep, "affine": True}).transforms]
    assert steps == ["Affine", "RandomResizedCrop", "ColorJitter", "Normalize", "ToTensorV2"]
    assert [type(step).__name__ for step in plain.transforms][0] == "RandomResizedCrop"


def test_data_module_and_benchmark_share_the_training_transform():
    data = FewShotDataModule(dataset="digits", image_size=16, affine=True, shots=1)
    data.setup()
    loader_steps = [type(step).__name__ for step in data.train_dataloader().dataset.transform.transforms]
    assert loader_steps == [type(step).__name__ for step in train_transform_from(data.preprocessing).transforms]
    assert loader_steps[0] == "Affine"


@pytest.mark.parametrize("crop_pct, crop_mode", [(1.0, "center"), (0.875, "center"), (1.0, "squash")])
def test_eval_transform_is_what_timm_makes_of_the_exported_config(crop_pct, crop_mode):
    """Evaluation equals timm's own eval transform of the six fields an export writes, on PIL images."""
    from PIL import Image

    prep = {"image_size": 24, "mean": (0.3, 0.3, 0.3), "std": (0.4, 0.4, 0.4), "crop_pct": crop_pct,
            "crop_mode": crop_mode, "interpolation": "bicubic", "crop_scale": (0.85, 1.0), "hflip": False}
    config = timm_data_config(prep)
    assert config == {"input_size": (3, 24, 24), "interpolation": "bicubic", "mean": (0.3, 0.3, 0.3),
                      "std": (0.4, 0.4, 0.4), "crop_pct": crop_pct, "crop_mode": crop_mode}
    client = timm.data.create_transform(**config)
    image = np.random.default_rng(2).integers(0, 256, (31, 57, 3), dtype=np.uint8)  # not square
    torch.testing.assert_close(_apply(eval_transform_from(prep), image), client(Image.fromarray(image)),
                               atol=0.0, rtol=0.0)


def test_strokes_affine_is_the_wider_affine_then_an_elastic_distortion():
    from visionlora.data.classification.presets import STROKES_AFFINE, STROKES_ELASTIC, train_transform_from

    settings = dict(image_size=56, mean=(0.13,) * 3, std=(0.3,) * 3, crop_scale=(0.85, 1.0), hflip=False)
    steps = train_transform_from(settings | {"affine": "strokes"}).transforms
    assert [type(s).__name__ for s in steps[:2]] == ["Affine", "ElasticTransform"]
    assert STROKES_AFFINE["shear"] == (-20.0, 20.0) and steps[1].alpha == STROKES_ELASTIC["alpha"] == 50.0
    assert steps[1].p == 0.5
    plain = train_transform_from(settings | {"affine": True}).transforms
    assert type(plain[0]).__name__ == "Affine" and type(plain[1]).__name__ != "ElasticTransform"
    assert len(steps) == len(plain) + 1 == len(train_transform_from(settings | {"affine": False}).transforms) + 2
    with pytest.raises(ValueError, match="affine must be one of"):
        train_transform_from(settings | {"affine": "wobbly"})
