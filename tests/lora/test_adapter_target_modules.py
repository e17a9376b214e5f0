"""An adapter_config.json whose target_modules disagree with the tensors it ships is refused, model untouched."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from visionlora import LoraConfig, inject_lora, load_adapter, lora_layers, save_adapter


def saved_adapter(tmp_path, targets=("attn",)):
    model = timm.create_model("test_vit", num_classes=3).eval()
    inject_lora(model, LoraConfig(r=2, targets=list(targets)))
    return save_adapter(model, tmp_path / "adapter")


def rewrite_config(folder, **fields):
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | fields))
    return config


def strip_own_metadata(folder):
    """The same tensors as PEFT would write them: no visionlora metadata."""
    file = folder / "adapter_model.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    save_file(tensors, str(file), metadata={"format": "pt"})


def fresh():
    return timm.create_model("test_vit", num_classes=3).eval()


def test_a_target_module_without_tensors_is_refused(tmp_path):
    folder = saved_adapter(tmp_path)
    config = rewrite_config(folder)
    rewrite_config(folder, target_modules=[*config["target_modules"], "blocks.0.mlp.fc1"])
    model = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapter_config.json.*blocks\.0\.mlp\.fc1"):
        load_adapter(model, folder)
    assert not lora_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tensors_of_a_module_not_in_target_modules_are_refused(tmp_path):
    folder = saved_adapter(tmp_path)
    config = rewrite_config(folder)
    rewrite_config(folder, target_modules=config["target_modules"][1:])
    with pytest.raises(ValueError, match=rf"adapter_config.json.*{config['target_modules'][0]}"):
        load_adapter(fresh(), folder)


def test_peft_style_suffix_names_and_regex_that_cover_the_tensors_load(tmp_path):
    folder = saved_adapter(tmp_path)
    strip_own_metadata(folder)
    adapted = len(rewrite_config(folder, target_modules=["qkv", "proj"])["target_modules"])
    assert adapted == 2 * len(fresh().blocks)
    assert len(lora_layers(load_adapter(fresh(), folder))) == adapted
    rewrite_config(folder, target_modules=r".*\.attn\.(qkv|proj)")
    assert len(lora_layers(load_adapter(fresh(), folder))) == adapted


def test_peft_style_names_that_miss_a_tensor_are_refused(tmp_path):
    folder = saved_adapter(tmp_path)
    strip_own_metadata(folder)
    rewrite_config(folder, target_modules=["qkv"])
    with pytest.raises(ValueError, match=r"target_modules.*blocks\.0\.attn\.proj"):
        load_adapter(fresh(), folder)
