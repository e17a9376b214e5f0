"""The LoRA targets a backbone family gets when a config names none: ``attn`` for attention, ``conv`` for ConvNets."""

from __future__ import annotations

import pytest
import timm

from visionlora.models.families import architecture_lora_targets, default_lora_targets

FAMILIES = {
    "test_vit": ["attn"],  # fused qkv Linear in every block
    "test_resnet": ["conv"],
    "test_convnext": ["conv"],  # Linear MLPs, but no attention
    "resnext26ts": ["conv"],  # a ConvNet whose blocks hold an `attn` slot (nn.Identity): not attention
}


@pytest.mark.parametrize("name", FAMILIES)
def test_family_default_of_a_built_model_and_of_its_architecture(name):
    model = timm.create_model(name, pretrained=False, num_classes=3)
    assert default_lora_targets(model) == FAMILIES[name]
    assert architecture_lora_targets(name) == FAMILIES[name]
