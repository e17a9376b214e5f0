"""Few-shot detectors that start from a detector trained on other classes (``base_detector``, TFA's fine-tuning)."""

import lightning as L
import pytest
import torch
from test_detection_model import NUM_CLASSES, SMALL, _loader, make_batch

from visionlora.export.detection import DetectorSource, export_merged_detector
from visionlora.lora import LoraConfig
from visionlora.models.detection import DETECTOR_KWARGS, create_detector, unload_detector_lora
from visionlora.models.detector_folder import load_base_detector
from visionlora.tasks.detection import LoraDetector

BASE_CLASSES = 2
# Not the backbone's default normalisation, so taking the base detector's is visible.
BASE_MEAN, BASE_STD = [0.3, 0.3, 0.3], [0.2, 0.2, 0.2]
PREDICTOR = "head.classification_head.cls_logits."


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A randomly initialised FCOS for 2 base classes with live BatchNorm, written as a merged detector folder."""
    torch.manual_seed(0)
    config = dict(backbone="test_resnet", num_classes=BASE_CLASSES, detector="fcos", freeze_bn=False,
                  image_mean=BASE_MEAN, image_std=BASE_STD, **SMALL)
    model = create_detector(**config)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a frozen copy that ignored them would show
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    folder = tmp_path_factory.mktemp("base") / "detector"
    export_merged_detector(DetectorSource(model.eval(), config, ["a", "b"], 64), folder)
    return folder, model.state_dict()


def few_shot(folder, **kwargs) -> LoraDetector:
    return LoraDetector(backbone="test_resnet", num_classes=NUM_CLASSES, base_detector=str(folder), **SMALL, **kwargs)


@pytest.mark.parametrize("method,adapt", [("frozen", "backbone"), ("full", "backbone"), ("lora", "all"),
                                          ("lora", "backbone")])
def test_everything_but_the_class_predictor_comes_from_the_base(base_folder, method, adapt):
    folder, base = base_folder
    module = few_shot(folder, method=method, adapt=adapt, lora=LoraConfig(r=2, targets=["conv"]))
    plain = unload_detector_lora(module.model).state_dict()  # LoRA's B starts at zero: merging changes nothing
    shared = [k for k in base if not k.startswith(PREDICTOR) and not k.endswith("num_batches_tracked")]
    assert len(shared) > 100 and set(shared) <= set(plain)
    for key in shared:
        assert torch.equal(plain[key], base[key]), key
    # The class predictor is new: one output per novel class, torchvision's fresh initialisation (prior bias).
    assert plain[PREDICTOR + "weight"].shape[0] == NUM_CLASSES and base[PREDICTOR + "weight"].shape[0] == BASE_CLASSES
    assert torch.allclose(plain[PREDICTOR + "bias"], torch.full((NUM_CLASSES,), -4.59512), atol=1e-5)


def test_returns_the_fresh_keys_and_reproduces_base_box_outputs(base_folder):
    folder, base = base_folder
    model = create_detector("test_resnet", NUM_CLASSES, "fcos", image_mean=BASE_MEAN, image_std=BASE_STD, **SMALL)
    architecture = dict(backbone="test_resnet", detector="fcos", model_args=None, out_indices=None, fpn_channels=32,
                        anchor_scale=4.0)
    fresh = load_base_detector(model, folder, architecture)
    assert fresh == [PREDICTOR + "weight", PREDICTOR + "bias"]
    reference = create_detector("test_resnet", BASE_CLASSES, "fcos", freeze_bn=False, image_mean=BASE_MEAN,
                                image_std=BASE_STD, **SMALL)
    reference.load_state_dict(base)
    images, _ = make_batch()
    # Same backbone, FPN and box branch: the box regression of every location is identical.
    with torch.no_grad():
        ours, theirs = model.eval(), reference.eval()
        features = [ours.backbone(ours.transform(images)[0].tensors)[k] for k in ("0", "1")]
        expected = [theirs.backbone(theirs.transform(images)[0].tensors)[k] for k in ("0", "1")]
        boxes = ours.head.regression_head(features)[0]
        expected_boxes = theirs.head.regression_head(expected)[0]
    for got, want in zip(features, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(boxes, expected_boxes, atol=1e-6)


def test_architecture_mismatch_and_missing_folder_are_named(base_folder, tmp_path):
    folder, _ = base_folder
    with pytest.raises(ValueError, match=r"fpn_channels=32.*fpn_channels=64"):
        LoraDetector(backbone="test_resnet", num_classes=NUM_CLASSES, base_detector=str(folder),
                     **(SMALL | {"fpn_channels": 64}))
    with pytest.raises(ValueError, match=r"detector='fcos'.*detector='retinanet'"):
        LoraDetector(backbone="test_resnet", num_classes=NUM_CLASSES, detector="retinanet",
                     base_detector=str(folder), **SMALL)
    with pytest.raises(FileNotFoundError, match=r"nowhere.*config\.json"):
        few_shot(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"already holds the backbone's weights.*resnet_digits"):
        few_shot(folder, pretrained_file="local-dir:data/weights/resnet_digits")


@pytest.mark.filterwarnings("ignore:Found keys that are in the model state dict")  # the frozen base, by design
def test_checkpoint_holds_only_trained_tensors_and_restores_from_the_base(base_folder, tmp_path):
    folder, _ = base_folder
    module = few_shot(folder, method="lora", adapt="all", lora=LoraConfig(r=2, targets=["conv"]), lr=0.05,
                      detector_args={"score_thresh": 0.0})
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, _loader())
    trainer.save_checkpoint(tmp_path / "few.ckpt")
    saved = torch.load(tmp_path / "few.ckpt", weights_only=True)
    trained = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
    assert set(saved["state_dict"]) == trained and len(trained) < 0.5 * len(module.model.state_dict())
    assert saved["hyper_parameters"]["base_detector"] == str(folder)
    restored = LoraDetector.load_from_checkpoint(tmp_path / "few.ckpt").eval()
    images, _ = make_batch()
    with torch.no_grad():
        got, want = restored(images)[0]["scores"], module.eval()(images)[0]["scores"]
    assert len(got) == len(want) > 0 and torch.allclose(got, want, atol=1e-5)
    assert set(DETECTOR_KWARGS) <= set(saved["hyper_parameters"])


def test_normalisation_defaults_to_the_base_detectors(base_folder):
    folder, _ = base_folder
    default = create_detector("test_resnet", NUM_CLASSES, "fcos", **SMALL).transform.image_mean
    module = few_shot(folder)
    assert default != BASE_MEAN and module.hparams.image_mean == BASE_MEAN
    assert module.model.transform.image_mean == BASE_MEAN and module.model.transform.image_std == BASE_STD
    custom = few_shot(folder, image_mean=[0.4, 0.4, 0.4], image_std=[0.2, 0.2, 0.2])
    assert custom.model.transform.image_mean == [0.4] * 3 and custom.model.transform.image_std == [0.2] * 3
