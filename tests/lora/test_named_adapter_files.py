"""Several adapters on disk: PEFT's layout (default on top, the others in subfolders), exact round trips, PEFT
reading each subfolder, and adapters of another base that fail without touching the loaded ones."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import timm
import torch
from named_models import base_model, model_input, module_ids, parameter_storage, with_adapters

from visionlora import load_adapter, save_adapter, set_adapter
from visionlora.lora import adapter_info, list_adapters, lora_layers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")

VIT = {
    "default": ({"targets": ["attn-qv"]}, None),
    "cats": ({"targets": ["vit-all"], "r": 3}, 3, ["lion", "lynx", "puma"]),
    "dogs": ({"targets": ["attn"], "use_dora": True}, 7),
}


def adapter_tensors(model, name):
    """Adapter ``name``'s LoRA tensors (by layer and member) and head tensors, cloned."""
    found = {}
    for path, layer in lora_layers(model).items():
        slot = layer.slot_or_none(name)
        if slot is not None:
            own = slot.named_parameters() if slot is not layer else (
                (n, p) for n, p in layer.named_parameters() if not n.startswith(("base_layer.", "lora_adapters.")))
            found.update({f"{path}:{n}": p.detach().clone() for n, p in own})
    set_adapter(model, name)
    found.update({f"head:{n}": p.detach().clone() for n, p in model.get_classifier().named_parameters()})
    return found


def outputs(model, x, name):
    set_adapter(model, name)
    with torch.no_grad():
        return model(x)


def test_save_and_load_several_adapters_exactly(tmp_path):
    model, x = with_adapters("test_vit", VIT), model_input("test_vit")
    save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "cats", "dogs"]
    assert sorted(os.listdir(tmp_path / "cats")) == ["adapter_config.json", "adapter_model.safetensors"]
    reloaded = base_model("test_vit")
    for name in ("default", "cats", "dogs"):
        load_adapter(reloaded, tmp_path, name=name)
    assert list_adapters(reloaded) == ["default", "cats", "dogs"]
    assert adapter_info(reloaded, "cats").label_names == ["lion", "lynx", "puma"]
    assert adapter_info(reloaded, "dogs").num_classes == 7 and adapter_info(reloaded, "cats").num_classes == 3
    for name in list_adapters(model):
        saved, loaded = adapter_tensors(model, name), adapter_tensors(reloaded, name)
        assert saved.keys() == loaded.keys() and len(saved) > 4
        assert all(torch.equal(saved[k], loaded[k]) for k in saved), name
        torch.testing.assert_close(outputs(reloaded, x, name), outputs(model, x, name), rtol=0, atol=0)
    # One adapter alone goes to the same place; its subfolder is read by name, or directly.
    save_adapter(model, tmp_path / "one", name="cats")
    assert os.listdir(tmp_path / "one") == ["cats"]
    alone = load_adapter(base_model("test_vit", num_classes=3), tmp_path / "one" / "cats", name="cats")
    torch.testing.assert_close(outputs(alone, x, "cats"), outputs(model, x, "cats"), rtol=0, atol=0)
    # A named adapter loaded first brings a head of its own size; the default one must fit the model's head.
    first = load_adapter(base_model("test_vit"), tmp_path, name="dogs")
    assert list_adapters(first) == ["dogs"] and first.get_classifier().out_features == 7
    torch.testing.assert_close(outputs(first, x, "dogs"), outputs(model, x, "dogs"), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"head\.weight has shape \[5, 64\], the model needs \[3, 64\]"):
        load_adapter(base_model("test_vit", num_classes=3), tmp_path)


def test_loading_over_an_existing_adapter_replaces_its_tensors(tmp_path):
    model = with_adapters("test_vit", VIT)
    other = with_adapters("test_vit", VIT, seed=0)
    with torch.no_grad():
        for param in other.lora_heads["cats"].parameters():
            param.add_(1.0)
    save_adapter(other, tmp_path, name="cats")
    untouched = {name: adapter_tensors(model, name) for name in ("default", "dogs")}
    load_adapter(model, tmp_path, name="cats")
    want, got = adapter_tensors(other, "cats"), adapter_tensors(model, "cats")
    assert all(torch.equal(want[k], got[k]) for k in want)
    for name, tensors in untouched.items():
        assert all(torch.equal(tensors[k], v) for k, v in adapter_tensors(model, name).items())


