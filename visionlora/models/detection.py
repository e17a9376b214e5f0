"""Object detectors on any timm backbone: torchvision's FCOS, RetinaNet and Faster R-CNN over an FPN, ready for LoRA.

The backbone is timm's ``features_only`` model; its maps feed a feature pyramid network (FPN, Lin et al. 2017,
arXiv:1612.03144) and one of torchvision's detectors: FCOS (Tian et al. 2019, arXiv:1904.01355), RetinaNet (Lin et
al. 2017, arXiv:1708.02002) or Faster R-CNN (Ren et al. 2015, arXiv:1506.01497). A plain ViT, whose blocks all have
one stride, gets ViTDet's simple feature pyramid from its last map first (Li et al. 2022, arXiv:2203.16527).

Module layout (what LoRA targets and checkpoints see): ``backbone.body`` (timm), ``backbone.pyramid`` (plain ViTs
only), ``backbone.fpn``, then the detector's own ``head`` (FCOS, RetinaNet) or ``rpn`` + ``roi_heads`` (Faster R-CNN).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Format, freeze_batch_norm_2d
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from visionlora.lora import lora_state, unload_lora

from .backbone import LOCAL_DIR, create_backbone

DETECTORS = ("fcos", "retinanet", "faster_rcnn")
# FCOS's head normalises with GroupNorm(32, channels).
FCOS_GROUPS = 32
# create_detector's arguments as LoraDetector's hyperparameters of the same names: enough to rebuild the detector.
DETECTOR_KWARGS = ("backbone", "num_classes", "detector", "pretrained", "pretrained_file", "model_args",
                   "out_indices", "fpn_channels", "min_size", "max_size", "anchor_scale", "image_mean", "image_std",
                   "detector_args", "freeze_bn")


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid from one map of stride s: a 2x2 deconvolution gives s/2, the map itself s, max-pooling 2s."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2)
        self.down = nn.MaxPool2d(kernel_size=2, stride=2)
        self.out_channels = [channels // 2, channels, channels]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.up(x), x, self.down(x)]


class TimmFPN(nn.Module):
    """A timm feature extractor, an optional simple pyramid and an FPN: what torchvision's detectors call backbone.

    Args:
        body: A timm ``features_only`` model.
        levels: Which of ``body``'s outputs to use (indices into its list of maps).
        fpn_channels: Channels of every FPN map (``out_channels``).
        extra_blocks: torchvision's extra FPN levels (P6/P7 for one-stage detectors, a max-pool for Faster R-CNN).
    """

    def __init__(self, body: nn.Module, levels: list[int], fpn_channels: int, extra_blocks: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.levels = levels
        channels = [body.feature_info.channels()[i] for i in levels]
        reductions = [body.feature_info.reduction()[i] for i in levels]
        self.channels_last = getattr(body, "output_fmt", Format.NCHW) == Format.NHWC
        self.pyramid = SimpleFeaturePyramid(channels[-1]) if is_plain(body) else None
        if self.pyramid is not None:
            channels, reductions = self.pyramid.out_channels, [reductions[-1] // 2, reductions[-1], reductions[-1] * 2]
        self.fpn = FeaturePyramidNetwork(channels, fpn_channels, extra_blocks=extra_blocks)
        self.out_channels = fpn_channels
        self.strides = reductions + [reductions[-1] * 2**k for k in (1, 2)][: _extra_levels(extra_blocks)]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body(x)
        maps = [maps[i] for i in self.levels]
        if self.channels_last:
            maps = [m.permute(0, 3, 1, 2) for m in maps]
        if self.pyramid is not None:
            maps = self.pyramid(maps[-1])
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


class ForegroundLabels:
    """Labels 1..C outside, 0..C-1 inside torchvision's one-stage detectors (mixed in before FCOS or RetinaNet).

    Their sigmoid classifiers index the class outputs by label and have no background output: fed labels 1..C
    directly they would need an output for a "class 0" that is never positive yet still gets predicted. Faster
    R-CNN keeps torchvision's softmax with background at 0. So all three share one label space: 1..C, 0 = none.
    """

    def compute_loss(self, targets: list[dict], *args):
        return super().compute_loss([{**t, "labels": t["labels"] - 1} for t in targets], *args)

    def postprocess_detections(self, *args) -> list[dict]:
        detections = super().postprocess_detections(*args)
        for found in detections:
            found["labels"] = found["labels"] + 1
        return detections


class OneStageFCOS(ForegroundLabels, FCOS):
    """torchvision's FCOS with labels 1..C."""


