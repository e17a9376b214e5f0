"""Loading pretrained weights is strict about the backbone: only the classifier head may be absent or resized."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from visionlora.models import create_backbone
from visionlora.models.detection import create_detector

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = ROOT / "data" / "weights"


def test_weights_of_another_architecture_are_refused_naming_file_and_keys():
    vit_file = WEIGHTS / "vit_digits" / "model.safetensors"
    with pytest.raises(ValueError) as caught:
        create_backbone("test_resnet", 5, pretrained_file=str(vit_file))
    message = str(caught.value)
    assert str(vit_file) in message and "test_resnet" in message
    assert "missing conv1.0.weight" in message and "unexpected blocks.0" in message


def test_a_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    state = timm.create_model("test_resnet", num_classes=5).state_dict()
    state["conv1.0.weight"] = torch.zeros(8, 3, 3, 3)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match=r"conv1.0.weight: file \[8, 3, 3, 3\], model \[16, 3, 3, 3\]"):
        create_backbone("test_resnet", 5, pretrained_file=str(tmp_path / "w.safetensors"))


def test_a_missing_backbone_tensor_is_refused(tmp_path):
    state = timm.create_model("test_resnet", num_classes=5).state_dict()
    del state["layer1.0.conv1.weight"]
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="missing.*layer1.0.conv1.weight"):
        create_backbone("test_resnet", 5, pretrained_file=str(tmp_path / "w.safetensors"))


def test_random_bytes_name_the_file(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="junk.safetensors"):
        create_backbone("test_resnet", 5, pretrained_file=str(junk))


def test_a_local_dir_of_another_architecture_is_refused():
    with pytest.raises(ValueError, match=r"vit_tiny_patch16_224.*test_resnet|test_resnet.*vit_tiny_patch16_224"):
        create_backbone("test_resnet", 5, pretrained_file=f"local-dir:{WEIGHTS / 'vit_digits'}")


def test_a_resized_head_is_said_in_one_line_and_the_backbone_loads_exactly(caplog):
    folder = WEIGHTS / "resnet_digits"
    with caplog.at_level(logging.INFO, logger="visionlora.models.backbone"):
        model = create_backbone("test_resnet", 7, pretrained_file=f"local-dir:{folder}")
        create_backbone("test_resnet", 7, pretrained_file=f"local-dir:{folder}")  # said once, not per model
    said = [r.getMessage() for r in caplog.records if r.name == "visionlora.models.backbone"]
    assert len(said) == 1 and "fc" in said[0] and "297" in said[0] and "7-class" in said[0]
    reference = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert torch.equal(model.conv1[0].weight, reference.conv1[0].weight)
    assert model.fc.out_features == 7


def test_a_whole_timm_file_of_the_same_classes_loads_silently(tmp_path, caplog):
    model = timm.create_model("test_resnet", num_classes=5)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    with caplog.at_level(logging.INFO, logger="visionlora.models.backbone"):
        loaded = create_backbone("test_resnet", 5, pretrained_file=str(tmp_path / "w.safetensors"))
    assert torch.equal(loaded.fc.weight, model.fc.weight)
    assert not [r for r in caplog.records if r.name == "visionlora.models.backbone"]


def test_detector_backbones_are_checked_too():
    with pytest.raises(ValueError, match="missing"):
        create_detector("test_resnet", 3, pretrained_file=str(WEIGHTS / "vit_digits" / "model.safetensors"),
                        fpn_channels=32)
