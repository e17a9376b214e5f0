"""Box-aware albumentations pipelines for few-shot object detection.

Inputs are ``H x W x 3`` uint8 arrays with ``pascal_voc`` boxes (absolute ``x0, y0, x1, y1`` pixel-edge
coordinates) and their ``labels``; outputs stay uint8 arrays in the same box format. Normalisation is left to
the detector (torchvision's ``GeneralizedRCNNTransform`` normalises and batches), so the pipelines only move
pixels and boxes together. A box that augmentation cuts down below ``min_visibility`` of its area or
``min_area`` pixels is removed together with its label, and every kept box is clipped to the image.

Called as ``transform(image=array, bboxes=float [N, 4], labels=int64 [N])``; returns the same keys.
"""

from __future__ import annotations

import os

# albumentations checks PyPI for a newer version on every import; classification/presets.py explains (and does
# the same).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402

# Padding takes the ImageNet mean colour: after the detector normalises, padded pixels are 0, the same value
# torchvision uses when it pads a batch, so the model never sees two kinds of border.
PAD_FILL: tuple[int, int, int] = (124, 116, 104)
DEFAULT_SCALE: tuple[float, float] = (0.75, 1.25)
DEFAULT_MIN_VISIBILITY = 0.3
DEFAULT_MIN_AREA = 4.0
# Bilinear like torchvision's detection transforms; cv2 keeps the result in uint8.
INTERPOLATION = cv2.INTER_LINEAR


def bbox_params(min_visibility: float = DEFAULT_MIN_VISIBILITY, min_area: float = DEFAULT_MIN_AREA) -> A.BboxParams:
    """How the pipelines treat boxes: ``pascal_voc`` format, ``labels`` kept in step, clipped, small ones dropped.

    Args:
        min_visibility: Drop a box (and its label) when less than this share of its area is left after cropping.
        min_area: Drop a box (and its label) when its area after the transform is below this many pixels.
    """
    if not 0.0 <= min_visibility <= 1.0 or min_area < 0:
        raise ValueError(
            f"bbox_params: need min_visibility in [0, 1] and min_area >= 0, got {min_visibility}, {min_area}"
        )
    return A.BboxParams(
        format="pascal_voc",
        label_fields=["labels"],
        min_visibility=min_visibility,
        min_area=min_area,
        clip=True,
        filter_invalid_bboxes=True,
    )


def train_detection_transform(
    image_size: int,
    scale: tuple[float, float] = DEFAULT_SCALE,
    hflip: bool = True,
    color_jitter: float = 0.2,
    min_visibility: float = DEFAULT_MIN_VISIBILITY,
    min_area: float = DEFAULT_MIN_AREA,
) -> A.Compose:
    """Training augmentation: fit, random rescale, pad or crop to a square at a random place, flip, colour jitter.

    The image is first resized so that its longer side is ``image_size``, then rescaled by a random factor in
    ``scale``; a smaller result is padded (mean colour) and a larger one randomly cropped, each to
    ``image_size x image_size``, so objects change size and position while keeping their aspect ratio. The
    scale range stays close to 1: with a few boxes per class, strong zoom mostly cuts objects in half.

    Args:
        image_size: Side of the square output.
        scale: Range of the random rescale factor.
        hflip: Flip horizontally with probability 0.5 (a box ``x0, x1`` becomes ``W - x1, W - x0``). Turn off
            for data whose meaning changes when mirrored (text, digits).
        color_jitter: Strength of the brightness/contrast/saturation jitter (half the images); 0 disables it.
            Hue is never shifted: colour is often what tells classes apart.
        min_visibility: See :func:`bbox_params`.
        min_area: See :func:`bbox_params`.

    Returns:
        A pipeline called as ``transform(image=..., bboxes=..., labels=...)``.
    """
    _check_size(image_size)
    if not 0.0 < scale[0] <= scale[1]:
        raise ValueError(f"train_detection_transform: scale must be (low, high) with 0 < low <= high, got {scale}")
    steps: list[A.BasicTransform] = [
        A.LongestMaxSize(max_size=image_size, interpolation=INTERPOLATION),
        A.RandomScale(scale_limit=(scale[0] - 1.0, scale[1] - 1.0), interpolation=INTERPOLATION, p=1.0),
        A.PadIfNeeded(image_size, image_size, position="random", border_mode=cv2.BORDER_CONSTANT, fill=PAD_FILL),
        A.RandomCrop(image_size, image_size),
    ]
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    if color_jitter > 0:
        steps.append(A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=0.0))
    return A.Compose(steps, bbox_params=bbox_params(min_visibility, min_area))


def eval_detection_transform(image_size: int, pad_to_square: bool = False) -> A.Compose:
    """Deterministic evaluation pipeline: resize so the longer side is ``image_size``, aspect ratio kept.

    Every box is scaled by the same factor ``image_size / max(H, W)``, so predictions map back to the original
    image by dividing by it. Images of other aspect ratios come out in other sizes, which the detector accepts
    (it batches images of different sizes itself); ``pad_to_square`` pads the bottom and right with the mean
    colour instead, which keeps box coordinates unchanged and gives equal sizes (e.g. for a fixed-shape export).

    Args:
        image_size: Longer side of the output.
        pad_to_square: Pad to ``image_size x image_size`` at the bottom and right.

    Returns:
        A pipeline called as ``transform(image=..., bboxes=..., labels=...)``.
    """
    _check_size(image_size)
    steps: list[A.BasicTransform] = [A.LongestMaxSize(max_size=image_size, interpolation=INTERPOLATION)]
    if pad_to_square:
        steps.append(
            A.PadIfNeeded(image_size, image_size, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=PAD_FILL)
        )
    # Nothing is cropped here, so no box may be dropped for visibility; only degenerate ones could go.
    return A.Compose(steps, bbox_params=bbox_params(min_visibility=0.0, min_area=0.0))


def _check_size(image_size: int) -> None:
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