class OneStageRetinaNet(ForegroundLabels, RetinaNet):
    """torchvision's RetinaNet with labels 1..C."""


def create_detector(backbone: str, num_classes: int, detector: str = "fcos", pretrained: bool = False,
                    pretrained_file: str | None = None, model_args: dict | None = None,
                    out_indices: tuple[int, ...] | None = None, fpn_channels: int = 128, min_size: int = 256,
                    max_size: int = 512, anchor_scale: float = 4.0, image_mean: list[float] | None = None,
                    image_std: list[float] | None = None, detector_args: dict | None = None,
                    freeze_bn: bool = True) -> nn.Module:
    """Build a torchvision detector on a timm backbone with an FPN; BatchNorm in the backbone is frozen by default.

    Args:
        backbone: timm architecture name (a ``local-dir:`` ``pretrained_file`` names its own, as in
            :func:`~visionlora.models.create_backbone`).
        num_classes: Foreground classes; labels are 1..num_classes and 0 is background.
        detector: ``fcos``, ``retinanet`` or ``faster_rcnn``.
        pretrained: Load timm's pretrained classification weights from the hub into the backbone.
        pretrained_file: Local backbone weights: a file, or ``local-dir:<folder>`` (config.json + model.safetensors).
        model_args: Extra ``timm.create_model`` arguments. ViT-like models get ``dynamic_img_size=True`` unless
            given, since the detector feeds them images of any (padded) size.
        out_indices: timm feature levels to use; default: the maps of stride >= 8 (the deepest three), or the last
            block of a plain ViT, which feeds the simple pyramid (strides s/2, s, 2s).
        fpn_channels: Channels of the FPN and head (a multiple of 32 for FCOS, whose head uses GroupNorm(32)).
        min_size: Shorter image side after the detector's own resize (torchvision's GeneralizedRCNNTransform).
        max_size: Cap on the longer side after that resize.
        anchor_scale: Anchor side / feature stride for RetinaNet and Faster R-CNN (4: 32 px anchors at stride 8).
            FCOS always uses the stride itself, as its box coding and size ranges assume.
        image_mean: Normalisation mean (0..1 images); default: the backbone's pretrained_cfg.
        image_std: Normalisation std; default: the backbone's pretrained_cfg.
        detector_args: Extra keyword arguments for the torchvision detector (``score_thresh``, ``nms_thresh``,
            ``detections_per_img``, ``box_batch_size_per_image``, ...).
        freeze_bn: Replace the backbone's BatchNorm by frozen copies of its (pretrained) statistics and affine, as
            torchvision and detectron2 do for fine-tuning. Set False only to train a backbone from scratch: frozen
            at random initialisation, BatchNorm stays the identity and the zero-initialised last BatchNorm of each
            timm residual block (``zero_init_last``) stays zero, which switches every residual branch off for good.
    """
    if detector not in DETECTORS:
        raise ValueError(f"detector must be one of {DETECTORS}, got {detector!r}")
    if detector == "fcos" and fpn_channels % FCOS_GROUPS:
        raise ValueError(f"fpn_channels must be a multiple of {FCOS_GROUPS} for FCOS (GroupNorm), got {fpn_channels}")
    body = create_features(backbone, pretrained, pretrained_file, model_args, out_indices, freeze_bn)
    levels = select_levels(body.feature_info.reduction(), explicit=out_indices is not None)
    extra = LastLevelMaxPool() if detector == "faster_rcnn" else LastLevelP6P7(fpn_channels, fpn_channels)
    neck = TimmFPN(body, levels, fpn_channels, extra)
    cfg = getattr(body, "pretrained_cfg", None) or {}
    image_mean = list(image_mean or cfg.get("mean", IMAGENET_DEFAULT_MEAN))
    image_std = list(image_std or cfg.get("std", IMAGENET_DEFAULT_STD))
    common = dict(min_size=min_size, max_size=max_size, image_mean=image_mean, image_std=image_std)
    model = build_detector(detector, neck, num_classes, anchor_scale, common | (detector_args or {}))
    # A plain ViT's pooled map needs the padded size to be a multiple of twice its patch stride.
    model.transform.size_divisible = neck.strides[1] * 2 if neck.pyramid is not None else 32
    return model


