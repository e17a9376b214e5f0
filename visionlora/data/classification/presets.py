"""Preprocessing for few-shot fine-tuning: albumentations training augmentation, timm's own evaluation transform.

Inputs are ``H x W x 3`` uint8 numpy arrays; outputs are float32 ``3 x S x S`` tensors normalised with the
backbone's mean and std. Training augments with albumentations (OpenCV resizing). Evaluation is timm's eval
transform (``timm.data.create_transform``: PIL bicubic resize and ``crop_pct``/``crop_mode`` crop) of the six
fields :func:`timm_data_config` gives, the fields a merged export writes to its ``config.json``: a client that
loads the export with timm alone and builds its transform from that config preprocesses test images exactly as
validation, test and the export check did. :func:`train_transform_from` and :func:`eval_transform_from` build both
from the settings a data module resolved (``FewShotDataModule.preprocessing``), so every trainer and predictor of a
classifier uses the same ones.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

# albumentations checks PyPI for a newer version on every import (a network call with a 2 s timeout); that is
# noise on offline training machines. An explicit setting by the user still wins.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402
from torch import nn  # noqa: E402

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
DEFAULT_CROP_PCT = 0.875
DEFAULT_SCALE: tuple[float, float] = (0.6, 1.0)
DEFAULT_CROP_MODE = "center"
CROP_MODES = ("center", "squash", "border")  # timm's eval crop modes
DATA_CONFIG_KEYS = ("image_size", "mean", "std", "crop_pct")
# What an exported config.json states and timm.data.create_transform takes: evaluation is built from exactly these.
TIMM_DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
_TIMM_ONLY_KEYS = ("input_size", "interpolation", "crop_mode")
# Bicubic like timm's eval default; few-shot images are often upscaled a lot (8x8 digits to 224), where bilinear
# blurs more. cv2 clips the overshoot back into uint8. Training resizes with cv2, evaluation with PIL (timm's).
INTERPOLATION = cv2.INTER_CUBIC
INTERPOLATION_NAME = "bicubic"  # the same, in timm's ``pretrained_cfg`` vocabulary
# The random affine of ``affine=True``: about how much people's drawings of one Omniglot character differ in slant,
# rotation, position and size. Pretraining test_resnet on Omniglot at 56 px for 20 epochs, it cut the nearest-class-
# mean 1-shot error on the 20 official runs from 14.8% to 10.3%.
AFFINE = {"rotate": (-15.0, 15.0), "shear": (-10.0, 10.0), "translate_percent": (-0.08, 0.08), "scale": (0.9, 1.1)}
# ``affine="strokes"``: a wider affine (shear and scale as wide as the distortions of Koch et al. 2015's Siamese
# network, arXiv-less ICML workshop paper) and, on every other image, a mild elastic distortion of the strokes
# (Simard et al. 2003), strengths picked by eye on the 28 px centred render so strokes wobble but do not break.
STROKES_AFFINE = {"rotate": (-15.0, 15.0), "shear": (-20.0, 20.0), "translate_percent": (-0.08, 0.08),
                  "scale": (0.8, 1.2)}
STROKES_ELASTIC = {"alpha": 50.0, "sigma": 5.0, "p": 0.5}
AFFINE_MODES = (False, True, "strokes")


def train_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    scale: tuple[float, float] = DEFAULT_SCALE,
    hflip: bool = True,
    color_jitter: float = 0.2,
) -> A.Compose:
    """Training augmentation: random resized crop, optional horizontal flip, light colour jitter, normalisation.

    The crop scale starts at 0.6 rather than timm's 0.08: with a handful of images per class, crops that keep
    a tenth of the object mostly teach noise.

    Args:
        image_size: Side of the square output.
        mean: Per-channel mean, on the 0..1 scale.
        std: Per-channel standard deviation, on the 0..1 scale.
        scale: Range of the crop's area relative to the image.
        hflip: Flip horizontally with probability 0.5. Turn off for data whose meaning changes when mirrored
            (digits, text, left/right anatomy).
        color_jitter: Strength of the brightness/contrast/saturation jitter (each factor in ``1 ± color_jitter``,
            applied to half the images); 0 disables it. Hue is never shifted: colour is often the class cue.

    Returns:
        A pipeline called as ``transform(image=array)["image"]``.
    """
    _check_size(image_size)
    crop = A.RandomResizedCrop(size=(image_size, image_size), scale=scale, interpolation=INTERPOLATION)
    steps: list[A.BasicTransform] = [crop]
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    if color_jitter > 0:
        steps.append(A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=0.0))
    steps += [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(steps)


class EvalTransform:
    """timm's evaluation transform, called like the albumentations pipelines: ``transform(image=...)["image"]``.

    ``image`` is an ``H x W x 3`` uint8 array (turned into a PIL image first, pixel for pixel) or a PIL image.

    Attributes:
        data_config: The six fields of :data:`TIMM_DATA_CONFIG_KEYS` it was built from (an export's config.json).
        transform: timm's own pipeline (a torchvision ``Compose``: PIL image in, normalised tensor out).
    """

    def __init__(self, data_config: Mapping[str, object]) -> None:
        # Imported here so that the training pipelines do not pay for importing timm.
        from timm.data import create_transform

        self.data_config = {key: data_config[key] for key in TIMM_DATA_CONFIG_KEYS}
        self.transform = create_transform(**self.data_config, is_training=False)

    def __call__(self, *, image: np.ndarray | Image.Image) -> dict[str, torch.Tensor]:
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
                raise ValueError(f"EvalTransform: expected an H x W x 3 uint8 array, got {image.shape} {image.dtype}")
            image = Image.fromarray(image)
        elif image.mode != "RGB":
            image = image.convert("RGB")
        return {"image": self.transform(image)}

    def __repr__(self) -> str:
        return f"EvalTransform({self.data_config})"


def eval_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_pct: float = DEFAULT_CROP_PCT,
    crop_mode: str = DEFAULT_CROP_MODE,
    interpolation: str = INTERPOLATION_NAME,
) -> EvalTransform:
    """Deterministic evaluation pipeline, timm's: resize, crop, normalisation (see :class:`EvalTransform`).

    Args:
        image_size: Side of the square output.
        mean: Per-channel mean, on the 0..1 scale.
        std: Per-channel standard deviation, on the 0..1 scale.
        crop_pct: Share of the resized image kept by the centre crop, in ``(0, 1]``: the image is resized to
            ``floor(image_size / crop_pct)`` (how depends on ``crop_mode``) and the centre ``image_size`` square
            kept, as timm does.
        crop_mode: timm's ``"center"`` (the shorter side is resized, aspect ratio kept: the long side of a
            non-square image is cut even at ``crop_pct=1``), ``"squash"`` (both sides resized, aspect ratio not kept:
            nothing is cut at ``crop_pct=1``) or ``"border"`` (the longer side, padded with the mean colour).
        interpolation: timm's name of the PIL resize filter (``"bicubic"``, ``"bilinear"``, ...).

    Returns:
        A pipeline called as ``transform(image=array)["image"]``.
    """
    return eval_transform_from({"image_size": image_size, "mean": mean, "std": std, "crop_pct": crop_pct,
                                "crop_mode": crop_mode, "interpolation": interpolation})


def timm_data_config(preprocessing: Mapping[str, object]) -> dict:
    """The six fields timm builds an evaluation transform from, of resolved preprocessing settings.

    They are what a merged export writes to its ``config.json`` (``pretrained_cfg``) and what
    :func:`eval_transform_from` hands to ``timm.data.create_transform``, so the two cannot differ.

    Args:
        preprocessing: ``image_size``, ``mean``, ``std``, ``crop_pct`` and optionally ``crop_mode`` (default
            ``"center"``) and ``interpolation`` (default ``"bicubic"``), as ``FewShotDataModule.preprocessing``.

    Returns:
        ``{"input_size": (3, S, S), "interpolation", "mean", "std", "crop_pct", "crop_mode"}``.

    Raises:
        ValueError: An image size below 1, ``crop_pct`` outside ``(0, 1]`` or an unknown ``crop_mode``.
    """
    size, crop_pct = int(preprocessing["image_size"]), float(preprocessing["crop_pct"])
    crop_mode = preprocessing.get("crop_mode") or DEFAULT_CROP_MODE
    _check_size(size)
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"eval transform: crop_pct must be in (0, 1], got {crop_pct}")
    if crop_mode not in CROP_MODES:
        raise ValueError(f"eval transform: crop_mode must be one of {CROP_MODES}, got {crop_mode!r}")
    mean, std = (tuple(float(v) for v in preprocessing[key]) for key in ("mean", "std"))
    interpolation = preprocessing.get("interpolation") or INTERPOLATION_NAME
    return {"input_size": (3, size, size), "interpolation": interpolation, "mean": mean, "std": std,
            "crop_pct": crop_pct, "crop_mode": crop_mode}


def train_transform_from(preprocessing: Mapping[str, object]) -> A.Compose:
    """The training pipeline of resolved preprocessing settings: :func:`train_transform`, after :data:`AFFINE`.

    Args:
        preprocessing: ``image_size``, ``mean``, ``std``, ``crop_scale``, ``hflip`` and optionally ``affine`` (off
            when missing), as ``FewShotDataModule.preprocessing`` returns them (lists are taken as tuples).
    """
    transform = train_transform(preprocessing["image_size"], preprocessing["mean"], preprocessing["std"],
                                tuple(preprocessing["crop_scale"]), preprocessing["hflip"])
    mode = preprocessing.get("affine") or False
    return with_random_affine(transform, mode) if mode else transform


def eval_transform_from(preprocessing: Mapping[str, object]) -> EvalTransform:
    """The evaluation transform of resolved preprocessing settings: validation, test, export checks, prediction.

    It is ``timm.data.create_transform(**timm_data_config(preprocessing))`` on PIL images, the transform a client
    builds from an exported ``config.json`` with timm alone (see :func:`timm_data_config`).

    Args:
        preprocessing: ``image_size``, ``mean``, ``std``, ``crop_pct`` and optionally ``crop_mode`` and
            ``interpolation``, as ``FewShotDataModule.preprocessing`` returns them (other keys are ignored).

    Returns:
        An :class:`EvalTransform`, called as ``transform(image=array_or_pil)["image"]``.
    """
    return EvalTransform(timm_data_config(preprocessing))


def with_random_affine(transform: A.Compose, mode: bool | str = True) -> A.Compose:
    """``transform`` preceded by the random affine :data:`AFFINE` (uncovered borders black, Omniglot's background);
    ``mode="strokes"``: by :data:`STROKES_AFFINE` and the elastic distortion :data:`STROKES_ELASTIC` instead."""
    if mode not in AFFINE_MODES:
        raise ValueError(f"affine must be one of {AFFINE_MODES}, got {mode!r}")
    if mode == "strokes":
        steps = [A.Affine(**STROKES_AFFINE, fill=0, p=1.0), A.ElasticTransform(**STROKES_ELASTIC, fill=0)]
    else:
        steps = [A.Affine(**AFFINE, fill=0, p=1.0)]
    return A.Compose([*steps, *transform.transforms])


def data_config_from_model(model: nn.Module) -> dict:
    """The preprocessing a timm model expects, in the form :meth:`FewShotDataModule.set_data_config` takes.

    Args:
        model: A model built by ``timm.create_model`` (its ``pretrained_cfg`` holds the settings).

    Returns:
        ``{"image_size": int, "mean": tuple, "std": tuple, "crop_pct": float}``.

    Raises:
        ValueError: If the model's input size is not square (the pipelines here produce square images).
    """
    # Imported here so that using the pipelines does not pay for importing timm.
    from timm.data import resolve_model_data_config

    return normalize_data_config(resolve_model_data_config(model))


def normalize_data_config(config: dict) -> dict:
    """Our ``image_size/mean/std/crop_pct`` keys from either those keys or timm's ``resolve_data_config`` output.

    timm's ``input_size`` (``(C, H, W)``, square only) becomes ``image_size``; its ``interpolation`` and
    ``crop_mode`` are dropped (resizing here is always bicubic; the crop mode is the data module's ``crop_mode``).
    Missing keys stay missing. Any other key raises, so a misspelt setting is not silently ignored.
    """
    unknown = sorted(set(config) - set(DATA_CONFIG_KEYS) - set(_TIMM_ONLY_KEYS))
    if unknown:
        raise ValueError(
            f"data config: unknown keys {unknown}; expected {DATA_CONFIG_KEYS} or timm's {_TIMM_ONLY_KEYS}"
        )
    out = {key: config[key] for key in DATA_CONFIG_KEYS if config.get(key) is not None}
    if "image_size" not in out and config.get("input_size") is not None:
        height, width = config["input_size"][-2:]
        if height != width:
            raise ValueError(f"data config: input_size {tuple(config['input_size'])} is not square")
        out["image_size"] = int(height)
    for key in ("mean", "std"):
        if key in out:
            out[key] = tuple(float(v) for v in out[key])
    if "crop_pct" in out:
        out["crop_pct"] = float(out["crop_pct"])
    return out


def _check_size(image_size: int) -> None:
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
