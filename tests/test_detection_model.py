"""Detectors on timm backbones: losses, outputs, trainable sets per method, frozen BN, merge/unload, Lightning loop."""

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import randomize_lora
from safetensors.torch import load_file
from torch import nn

from visionlora.lora import LoraConfig, merge_lora
from visionlora.models.detection import create_detector, unload_detector_lora
from visionlora.tasks.detection import LoraDetector, apply_detector_lora, detector_from_hparams

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3
# Tiny everything: 32-channel FPN and images resized to 64-96 px keep a forward pass in the milliseconds.
SMALL = dict(fpn_channels=32, min_size=64, max_size=96)
LOSS_KEYS = {
    "fcos": {"classification", "bbox_regression", "bbox_ctrness"},
    "retinanet": {"classification", "bbox_regression"},
    "faster_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
}
# Keep every detection (untrained heads score far below the default thresholds).
KEEP_ALL = {"fcos": {"score_thresh": 0.0}, "retinanet": {"score_thresh": 0.0}, "faster_rcnn": {"box_score_thresh": 0.0}}


def make_batch(seed: int = 0) -> tuple[list[torch.Tensor], list[dict]]:
    """Three images of 64-96 px with 1-3 boxes each, in the data module's batch format."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for index, (h, w) in enumerate([(96, 80), (64, 64), (80, 96)]):
        n = index + 1
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w - 30.0, h - 30.0])
        size = 10 + torch.rand(n, 2, generator=g) * 20
        images.append(torch.rand(3, h, w, generator=g))
        targets.append({"boxes": torch.cat([xy, xy + size], 1), "labels": torch.arange(n) % NUM_CLASSES + 1,
                        "image_id": torch.tensor(index)})
    return images, targets


def build(backbone: str, detector: str = "fcos", **kwargs) -> nn.Module:
    model_args = {"img_size": 64} if "vit" in backbone else None
    return create_detector(backbone, NUM_CLASSES, detector, model_args=model_args, **SMALL, **kwargs)


def names(params) -> set[int]:
    return {id(p) for p in params}


@pytest.mark.parametrize("backbone,detector,strides", [
    ("test_resnet", "fcos", [8, 16, 32, 64, 128]),
    ("test_resnet", "retinanet", [8, 16, 32, 64, 128]),
    ("test_resnet", "faster_rcnn", [8, 16, 32, 64]),
    ("test_convnext", "fcos", [8, 16, 32, 64, 128]),
    ("test_efficientnet", "retinanet", [8, 16, 32, 64, 128]),
    ("test_vit", "fcos", [8, 16, 32, 64, 128]),  # simple pyramid from the stride-16 map
    ("test_vit", "faster_rcnn", [8, 16, 32, 64]),
    ("vit_tiny_patch16_224", "retinanet", [8, 16, 32, 64, 128]),
])
def test_train_losses_and_eval_detections(backbone, detector, strides):
    model = build(backbone, detector, detector_args=KEEP_ALL[detector])
    assert model.backbone.strides == strides
    assert (model.backbone.pyramid is not None) == ("vit" in backbone)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.body.modules())
    # One output per foreground class for the sigmoid heads; Faster R-CNN's softmax adds background.
    if detector == "faster_rcnn":
        assert model.roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES + 1
    else:
        assert model.head.classification_head.num_classes == NUM_CLASSES
    images, targets = make_batch()
    losses = model.train()(images, targets)
    assert set(losses) == LOSS_KEYS[detector]
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    with torch.no_grad():
        detections = model.eval()(images)
    assert len(detections) == 3
    for image, found in zip(images, detections, strict=True):
        boxes, h, w = found["boxes"], image.shape[1], image.shape[2]
        assert len(boxes) > 0 and boxes.shape[1] == 4 and found["scores"].shape == found["labels"].shape
        assert boxes.min() >= 0 and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert found["labels"].min() >= 1 and found["labels"].max() <= NUM_CLASSES


def _trainable(module: LoraDetector) -> set[int]:
    return names(p for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_trainable_parameters_per_method(backbone):
    model_args = {"img_size": 64} if backbone == "test_vit" else None
    kwargs = dict(backbone=backbone, num_classes=NUM_CLASSES, model_args=model_args, **SMALL)
    full = LoraDetector(method="full", **kwargs)
    assert _trainable(full) == names(full.parameters())
    frozen = LoraDetector(method="frozen", **kwargs)
    body = names(frozen.model.backbone.body.parameters())
    assert _trainable(frozen) == names(frozen.parameters()) - body
    lora = LoraDetector(method="lora", lora=LoraConfig(r=2, targets=["conv" if backbone == "test_resnet" else "attn"]),
                        **kwargs)
    m = lora.model
    lora_params = [p for n, p in m.backbone.body.named_parameters() if n.rpartition(".")[2].startswith("lora_")]
    rest = [m.backbone.fpn, m.head] + ([m.backbone.pyramid] if m.backbone.pyramid is not None else [])
    expected = names(lora_params) | {id(p) for module in rest for p in module.parameters()}
    assert lora_params and _trainable(lora) == expected
    assert lora.trainable_parameter_count() == sum(p.numel() for p in lora.parameters() if id(p) in expected)
    # LoRA trains what the frozen method trains (same FPN and head) plus its own factors, and nothing else.
    assert lora.trainable_parameter_count() == frozen.trainable_parameter_count() + sum(p.numel() for p in lora_params)
    predictor = LoraDetector(method="predictor", **kwargs)
    logits = predictor.model.head.classification_head.cls_logits
    assert _trainable(predictor) == names(logits.parameters())
    # A 3x3 conv from the FPN's channels to one logit per class, with a bias.
    assert predictor.trainable_parameter_count() == SMALL["fpn_channels"] * 9 * NUM_CLASSES + NUM_CLASSES


def test_predictor_method_trains_the_roi_box_predictor_of_faster_rcnn():
    model = LoraDetector(backbone="test_resnet", num_classes=NUM_CLASSES, detector="faster_rcnn", method="predictor",
                         **SMALL).model
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    layers = ("cls_score", "bbox_pred")
    assert trained == {f"roi_heads.box_predictor.{layer}.{t}" for layer in layers for t in ("weight", "bias")}


def test_adapt_all_trains_only_lora_and_class_predictor():
    model = build("test_resnet", "retinanet")
    apply_detector_lora(model, LoraConfig(r=2, targets=["conv"]), adapt="all")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n in trained if not n.rpartition(".")[2].startswith("lora_")}
    assert head == {"head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias"}
    assert any(n.startswith("backbone.fpn.") for n in trained) and any(n.startswith("backbone.body.") for n in trained)


def test_freeze_bn_false_lets_a_from_scratch_backbone_train_its_residual_branches():
    """Frozen at random initialisation, BatchNorm is the identity and timm's zero-initialised last BatchNorm of each
    residual block (zero_init_last) stays zero, so no gradient reaches the branch; freeze_bn=False trains it."""
    images, targets = make_batch()
    frozen, trained = build("test_resnet"), build("test_resnet", freeze_bn=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.backbone.body.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in trained.backbone.body.modules())
    for model in (frozen, trained):
        sum(model.train()(images, targets).values()).backward()
    # Frozen: the block's last scale is a zero buffer, for ever, and the branch's convs get exactly no gradient.
    block = frozen.backbone.body.layer3[0]
    assert block.bn3.weight.abs().sum() == 0 and block.conv1.weight.grad.abs().sum() == 0
    # Trained: that scale is a parameter with a gradient, so the branch switches on after the first step.
    assert trained.backbone.body.layer3[0].bn3.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["lora", "frozen"])
def test_step_leaves_frozen_backbone_and_bn_statistics_bit_identical(method):
    module = LoraDetector(backbone="test_resnet", num_classes=NUM_CLASSES, method=method, lr=0.1,
                          lora=LoraConfig(r=2, targets=["conv"]), **SMALL)
    body = module.model.backbone.body
    frozen = {n: t.clone() for n, t in body.state_dict().items() if "lora_" not in n}
    assert any(n.endswith("running_mean") for n in frozen)
    head_before = module.model.head.classification_head.cls_logits.weight.clone()
    optimizer = torch.optim.AdamW(module.parameter_groups())
    images, targets = make_batch()
    module.train()
    for _ in range(2):
        loss = sum(module(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = body.state_dict()
    assert all(torch.equal(after[n], t) for n, t in frozen.items())
    assert not torch.equal(module.model.head.classification_head.cls_logits.weight, head_before)
    if method == "lora":
        assert any(p.abs().sum() > 0 for n, p in body.named_parameters() if "lora_B" in n)


def test_parameter_groups_learning_rates():
    lora = LoraDetector(backbone="test_resnet", num_classes=NUM_CLASSES, lr=1e-3, head_lr=1e-2,
                        loraplus_lr_ratio=4.0, lora=LoraConfig(r=2, targets=["conv"]), **SMALL)
    groups = {g["name"]: g for g in lora.parameter_groups()}
    assert {n: g["lr"] for n, g in groups.items()} == {"lora_A": 1e-3, "lora_B": 4e-3, "head": 1e-2}
    assert sum(len(g["params"]) for g in groups.values()) == len([p for p in lora.parameters() if p.requires_grad])
    full = LoraDetector(backbone="test_resnet", num_classes=NUM_CLASSES, method="full", backbone_lr=1e-4, **SMALL)
    groups = {g["name"]: g for g in full.parameter_groups()}
    assert groups["backbone"]["lr"] == 1e-4
    assert names(groups["backbone"]["params"]) == names(full.model.backbone.body.parameters())


def _fcos_outputs(model: nn.Module, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """FPN maps and raw head outputs: compared before NMS, which would amplify rounding into reorderings."""
    batch, _ = model.transform(images)
    features = list(model.backbone(batch.tensors).values())
    return features + list(model.head(features).values())


@pytest.mark.parametrize("backbone,adapt", [("test_resnet", "backbone+fpn"), ("test_vit", "backbone")])
def test_merge_and_unload_match_unmerged_and_load_strict(backbone, adapt):
    model_args = {"img_size": 64} if backbone == "test_vit" else None
    module = LoraDetector(backbone=backbone, num_classes=NUM_CLASSES, model_args=model_args, adapt=adapt,
                          detector_args=KEEP_ALL["fcos"], lora=LoraConfig(r=2, targets=["conv"]
                          if backbone == "test_resnet" else ["attn"]), **SMALL)
    model = module.model.eval()
    randomize_lora(model)
    images, _ = make_batch(seed=1)
    with torch.no_grad():
        before = _fcos_outputs(model, images)
        merge_lora(model)
        merged = _fcos_outputs(model, images)
        unload_detector_lora(model)
        unloaded = _fcos_outputs(model, images)
        detections = model(images)
    for a, b, c in zip(before, merged, unloaded, strict=True):
        assert (a - b).abs().max() < 1e-5 * max(1.0, a.abs().max().item())
        assert torch.equal(b, c)
    fresh = detector_from_hparams(module.hparams).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(unloaded, _fcos_outputs(fresh, images), strict=True))
        again = fresh(images)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(detections, again, strict=True) for k in a)


def _loader(batch_size: int = 2) -> torch.utils.data.DataLoader:
    images, targets = make_batch()
    samples = list(zip(images + images[:1], targets + targets[:1], strict=True))
    return torch.utils.data.DataLoader(samples, batch_size=batch_size,
                                       collate_fn=lambda batch: ([s[0] for s in batch], [s[1] for s in batch]))


@pytest.mark.filterwarnings("ignore:Found keys that are in the model state dict")  # the frozen backbone, by design
def test_lightning_fit_test_and_small_checkpoint(tmp_path):
    # Pretrained (local-dir) weights: only then is the frozen backbone rebuildable and the checkpoint trimmed.
    weights = "local-dir:" + str(ROOT / "data" / "weights" / "resnet_digits")
    module = LoraDetector(backbone="test_resnet", num_classes=NUM_CLASSES, lora=LoraConfig(r=2, targets=["conv"]),
                          pretrained_file=weights, detector_args={"score_thresh": 0.01}, **SMALL)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, _loader(), _loader())
    assert trainer.global_step == 3
    assert {"train/loss", "train/classification", "val/map", "val/map_50"} <= set(trainer.callback_metrics)
    (results,) = trainer.test(module, _loader(), verbose=False)
    assert {"test/map", "test/map_50", "test/map_75"} <= set(results)
    assert all(-1.0 <= results[k] <= 1.0 for k in ("test/map", "test/map_50", "test/map_75"))
    assert set(module.test_results) == {"map", "map_50", "map_75", "classes", "map_per_class"}
    assert module.test_results["classes"].tolist() == [1, 2, 3]
    trainer.save_checkpoint(tmp_path / "d.ckpt")
    checkpoint = torch.load(tmp_path / "d.ckpt", weights_only=True)
    trained = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
    assert set(checkpoint["state_dict"]) == trained
    restored = LoraDetector.load_from_checkpoint(tmp_path / "d.ckpt")
    state = restored.state_dict()
    assert all(torch.equal(state[k], v) for k, v in checkpoint["state_dict"].items())


class OracleDetector(LoraDetector):
    """Predicts the boxes and labels queued in ``answers`` with score 1, one list of dicts per batch."""

    def forward(self, images, targets=None):
        return [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))}
                for t in self.answers.pop(0)]


def test_test_metrics_of_perfect_and_partial_predictions():
    loader = _loader(batch_size=4)
    (batch_images, batch_targets), = list(loader)
    module = OracleDetector(backbone="test_resnet", num_classes=NUM_CLASSES, method="frozen", **SMALL)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    module.answers = [batch_targets]
    (results,) = trainer.test(module, loader, verbose=False)
    assert {k: results[k] for k in ("test/map", "test/map_50", "test/ap_class_1", "test/ap_class_3")} == {
        "test/map": 1.0, "test/map_50": 1.0, "test/ap_class_1": 1.0, "test/ap_class_3": 1.0}
    # Call the only box of class 3 a class 1: AP of class 3 drops to 0, class 2 (untouched) stays 1.
    wrong = [{**t, "labels": torch.where(t["labels"] == 3, 1, t["labels"])} for t in batch_targets]
    module.answers = [wrong]
    trainer.test(module, loader, verbose=False)
    assert module.test_results["map_per_class"][2].item() == 0.0
    assert module.test_results["map_per_class"][1].item() == 1.0


def test_local_dir_backbone_weights_load():
    folder = ROOT / "data" / "weights" / "resnet_digits"
    model = create_detector("test_resnet", NUM_CLASSES, "retinanet", pretrained_file=f"local-dir:{folder}", **SMALL)
    stored = load_file(folder / "model.safetensors")
    body = model.backbone.body.state_dict()
    for key in ["conv1.0.weight", "layer3.0.conv2.weight", "layer4.0.downsample.2.running_var", "bn1.bias"]:
        assert torch.equal(body[key], stored[key]), key
    assert model.transform.image_mean == [0.3, 0.3, 0.3] and model.transform.image_std == [0.4, 0.4, 0.4]


def test_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="no_such_net"):
        create_detector("no_such_net", NUM_CLASSES)
    with pytest.raises(ValueError, match="yolo"):
        create_detector("test_resnet", NUM_CLASSES, "yolo")
    with pytest.raises(ValueError, match="fpn_channels"):
        create_detector("test_resnet", NUM_CLASSES, "fcos", fpn_channels=48)
    with pytest.raises(ValueError, match="sideways"):
        apply_detector_lora(build("test_resnet"), LoraConfig(targets=["conv"]), adapt="sideways")
    with pytest.raises(ValueError, match="linear"):
        LoraDetector(backbone="test_resnet", method="linear", **SMALL)