def detector_config(hparams, weightless: bool = False) -> dict:
    """:func:`create_detector`'s keyword arguments from hyperparameters of the same names (a ``LoraDetector``'s).

    Args:
        hparams: A mapping with (some of) :data:`DETECTOR_KWARGS`; one a checkpoint from before an argument existed
            lacks is left to create_detector's default, which is what that detector was built with.
        weightless: Build without loading pretrained weights (``pretrained=False``, ``pretrained_file=None``):
            the weights come from a checkpoint or a folder instead.
    """
    config = {k: hparams[k] for k in DETECTOR_KWARGS if k in hparams}
    return config | {"pretrained": False, "pretrained_file": None} if weightless else config


def build_detector(detector: str, neck: TimmFPN, num_classes: int, anchor_scale: float, kwargs: dict) -> nn.Module:
    """The torchvision detector for ``num_classes`` foreground classes with anchors sized for ``neck.strides``."""
    strides = neck.strides
    if detector == "fcos":
        anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
        return OneStageFCOS(neck, num_classes, anchor_generator=anchors, **kwargs)
    if detector == "retinanet":
        # Three octave scales per level, as in the RetinaNet paper.
        sizes = tuple(tuple(round(anchor_scale * s * 2 ** (k / 3)) for k in range(3)) for s in strides)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(strides))
        return OneStageRetinaNet(neck, num_classes, anchor_generator=anchors, **kwargs)
    anchors = AnchorGenerator(tuple((round(anchor_scale * s),) for s in strides), ((0.5, 1.0, 2.0),) * len(strides))
    # RoIs are pooled from the FPN levels proper, not from the extra max-pooled one.
    pool = MultiScaleRoIAlign([str(i) for i in range(len(strides) - 1)], output_size=7, sampling_ratio=2)
    return FasterRCNN(neck, num_classes + 1, rpn_anchor_generator=anchors, box_roi_pool=pool, **kwargs)


def create_features(backbone: str, pretrained: bool, pretrained_file: str | None, model_args: dict | None,
                    out_indices: tuple[int, ...] | None, freeze_bn: bool = True) -> nn.Module:
    """timm's ``features_only`` model with pretrained classification weights loaded and BatchNorm frozen (default)."""
    local_dir = bool(pretrained_file) and Path(pretrained_file.removeprefix(LOCAL_DIR)).is_dir()
    if not local_dir and ":" not in backbone and not timm.is_model(backbone):
        raise ValueError(f"unknown timm backbone {backbone!r} (see timm.list_models())")
    args = dict(model_args or {}, features_only=True)
    if out_indices is not None:
        args["out_indices"] = tuple(out_indices)
    try:
        # The detector pads images to sizes that vary per batch, which a ViT only accepts with dynamic_img_size.
        body = create_backbone(backbone, 0, pretrained, pretrained_file, {"dynamic_img_size": True} | args)
    except TypeError as err:
        if "dynamic_img_size" not in str(err) or "dynamic_img_size" in args:
            raise
        body = create_backbone(backbone, 0, pretrained, pretrained_file, args)
    # Detection batches of a few images cannot estimate BatchNorm statistics; like torchvision's and detectron2's
    # detection backbones, keep the pretrained ones (and the affine) fixed for every training method.
    return freeze_batch_norm_2d(body) if freeze_bn else body


def is_plain(body: nn.Module) -> bool:
    """Whether every map of a timm features model has the same stride (a plain ViT)."""
    return len(set(body.feature_info.reduction())) == 1


def select_levels(reductions: list[int], explicit: bool) -> list[int]:
    """Maps to use: every explicitly chosen one, a plain ViT's last, else the deepest three of stride >= 8."""
    if len(set(reductions)) == 1:
        return [len(reductions) - 1]
    if explicit:
        return list(range(len(reductions)))
    deep = [i for i, r in enumerate(reductions) if r >= 8]
    return (deep or list(range(len(reductions))))[-3:]


def _extra_levels(extra_blocks: nn.Module) -> int:
    return 2 if isinstance(extra_blocks, LastLevelP6P7) else 1


# ----- LoRA on the architecture -------------------------------------------------------------------------------
def class_predictor_paths(detector: nn.Module) -> list[str]:
    """Paths of the layers whose outputs are per class: new for every class set, so always trained fully."""
    if isinstance(detector, FasterRCNN):
        return ["roi_heads.box_predictor"]
    return ["head.classification_head.cls_logits"]


def unload_detector_lora(detector: nn.Module) -> nn.Module:
    """Merge every LoRA update and remove the wrappers: the state_dict of a plain :func:`create_detector` model."""
    for root in [m for m in detector.modules() if lora_state(m) is not None]:
        unload_lora(root)
    return detector
