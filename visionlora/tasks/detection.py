"""Few-shot object detection as a LightningModule: a torchvision detector on a timm backbone adapted with LoRA.

Loss, COCO-style mAP and optimiser groups live here; data loading does not (see ``visionlora.data``). A batch is
``(images, targets)``: a list of float [3, H, W] images in 0..1 and a list of dicts with ``boxes`` (float [N, 4],
absolute xyxy pixels) and ``labels`` (int64 [N], 1..num_classes). LoRA follows Hu et al. 2021 (arXiv:2106.09685);
LoRA+ (Hayou et al. 2024, arXiv:2402.12354) gives B a larger learning rate.
"""

from __future__ import annotations

import re
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torchmetrics.detection import MeanAveragePrecision

from visionlora.lora import LoraConfig, inject_lora
from visionlora.models.backbone import resolve_backbone
from visionlora.models.detection import class_predictor_paths, create_detector, detector_config
from visionlora.models.detector_folder import load_base_detector, read_detector_config
from visionlora.models.families import default_lora_targets as family_lora_targets

from .checkpoints import record_working_directory
from .optim import adamw_groups, lightning_optimizers, lora_factor_group

ADAPT_SCOPES = ("backbone", "backbone+fpn", "all")
METHODS = ("lora", "frozen", "predictor", "full")
SUMMARY_METRICS = ("map", "map_50", "map_75")
# Per-class APs stop being readable (and cheap to log) beyond this many classes.
MAX_CLASSES_PER_CLASS_LOG = 50


