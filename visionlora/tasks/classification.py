"""Few-shot image classification as a LightningModule: a timm backbone adapted with LoRA (or fully, or linearly).

Loss, metrics and optimiser groups live here; data loading does not (see ``visionlora.data``). LoRA follows Hu et
al. 2021 (arXiv:2106.09685); LoRA+ (Hayou et al. 2024, arXiv:2402.12354) gives B a larger learning rate. The
optional cosine head (``cosine_scale``) is the cosine-similarity classifier of Gidaris & Komodakis 2018
(arXiv:1804.09458) and Baseline++ (Chen et al. 2019, arXiv:1904.04232).
"""

from __future__ import annotations

from dataclasses import asdict

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from visionlora.lora import LoraConfig, inject_lora, lora_state
from visionlora.lora.targets import find_head_path
from visionlora.models import create_backbone
from visionlora.models.families import default_lora_targets
from visionlora.tasks.prototypes import add_class_sums, leave_one_out_prototype_loss, pooled_features

from .checkpoints import record_working_directory
from .optim import adamw_groups, lightning_optimizers, lora_factor_group

METHODS = ("lora", "full", "linear")
HEAD_INITS = ("prototypes", "random")
# Per-class metrics and confusion plots stop being readable (and cheap to log) beyond this many classes.
MAX_CLASSES_PER_CLASS_LOG = 50


