"""Every shipped LoRA YAML under configs/lora parses into a LoraConfig and adapts a tiny model of its family."""

import warnings
from pathlib import Path

import pytest
import timm
import yaml

from visionlora import LoraConfig, inject_lora, lora_summary

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "lora").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_lora_config_adapts_a_tiny_model(path):
    config = LoraConfig(**yaml.safe_load(path.read_text()))
    model = timm.create_model("test_vit" if path.stem.startswith("vit") else "test_resnet", pretrained=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inject_lora(model, config)
    summary = lora_summary(model)
    assert summary.lora_params > 0 and len(summary.rows) > 0
    assert all(row.rank <= config.r for row in summary.rows)


def test_there_are_shipped_configs():
    assert len(CONFIGS) >= 4