class LoraDetector(L.LightningModule):
    """A detector (FCOS, RetinaNet, Faster R-CNN) on a timm backbone, fine-tuned with LoRA, frozen or fully.

    Args:
        backbone: timm architecture name, e.g. ``resnet50`` or ``vit_small_patch16_224``.
        num_classes: Foreground classes (labels 1..num_classes; 0 is background).
        detector: ``fcos``, ``retinanet`` or ``faster_rcnn``.
        pretrained: Load timm's pretrained backbone weights from the model hub.
        pretrained_file: Local backbone weights: a file, or ``local-dir:<folder>`` (``data/weights/resnet_digits``).
        model_args: Extra ``timm.create_model`` arguments (``img_size``, ``drop_path_rate``, ...).
        out_indices: timm feature levels feeding the FPN (default: strides 8/16/32, or a plain ViT's last block).
        fpn_channels: Channels of the FPN and head (a multiple of 32 for FCOS).
        min_size: Shorter image side after the detector's own resize.
        max_size: Cap on the longer side after that resize.
        anchor_scale: Anchor side / stride for RetinaNet and Faster R-CNN.
        image_mean: Normalisation mean; default (None): the base detector's, else the backbone's pretrained_cfg,
            then recorded here.
        image_std: Normalisation std; default as ``image_mean``.
        detector_args: Extra torchvision detector arguments (``score_thresh``, ``detections_per_img``, ...).
        base_detector: A detector folder trained on other (base) classes to start from (TFA's fine-tuning stage):
            everything but the class predictor is loaded from it; its architecture fields must match these.
        freeze_bn: Freeze the backbone's BatchNorm (statistics and affine); False only for training from scratch,
            e.g. pretraining a backbone (see ``create_detector``).
        method: ``lora`` (LoRA where ``adapt`` says), ``frozen`` (backbone frozen; FPN and head train),
            ``predictor`` (only the class predictor trains: TFA's fine-tuning of a ``base_detector``) or ``full``.
        lora: LoRA settings (``method="lora"``); default: rank 8 on ``attn`` for attention backbones, else ``conv``.
        adapt: Where LoRA goes: ``backbone``, ``backbone+fpn`` or ``all`` (see ``apply_detector_lora``).
        lr: Learning rate of the LoRA parameters.
        head_lr: Learning rate of the FPN, head and other fully trained modules (default: ``lr``).
        backbone_lr: Learning rate of the backbone weights with ``method="full"`` (default: ``lr``).
        lora_weight_decay: AdamW weight decay on the LoRA matrices.
        head_weight_decay: AdamW weight decay on the FPN and head.
        backbone_weight_decay: AdamW weight decay on backbone weights (``method="full"``).
        loraplus_lr_ratio: LoRA+: B's learning rate is this many times A's (None: same).
        warmup_fraction: Fraction of the steps spent in linear warmup before the cosine decay.
    """

    def __init__(self, backbone: str = "resnet50", num_classes: int = 5, detector: str = "fcos",
                 pretrained: bool = False, pretrained_file: str | None = None, model_args: dict | None = None,
                 out_indices: tuple[int, ...] | None = None, fpn_channels: int = 128, min_size: int = 256,
                 max_size: int = 512, anchor_scale: float = 4.0, image_mean: list[float] | None = None,
                 image_std: list[float] | None = None, detector_args: dict | None = None, freeze_bn: bool = True,
                 base_detector: str | None = None, method: str = "lora",
                 lora: LoraConfig | dict | None = None, adapt: str = "backbone", lr: float = 1e-3,
                 head_lr: float | None = None, backbone_lr: float | None = None, lora_weight_decay: float = 0.01,
                 head_weight_decay: float = 0.01, backbone_weight_decay: float = 0.05,
                 loraplus_lr_ratio: float | None = None, warmup_fraction: float = 0.1) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["lora"])
        # Self-describing hparams: a local-dir folder's architecture and shape, so a rebuild needs no folder.
        self.hparams["backbone"], self.hparams["model_args"] = resolve_backbone(backbone, pretrained_file, model_args)
        if base_detector and (pretrained or pretrained_file):
            raise ValueError(f"base_detector {base_detector} already holds the backbone's weights: drop "
                             f"pretrained / pretrained_file (got {pretrained_file or 'pretrained=True'})")
        if base_detector:
            # The base detector's normalisation is what its weights expect, unless overridden.
            base_args = read_detector_config(Path(base_detector))["create_detector"]
            for key in ("image_mean", "image_std"):
                self.hparams[key] = self.hparams[key] or base_args.get(key)
        self.model = create_detector(**detector_config(self.hparams))
        if base_detector:
            load_base_detector(self.model, base_detector, detector_config(self.hparams))
        # Record what the backbone's config chose, so the detector can be rebuilt without its weights.
        self.hparams["image_mean"] = list(self.model.transform.image_mean)
        self.hparams["image_std"] = list(self.model.transform.image_std)
        lora = LoraConfig(**lora) if isinstance(lora, dict) else lora  # a checkpoint stores it as a dict
        lora = lora or LoraConfig(targets=default_lora_targets(self.model))
        self.hparams["lora"] = asdict(lora)
        freeze_for_method(self.model, method, lora, adapt)
        # Checkpoints hold only trained tensors; the frozen rest is rebuilt from the pretrained weights.
        self.strict_loading = False
        self.val_map = MeanAveragePrecision(box_format="xyxy")
        self.test_map = MeanAveragePrecision(box_format="xyxy", class_metrics=True)

    # ----- steps --------------------------------------------------------------------------------------------
    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        """Losses (train mode, with targets) or per-image detections ``boxes``/``scores``/``labels`` (eval)."""
        return self.model(images, targets)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self(images, targets)
        loss = sum(losses.values())
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=len(images))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        self.val_map.update(self(images), targets)

    def on_validation_epoch_end(self) -> None:
        results = self.val_map.compute()
        for name in SUMMARY_METRICS:
            self.log(f"val/{name}", results[name], prog_bar=name == "map", sync_dist=True)
        self.val_map.reset()

    def test_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        self.test_map.update(self(images), targets)

    def on_test_epoch_end(self) -> None:
        results = self.test_map.compute()
        for name in SUMMARY_METRICS:
            self.log(f"test/{name}", results[name], sync_dist=True)
        # With a single class torchmetrics returns 0-d tensors.
        classes, per_class = results["classes"].reshape(-1), results["map_per_class"].reshape(-1)
        if len(classes) <= MAX_CLASSES_PER_CLASS_LOG:
            for label, value in zip(classes.tolist(), per_class, strict=False):
                self.log(f"test/ap_class_{label}", value, sync_dist=True)
        self.test_results = {name: results[name].cpu() for name in SUMMARY_METRICS}
        self.test_results |= {"classes": classes.cpu(), "map_per_class": per_class.cpu()}
        self.test_map.reset()

    # ----- optimisation -------------------------------------------------------------------------------------
    def configure_optimizers(self):
        return lightning_optimizers(self.parameter_groups(), self.trainer.estimated_stepping_batches,
                                    self.hparams.warmup_fraction)

    def parameter_groups(self) -> list[dict]:
        """AdamW groups: LoRA A (and B, separately under LoRA+), backbone weights (``full``), and the rest."""
        trained = [(n, self._group(n), p) for n, p in self.model.named_parameters() if p.requires_grad]
        return adamw_groups(trained, self.hparams)

    def _group(self, name: str) -> str:
        # Under LoRA, backbone weights that still train are modules the config asked to train fully: head rate.
        in_backbone = name.startswith("backbone.body.") and self.hparams.method == "full"
        return lora_factor_group(name) or ("backbone" if in_backbone else "head")

    # ----- small checkpoints --------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only what is trained when the frozen backbone can be rebuilt from its pretrained weights on load.

        A randomly initialised backbone (no ``pretrained``, no ``pretrained_file``) cannot be rebuilt, so its
        checkpoint keeps every tensor: otherwise exporting or evaluating it later would use other random weights.
        Nor can BatchNorm statistics that training updates (``freeze_bn=False``): those checkpoints are whole too.
        A ``base_detector`` folder rebuilds everything the few-shot run did not train.
        """
        record_working_directory(checkpoint)
        h = self.hparams
        rebuildable = h.pretrained or h.pretrained_file or h.get("base_detector")
        if h.method == "full" or not rebuildable or not h.freeze_bn:
            return
        trained = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k in trained or not k.startswith("model.")}

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def detector_from_hparams(hparams: dict) -> nn.Module:
    """A fresh, weightless :func:`create_detector` model for ``LoraDetector`` hparams (e.g. a checkpoint's).

    The state_dict of the trained detector after ``unload_detector_lora`` loads into it with ``strict=True``:
    this is how an export rebuilds the merged model without the backbone's pretrained weights at hand.
    """
    return create_detector(**detector_config(hparams, weightless=True))


# ----- training methods: how much of the detector trains ------------------------------------------------------
def default_lora_targets(detector: nn.Module) -> list[str]:
    """``attn`` for backbones with attention blocks, else ``conv`` (see :mod:`visionlora.models.families`)."""
    return family_lora_targets(detector.backbone.body)


def apply_detector_lora(detector: nn.Module, lora: LoraConfig, adapt: str = "backbone") -> nn.Module:
    """Inject LoRA into part of a detector from :func:`create_detector`, in place.

    Everything inside the adapted part is frozen except LoRA, ``lora.trainable`` and the parts that have no
    pretrained weights to adapt (a ViT's simple pyramid, the per-class predictors); everything outside keeps
    training fully.

    Args:
        detector: A detector from :func:`create_detector`.
        lora: What to adapt; ``targets`` and ``trainable`` regexes match module paths relative to the adapted part.
        adapt: ``backbone`` (``detector.backbone.body``: FPN and head train fully), ``backbone+fpn``
            (``detector.backbone``: the head trains fully) or ``all`` (the detector: only LoRA and the per-class
            predictors train, for a detector pretrained on other classes).

    Returns:
        The module LoRA was injected into (it holds the :func:`~visionlora.lora.lora_state`).
    """
    if adapt not in ADAPT_SCOPES:
        raise ValueError(f"adapt must be one of {ADAPT_SCOPES}, got {adapt!r}")
    root = {"backbone": detector.backbone.body, "backbone+fpn": detector.backbone, "all": detector}[adapt]
    prefix = {"backbone": "backbone.body.", "backbone+fpn": "backbone.", "all": ""}[adapt]
    untrained = ["backbone.pyramid", *class_predictor_paths(detector)]
    paths = dict(detector.named_modules())
    keep = [re.escape(p.removeprefix(prefix)) for p in untrained if p.startswith(prefix) and p in paths]
    inject_lora(root, replace(lora, trainable=[*lora.trainable, *keep]))
    return root


def freeze_for_method(detector: nn.Module, method: str, lora: LoraConfig | None = None,
                      adapt: str = "backbone") -> None:
    """How much of ``detector`` trains.

    ``lora``: :func:`apply_detector_lora`; ``frozen``: the backbone body is frozen, the FPN and head train;
    ``predictor``: only the per-class predictor trains (TFA's last-layer fine-tuning of a base detector, Wang et al.
    2020, arXiv:2003.06957); ``full``: everything trains.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "lora":
        apply_detector_lora(detector, lora or LoraConfig(targets=default_lora_targets(detector)), adapt)
    elif method == "frozen":
        detector.backbone.body.requires_grad_(False)
    elif method == "predictor":
        detector.requires_grad_(False)
        for path in class_predictor_paths(detector):
            detector.get_submodule(path).requires_grad_(True)
