"""Adapter files: round trips, PEFT interop in both directions, and bad input that must leave the model alone."""

import copy
import json
import os
import warnings

import pytest
import timm
import torch
from torch import nn

from visionlora import LoraConfig, inject_lora, load_adapter, lora_layers, save_adapter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")

CASES = {
    "vit-qv": ("test_vit", dict(targets=["attn-qv"])),
    "vit-all-dora": ("test_vit", dict(targets=["vit-all"], use_dora=True)),
    "vit-pissa": ("test_vit", dict(targets=["attn"], init="pissa")),
    "resnet-conv": ("test_resnet", dict(targets=["conv"])),
    "convnext-mlp": ("test_convnext", dict(targets=[r"stages\.\d+\.blocks\.\d+\.mlp\.fc[12]"])),
}


class GroupedNet(nn.Module):
    """Grouped convs with r not divisible by groups, plus a head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1, groups=4)
        self.conv2 = nn.Conv2d(16, 24, 1, groups=2)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        return self.head(self.conv2(torch.relu(self.conv1(x))).mean((2, 3)))

    def get_classifier(self):
        return self.head


def _inputs(name: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    size = 160 if "vit" in name else 64
    return torch.randn(2, 3, size, size, generator=generator)


def _trained_copy(base: nn.Module, **config) -> nn.Module:
    """An adapted copy of ``base`` with random non-zero LoRA factors (as after training)."""
    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inject_lora(model, LoraConfig(**{"r": 4, "alpha": 8, **config}))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
    return model.eval()


def _base(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=5).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_and_peft_reads_ours(case, tmp_path):
    name, config = CASES[case]
    base = _base(name)
    x = _inputs(name)
    adapted = _trained_copy(base, **config)
    with torch.no_grad():
        expected = adapted(x)
    save_adapter(adapted, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]

    reloaded = load_adapter(copy.deepcopy(base), tmp_path).eval()
    assert sorted(lora_layers(reloaded)) == sorted(lora_layers(adapted))
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=1e-6)
        assert (peft_model(x) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("case", ["vit-all-dora", "resnet-conv"])
def test_we_read_peft_adapters(case, tmp_path):
    name, config = CASES[case]
    base = _base(name)
    x = _inputs(name)
    head = "head" if case.startswith("vit") else "fc"
    targets = [n for n, m in base.named_modules() if isinstance(m, nn.Linear | nn.Conv2d) and n != head
               and (isinstance(m, nn.Conv2d) or ".attn." in n or ".mlp." in n)]
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=[head],
                                  use_dora=config.get("use_dora", False), init_lora_weights=False)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft_config).eval()
    with torch.no_grad():
        expected = peft_model(x)
    peft_model.save_pretrained(str(tmp_path))

    ours = load_adapter(copy.deepcopy(base), tmp_path).eval()
    assert len(lora_layers(ours)) == len(targets)
    with torch.no_grad():
        assert (ours(x) - expected).abs().max() <= 1e-5
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert f"{head}.weight" in trainable and all("lora_" in n or n.startswith(f"{head}.") for n in trainable)


def test_qkv_slices_export_as_block_structured_rank(tmp_path):
    adapted = _trained_copy(_base("test_vit"), targets=["attn-qv"])
    save_adapter(adapted, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    a = tensors["base_model.model.blocks.0.attn.qkv.lora_A.weight"]
    b = tensors["base_model.model.blocks.0.attn.qkv.lora_B.weight"]
    assert a.shape == (8, 64) and b.shape == (192, 8)  # rank r_q + r_v
    assert config["r"] == 8 and config["lora_alpha"] == 16  # alpha/r stays 8/4 = 2
    dim = 64
    assert torch.count_nonzero(b[dim : 2 * dim]) == 0  # k rows untouched
    assert torch.count_nonzero(b[:dim, 4:]) == 0 and torch.count_nonzero(b[2 * dim :, :4]) == 0
    layer = adapted.blocks[0].attn.qkv
    torch.testing.assert_close(layer.scale * b @ a, layer.delta_weight(), rtol=0, atol=1e-7)
    assert config["modules_to_save"] == ["head"] and "base_model.model.head.weight" in tensors


def test_grouped_conv_round_trip_and_peft(tmp_path):
    torch.manual_seed(0)
    base = GroupedNet().eval()
    x = torch.randn(2, 8, 12, 12)
    adapted = _trained_copy(base, r=3, targets=["conv"])
    assert adapted.conv1.lora_A.shape == (4 * 3, 2, 3, 3) and adapted.conv2.lora_B.shape == (24, 3, 1, 1)
    with torch.no_grad():
        expected = adapted(x)
    save_adapter(adapted, tmp_path)
    reloaded = load_adapter(copy.deepcopy(base), tmp_path).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=1e-6)
        assert (peft_model(x) - expected).abs().max() <= 1e-5


def test_mismatched_adapter_leaves_model_unchanged(tmp_path):
    adapted = _trained_copy(_base("test_vit"), targets=["attn"])
    save_adapter(adapted, tmp_path)
    other = timm.create_model("test_vit", pretrained=False, num_classes=7).eval()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"head\.weight has shape \[5, 64\], the model needs \[7, 64\]"):
        load_adapter(other, tmp_path)
    assert not lora_layers(other)
    after = other.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in other.parameters())


def test_loading_into_adapted_model_checks_shapes_first(tmp_path):
    save_adapter(_trained_copy(_base("test_vit"), targets=["attn"]), tmp_path)
    target = _trained_copy(_base("test_vit"), targets=["attn"], r=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"lora_A\.weight has shape \[12, 64\], the model needs \[6, 64\]"):
        load_adapter(target, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_missing_and_corrupt_files_are_named(tmp_path):
    model = _base("test_resnet")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(model, tmp_path)
    save_adapter(_trained_copy(model, targets=["conv"]), tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="adapter_model.safetensors: not a readable safetensors file"):
        load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        load_adapter(model, tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(model, tmp_path)
    assert not lora_layers(model)


def test_save_without_lora_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(_base("test_resnet"), tmp_path)
    assert not tmp_path.joinpath("adapter_model.safetensors").exists()