class LoraClassifier(L.LightningModule):
    """A timm classifier fine-tuned with LoRA (``method="lora"``), fully (``"full"``) or as a linear probe.

    Args:
        backbone: timm architecture name, e.g. ``vit_small_patch16_224``.
        num_classes: Number of classes (linked from the data module by the CLI).
        pretrained: Load timm's pretrained weights from the model hub.
        pretrained_file: Local weights instead of the hub: a weights file, or ``local-dir:<folder>`` with timm's
            config.json + model.safetensors (e.g. the bundled ``data/weights/vit_digits``).
        model_args: Extra ``timm.create_model`` arguments (``img_size``, ``drop_path_rate``, ...).
        method: ``lora`` (LoRA + head), ``full`` (every weight) or ``linear`` (head only).
        lora: LoRA settings (used when ``method="lora"``); default: ``attn`` for attention backbones, else ``conv``.
        lr: Learning rate of the LoRA parameters.
        head_lr: Learning rate of the head and other fully trained modules (default: ``lr``).
        backbone_lr: Learning rate of the backbone weights with ``method="full"`` (default: ``lr``).
        lora_weight_decay: AdamW weight decay on the LoRA matrices.
        head_weight_decay: AdamW weight decay on the head.
        backbone_weight_decay: AdamW weight decay on backbone weights (``method="full"``).
        loraplus_lr_ratio: LoRA+: B's learning rate is this many times A's (None: same).
        warmup_fraction: Fraction of the steps spent in linear warmup before the cosine decay.
        label_smoothing: Cross-entropy label smoothing.
        head_init: ``prototypes`` sets the head, before the first step, to the nearest-class-mean classifier of
            the training images' features (w_c = μ_c, b_c = -½‖μ_c‖²; imprinted weights, Qi et al. 2018,
            arXiv:1712.07136), which matters most at 1-5 shots; ``random`` keeps timm's initialisation.
        grad_checkpointing: Recompute block activations in the backward pass (timm's ``set_grad_checkpointing``):
            less memory, about a third more compute.
        prototype_margin: With ``head_init="prototypes"``, scale the imprinted head so that the logit margin
            between two prototypes, ½‖μ_c − μ_c'‖² averaged over class pairs, equals this (a temperature; the
            predictions are unchanged). Unscaled margins are in the hundreds, the softmax saturates, and
            cross-entropy on the 1-5 training images gives no gradient at all: fine-tuning would stay at the
            nearest-class-mean classifier (cf. the cosine-logit initialisation of Dhillon et al. 2020,
            arXiv:1909.02729). ``None`` keeps the unscaled NCM head.
        cosine_scale: A cosine head: logits = ``cosine_scale`` x cos(feature, w_c), no bias (the temperature of a
            cosine softmax). With ``head_init="prototypes"`` w_c is the mean of the L2-normalised features of class
            c, so before the first step the model *is* the cosine nearest-class-mean classifier and fine-tuning
            starts from it. ``None``: timm's linear head.
        cosine_margin: With a cosine head, subtract ``cosine_margin`` from the cosine of the true class in the
            training loss (CosFace's additive margin, Wang et al. 2018, arXiv:1801.09414): features of a class pull
            tighter than the softmax needs, which is what recognising unseen classes from one image asks of them.
            Evaluation and prediction logits have no margin.
        prototype_loss: Weight of the prototypical loss added to the cross-entropy in training
            (:func:`~visionlora.tasks.prototypes.leave_one_out_prototype_loss` on the batch's pooled features: each
            image against the class means of the rest of the batch, Snell et al. 2017). It needs batches with
            several images per class: ``FewShotDataModule(per_class_in_batch=K)``. 0: cross-entropy alone.
    """

    def __init__(self, backbone: str = "vit_tiny_patch16_224", num_classes: int = 10, pretrained: bool = False,
                 pretrained_file: str | None = None, model_args: dict | None = None, method: str = "lora",
                 lora: LoraConfig | None = None, lr: float = 1e-3, head_lr: float | None = None,
                 backbone_lr: float | None = None, lora_weight_decay: float = 0.01, head_weight_decay: float = 0.01,
                 backbone_weight_decay: float = 0.05, loraplus_lr_ratio: float | None = None,
                 warmup_fraction: float = 0.1, label_smoothing: float = 0.0, head_init: str = "prototypes",
                 grad_checkpointing: bool = False, prototype_margin: float | None = 4.0,
                 cosine_scale: float | None = None, cosine_margin: float = 0.0, prototype_loss: float = 0.0) -> None:
        super().__init__()
        if prototype_loss < 0:
            raise ValueError(f"prototype_loss must be >= 0 (the weight of the prototypical loss), got {prototype_loss}")
        if cosine_margin and cosine_scale is None:
            raise ValueError("cosine_margin needs a cosine head: set cosine_scale too")
        if cosine_scale is not None and cosine_scale <= 0:
            raise ValueError(f"cosine_scale must be > 0 (or None for a linear head), got {cosine_scale}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["lora"])
        self.model = create_backbone(backbone, num_classes, pretrained, pretrained_file, model_args)
        lora = lora or LoraConfig(targets=default_lora_targets(self.model))  # attn for attention, else conv
        self.hparams["lora"] = asdict(lora)
        self.model_args = dict(model_args or {})
        self._freeze_for(method, lora)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        # Checkpoints hold only trained tensors; the frozen rest is rebuilt from the pretrained weights.
        self.strict_loading = False
        self.train_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.val_f1 = MulticlassF1Score(num_classes, average="macro")
        self.test_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.test_f1 = MulticlassF1Score(num_classes, average="macro")
        self.test_per_class = MulticlassAccuracy(num_classes, average=None)
        self.test_confusion = MulticlassConfusionMatrix(num_classes)

    def _freeze_for(self, method: str, lora: LoraConfig) -> None:
        if method == "lora":
            inject_lora(self.model, lora)
        elif method == "linear":
            head = find_head_path(self.model)
            for name, param in self.model.named_parameters():
                param.requires_grad_(head is not None and name.startswith(head + "."))

    # ----- steps --------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.cosine_scale is None:
            return self.model(images)
        return self._logits(self.model.forward_head(self.model.forward_features(images), pre_logits=True))

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        """The head on pre-logits features: timm's linear head, or the cosine head with ``cosine_scale``."""
        if self.hparams.cosine_scale is None:
            return self.model.get_classifier()(features)
        weight = self.model.get_classifier().weight
        return self.hparams.cosine_scale * F.normalize(features, dim=1) @ F.normalize(weight, dim=1).T

    @torch.no_grad()
    def bake_cosine_head(self) -> None:
        """Make timm's own linear head predict what the cosine head does: w_c <- s * w_c / ||w_c||, bias 0.

        Its logits are the cosine head's times ||feature|| (positive), so every argmax is the same; exports use
        this, so that the bundled timm folder needs no visionlora code. A linear head is left as it is.
        """
        head = self.model.get_classifier()
        if self.hparams.cosine_scale is None or not isinstance(head, nn.Linear):
            return
        head.weight.copy_(self.hparams.cosine_scale * F.normalize(head.weight, dim=1))
        if head.bias is not None:
            head.bias.zero_()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        if self.hparams.prototype_loss:
            features = self.model.forward_head(self.model.forward_features(images), pre_logits=True)
            logits = self._logits(features)
        else:  # timm's own forward, as without the option (models whose head is more than one Linear included)
            logits = self(images)
        margin = self.hparams.cosine_margin * (self.hparams.cosine_scale or 0.0)
        margined = logits - margin * F.one_hot(labels, logits.shape[1]) if margin else logits
        loss = F.cross_entropy(margined, labels, label_smoothing=self.hparams.label_smoothing)
        if self.hparams.prototype_loss:
            prototypical = leave_one_out_prototype_loss(features, labels)
            self.log("train/prototype_loss", prototypical, batch_size=len(labels))
            loss = loss + self.hparams.prototype_loss * prototypical
        self.train_accuracy(logits, labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        self.log("train/acc", self.train_accuracy, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.val_accuracy(logits, labels)
        self.val_f1(logits, labels)
        self.log("val/loss", loss, sync_dist=True, batch_size=len(labels))
        self.log("val/acc", self.val_accuracy, prog_bar=True, batch_size=len(labels))
        self.log("val/f1", self.val_f1, batch_size=len(labels))

    def test_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        for metric in (self.test_accuracy, self.test_f1, self.test_per_class, self.test_confusion):
            metric.update(logits, labels)
        self.log("test/acc", self.test_accuracy, batch_size=len(labels))
        self.log("test/f1", self.test_f1, batch_size=len(labels))

    def on_test_epoch_end(self) -> None:
        per_class = self.test_per_class.compute()
        if len(per_class) <= MAX_CLASSES_PER_CLASS_LOG:
            for index, value in enumerate(per_class):
                self.log(f"test/acc_class_{index}", value, sync_dist=True)
        self.test_results = {"per_class_accuracy": per_class.cpu(), "confusion": self.test_confusion.compute().cpu()}
        self.test_per_class.reset()
        self.test_confusion.reset()

    # ----- head initialisation ------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # A resumed fit keeps the head of its checkpoint: on_fit_start runs before the loops are restored, so
        # global_step is still 0 there and only the checkpoint path tells a resume from a fresh start.
        datamodule = getattr(self.trainer, "datamodule", None)
        fresh = self.global_step == 0 and self.trainer.ckpt_path is None
        if self.hparams.head_init == "prototypes" and fresh and datamodule is not None:
            self.imprint_head(datamodule.train_dataloader())

    @torch.no_grad()
    def imprint_head(self, loader) -> None:
        """Set the linear head to the nearest-class-mean classifier of the features of ``loader``'s images."""
        head = self.model.get_classifier()
        if not isinstance(head, nn.Linear):
            return
        # Class means, one batch at a time: of the raw features (Euclidean head) or of the L2-normalised ones (cosine).
        cosine = self.hparams.cosine_scale is not None
        sums = head.weight.new_zeros(head.out_features, head.in_features, dtype=torch.float32)
        counts = sums.new_zeros(head.out_features)
        for images, labels in loader:
            features = pooled_features(self.model, images.to(self.device), batch_size=len(images))
            add_class_sums(sums, counts, features, labels.to(self.device), normalize=cosine)
        if self._trainer is not None:
            # Every rank saw the same images (the loader is not sharded yet); summing keeps ranks identical anyway.
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        seen = counts > 0
        means = sums[seen] / counts[seen, None]
        if cosine:
            head.weight[seen] = means.to(head.weight.dtype)
            if head.bias is not None:
                head.bias.zero_()
            return
        scale = prototype_scale(means, self.hparams.prototype_margin)
        head.weight[seen] = (scale * means).to(head.weight.dtype)
        if head.bias is not None:
            head.bias[seen] = (-0.5 * scale * means.pow(2).sum(dim=1)).to(head.bias.dtype)

    # ----- optimisation -------------------------------------------------------------------------------------
    def configure_optimizers(self):
        return lightning_optimizers(self.parameter_groups(), self.trainer.estimated_stepping_batches,
                                    self.hparams.warmup_fraction)

    def parameter_groups(self) -> list[dict]:
        """AdamW groups: LoRA A (and B, separately under LoRA+), fully trained modules, and backbone weights."""
        fully_trained = self._fully_trained_prefixes()

        def group(name: str) -> str:
            return lora_factor_group(name) or ("head" if name.startswith(tuple(fully_trained)) else "backbone")

        trained = [(n, group(n), p) for n, p in self.model.named_parameters() if p.requires_grad]
        return adamw_groups(trained, self.hparams)

    def _fully_trained_prefixes(self) -> list[str]:
        state = lora_state(self.model)
        paths = state.trainable_paths if state is not None else [find_head_path(self.model) or ""]
        return [p + "." for p in paths if p]

    # ----- small checkpoints --------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only what is trained when the frozen backbone can be rebuilt from its pretrained weights on load.

        A randomly initialised backbone (no ``pretrained``, no ``pretrained_file``) cannot be rebuilt, so its
        checkpoint keeps every tensor: otherwise exporting or evaluating it later would use other random weights.
        """
        record_working_directory(checkpoint)
        h = self.hparams
        if h.method == "full" or not (h.pretrained or h.pretrained_file):
            return
        trained = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k in trained or not k.startswith("model.")}

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def prototype_scale(means: torch.Tensor, margin: float | None) -> float:
    """The factor that makes the mean pairwise margin ½‖μ_c − μ_c'‖² of the NCM head equal ``margin`` (1 if None)."""
    count = len(means)
    if margin is None or count < 2:
        return 1.0
    mean_margin = 0.5 * torch.cdist(means, means).pow(2).sum().item() / (count * (count - 1))
    return margin / mean_margin if mean_margin > 0 else 1.0