SAVED_CASES = {
    "vit-split-qkv": ("test_vit", {"targets": ["attn-qv"]}),
    "vit-qkv-one-matrix": ("test_vit", {"targets": ["vit-all"], "split_qkv": False}),
    "resnet-conv": ("test_resnet", {"targets": ["conv"]}),
}


@pytest.mark.parametrize("case", list(SAVED_CASES))
def test_peft_reads_every_saved_subfolder(case, tmp_path):
    name, config = SAVED_CASES[case]
    ours = with_adapters(name, {"default": (config, None), "same": ({**config, "r": 3}, None),
                                "small": (config, 3)})
    x = model_input(name, batch=2)
    save_adapter(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base_model(name), str(tmp_path)).eval()
        theirs.load_adapter(str(tmp_path / "same"), adapter_name="same")
        # A head of another size than the base's: PEFT needs a base built with that many classes.
        small_base = base_model(name, num_classes=3)
        small = peft.PeftModel.from_pretrained(small_base, str(tmp_path / "small"), adapter_name="small").eval()
    with torch.no_grad():
        for adapter in ("default", "same"):
            theirs.set_adapter(adapter)
            assert (theirs(x) - outputs(ours, x, adapter)).abs().max() <= 1e-5, adapter
        assert (small(x) - outputs(ours, x, "small")).abs().max() <= 1e-5


def test_we_read_peft_saved_named_adapters(tmp_path):
    base = base_model("test_resnet")
    targets = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Conv2d)]
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, modules_to_save=["fc"],
                             init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    theirs.add_adapter("other", peft.LoraConfig(r=3, lora_alpha=3, target_modules=targets[:4],
                                                modules_to_save=["fc"], init_lora_weights=False))
    theirs.save_pretrained(str(tmp_path))
    assert (tmp_path / "other" / "adapter_config.json").is_file()
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    load_adapter(ours, tmp_path, name="other")
    x = model_input("test_resnet", batch=2)
    theirs.eval()
    with torch.no_grad():
        for adapter in ("default", "other"):
            theirs.set_adapter(adapter)
            assert (theirs(x) - outputs(ours.eval(), x, adapter)).abs().max() <= 1e-5, adapter
    assert len(adapter_info(ours, "other").layers) == 4


OTHER_BASES = {  # a base that differs from test_vit, and the first thing that does not fit
    "wider": (lambda: timm.create_model("test_vit", embed_dim=96), ["attn-qv"],
              r"tensor base_model\.model\.blocks\.0\.attn\.qkv\.lora_A\.weight has shape \[4, 96\], the model "
              r"needs \[4, 64\]"),
    "deeper": (lambda: base_model("test_vit2"), ["attn-qv"],
               r"adapter names module 'blocks\.6\.attn\.qkv', which the model does not have"),
    "convnet": (lambda: base_model("test_resnet"), ["conv"],
                r"adapter names module 'conv1\.0', which the model does not have"),
}


@pytest.mark.parametrize("case", ["wider", "deeper", "convnet"])
def test_an_adapter_of_another_base_fails_and_leaves_every_adapter_untouched(case, tmp_path):
    build, targets, message = OTHER_BASES[case]
    torch.manual_seed(0)
    save_adapter(with_adapters(build().eval(), {"default": ({"targets": targets}, None)}), tmp_path)
    model = with_adapters("test_vit", VIT)
    tensors = {name: adapter_tensors(model, name) for name in list_adapters(model)}
    set_adapter(model, "cats")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    storage, modules = parameter_storage(model), module_ids(model)
    with pytest.raises(ValueError, match=message):
        load_adapter(model, tmp_path, name="birds")
    assert list_adapters(model) == ["default", "cats", "dogs"] and adapter_info(model).name == "cats"
    assert parameter_storage(model) == storage and module_ids(model) == modules
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(state[k], after[k]) for k in state)
    for name, saved in tensors.items():
        assert all(torch.equal(saved[k], v) for k, v in adapter_tensors(model, name).items())


def test_saved_metadata_keeps_each_head(tmp_path):
    model = with_adapters("test_vit", VIT)
    save_adapter(model, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "dogs" / "adapter_model.safetensors"), framework="pt") as handle:
        own = json.loads(handle.metadata()["visionlora"])
        head = handle.get_tensor("base_model.model.head.weight")
    assert own["adapter_name"] == "dogs" and own["head"] == {"num_classes": 7, "label_names": None}
    assert head.shape == (7, 64)
    config = json.loads((tmp_path / "dogs" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["head"] and config["use_dora"] is True
