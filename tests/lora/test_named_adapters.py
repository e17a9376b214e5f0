"""Several named adapters on one backbone: add, switch (a pointer change), delete, merge one alone, and the errors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from named_models import base_model, model_input, module_ids, parameter_storage, randomize, with_adapters
from torch import nn

from visionlora import (
    LoraConfig,
    adapter_batch,
    add_adapter,
    delete_adapter,
    inject_lora,
    list_adapters,
    lora_layers,
    merge_lora,
    set_adapter,
    unload_lora,
    unmerge_lora,
)
from visionlora.lora import LoraFusedQKV, LoraLinear, active_adapter, adapter_info
from visionlora.lora import layer as layer_module

THREE = {
    "default": ({"targets": ["attn-qv"]}, None),
    "cats": ({"targets": ["vit-all"], "r": 3}, 3),
    "dogs": ({"targets": ["attn"], "use_dora": True}, 7),
}


def three_adapters():
    return with_adapters("test_vit", THREE)


def outputs(model, x, name):
    set_adapter(model, name)
    with torch.no_grad():
        return model(x)


def test_each_adapter_runs_its_own_factors_and_head():
    model, x = three_adapters(), model_input("test_vit")
    assert list_adapters(model) == ["default", "cats", "dogs"] and active_adapter(model) == "default"
    shapes = {name: outputs(model, x, name).shape for name in list_adapters(model)}
    assert shapes == {"default": (5, 5), "cats": (5, 3), "dogs": (5, 7)}
    info = adapter_info(model, "cats")
    assert (info.num_classes, info.active, info.config.r) == (3, False, 3)
    assert "blocks.0.mlp.fc1" in info.layers and "blocks.0.mlp.fc1" not in adapter_info(model, "default").layers
    # Each adapter equals a model that holds it alone (its LoRA tensors have the same names there), same head.
    for name, (config, classes) in THREE.items():
        alone = base_model("test_vit")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            add_adapter(alone, name, LoraConfig(**{"r": 2, "alpha": 4, **config}), num_classes=classes)
        trained = [(n, p) for n, p in alone.named_parameters() if p.requires_grad]
        with torch.no_grad():
            for n, param in trained:
                own = model.lora_heads[name].get_parameter(n[5:]) if n.startswith("head.") else model.get_parameter(n)
                param.copy_(own)
            torch.testing.assert_close(alone(x), outputs(model, x, name), rtol=0, atol=0)
        assert len(trained) > 2


def test_a_switch_is_a_pointer_change():
    model = three_adapters()
    storage, modules = parameter_storage(model), module_ids(model)
    keys = list(model.state_dict())
    for name in ["cats", "dogs", "default", "dogs"]:
        set_adapter(model, name)
        assert parameter_storage(model) == storage  # every parameter and buffer: the same object and storage
        assert module_ids(model) == modules  # no module made or dropped
        assert list(model.state_dict()) == keys
        assert model.get_classifier() is model.lora_heads[name]
        assert all(layer.active_adapter == name for layer in lora_layers(model).values())


@pytest.mark.parametrize("measured", ["weight", "activation", "fused"])
def test_inactive_adapters_cost_nothing_in_the_forward_and_backward_pass(monkeypatch, measured):
    # form='auto' times the forms on the first training step, so which one runs is up to the machine: pin each.
    monkeypatch.setattr(layer_module, "measure_faster_form",
                        lambda layer, x, slot: measured if measured in layer.candidate_forms(slot) else "weight")
    model, x = three_adapters(), model_input("test_vit")
    evaluated = outputs(model, x, "cats")
    model.train()
    model(x)  # the first training step settles each layer's form
    expected = model(x).detach()
    torch.testing.assert_close(expected, evaluated, rtol=1e-5, atol=1e-5)  # forms agree to float rounding
    with torch.no_grad():  # poison every other adapter and head: any use of them would show
        for name, param in model.named_parameters():
            other_lora = name.rpartition(".")[2].startswith("lora_") and ".lora_adapters.cats." not in name
            if other_lora or name.startswith(("lora_heads.default", "lora_heads.dogs")):
                param.fill_(float("nan"))
    out = model(x)
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=0)  # the same form: bit for bit
    F.cross_entropy(out, torch.tensor([0, 1, 2, 0, 1])).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_adapters.cats." in n or n.startswith("head.") for n in with_grad)
    assert any(".lora_adapters.cats.lora_A" in n for n in with_grad)


def test_one_adapter_keeps_the_single_adapter_layout_and_delete_restores_it():
    plain = inject_lora(base_model("test_vit"), LoraConfig(r=2, targets=["attn-qv"], init="small-random"))
    model = add_adapter(base_model("test_vit"), "default", LoraConfig(r=2, targets=["attn-qv"], init="small-random"))
    keys = list(plain.state_dict())
    assert list(model.state_dict()) == keys and isinstance(model.blocks[0].attn.qkv, LoraFusedQKV)
    x = model_input("test_vit")
    before = outputs(model, x, "default")
    add_adapter(model, "cats", LoraConfig(r=3, targets=["vit-all"], init="small-random"), num_classes=3)
    assert isinstance(model.blocks[0].mlp.fc1, LoraLinear) and "lora_heads.cats.weight" in model.state_dict()
    torch.testing.assert_close(outputs(model, x, "default"), before, rtol=0, atol=0)  # adding changes nothing
    delete_adapter(model, "cats")
    assert list_adapters(model) == ["default"] and list(model.state_dict()) == keys
    assert type(model.blocks[0].mlp.fc1) is nn.Linear  # no adapter left there: the wrapper is gone
    assert not any("cats" in n for n, _ in model.named_modules())
    torch.testing.assert_close(outputs(model, x, "default"), before, rtol=0, atol=0)


def test_a_first_adapter_of_any_name_with_its_own_head():
    model = add_adapter(base_model("test_resnet"), "birds", LoraConfig(r=2, targets=["conv"]), num_classes=3,
                        label_names=["owl", "wren", "tit"])
    assert list_adapters(model) == ["birds"] and model.fc.out_features == 3 and model.fc.weight.requires_grad
    assert adapter_info(model).label_names == ["owl", "wren", "tit"]
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "conv1.0.lora_adapters.birds.lora_A" in names and not any(n.endswith(".lora_A") and "birds" not in n
                                                                     for n in names)
    assert model(model_input("test_resnet", 2)).shape == (2, 3)


def test_delete_the_active_or_an_unknown_adapter_is_refused():
    model = three_adapters()
    with pytest.raises(ValueError, match=r"'default' is the active one.*set_adapter\(model, 'cats'\) first"):
        delete_adapter(model, "default")
    with pytest.raises(ValueError, match=r"no adapter named 'lions'; the model holds \['default', 'cats', 'dogs'\]"):
        delete_adapter(model, "lions")
    with pytest.raises(ValueError, match="no adapter named 'lions'"):
        set_adapter(model, "lions")
    only = with_adapters("test_vit", {"default": ({"targets": ["attn"]}, None)})
    with pytest.raises(ValueError, match=r"only adapter: unload_lora\(model\)"):
        delete_adapter(only, "default")
    assert list_adapters(model) == ["default", "cats", "dogs"] and list_adapters(only) == ["default"]


@pytest.mark.parametrize("name, config, classes, message", [
    ("cats", {}, None, r"already holds an adapter named 'cats'"),
    ("a.b", {}, None, r"adapter name 'a\.b': use letters"),
    ("keys", {}, None, r"'keys' is reserved"),
    ("new", {"trainable": [r"blocks\.0\.norm1"]}, None, r"trains LoraConfig\.trainable .* fully, which every adapter"),
    ("new", {"train_norms": True}, None, "train_norms=True"),
    ("new", {"freeze_bn_stats": False}, None, "freeze_bn_stats=False"),
    ("new", {"init": "pissa"}, None, "init='pissa'"),
    ("new", {"split_qkv": False}, None, r"blocks\.0\.attn\.qkv: adapter 'new' adapts it as 'linear'.*LoraFusedQKV"),
    ("new", {}, 0, "num_classes must be a positive integer"),
    ("new", {"targets": ["nothing_here"]}, None, "matches no Linear"),
])
def test_bad_additions_are_refused_and_change_nothing(name, config, classes, message):
    model = three_adapters()
    storage, modules, state = parameter_storage(model), module_ids(model), _state(model)
    with pytest.raises(ValueError, match=message):
        add_adapter(model, name, LoraConfig(**{"r": 2, **config}), num_classes=classes)
    assert list_adapters(model) == ["default", "cats", "dogs"]
    assert parameter_storage(model) == storage and module_ids(model) == modules
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and state.keys() == _state(model).keys()


def test_labels_must_match_the_head_and_heads_need_a_model_head():
    model = three_adapters()
    with pytest.raises(ValueError, match="2 label_names for a head of 3 classes"):
        add_adapter(model, "new", LoraConfig(r=2), num_classes=3, label_names=["a", "b"])
    headless = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    add_adapter(headless, "one", LoraConfig(r=1, targets=[r"\d"]))
    with pytest.raises(ValueError, match="no classifier head"):
        add_adapter(headless, "two", LoraConfig(r=1, targets=[r"\d"]), num_classes=3)
    add_adapter(headless, "two", LoraConfig(r=1, targets=["0"]))
    assert list_adapters(headless) == ["one", "two"] and not hasattr(headless, "lora_heads")


def test_merging_is_one_adapter_alone_and_locks_switching_until_unmerged():
    model, x = three_adapters(), model_input("test_vit")
    expected = {name: outputs(model, x, name) for name in list_adapters(model)}
    set_adapter(model, "default")
    with pytest.raises(ValueError, match=r"holds adapters \['default', 'cats', 'dogs'\].*merge_lora\(model, adapter="):
        merge_lora(model)
    with pytest.raises(ValueError, match=r"unload_lora\(model, adapter=name\)"):
        unload_lora(model)
    merge_lora(model, adapter="dogs")  # DoRA: merged exactly too
    assert active_adapter(model) == "dogs" and all(
        layer.merged == (layer.slot_or_none("dogs") is not None) for layer in lora_layers(model).values())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected["dogs"], rtol=1e-5, atol=1e-5)
    for refused in (lambda: set_adapter(model, "cats"), lambda: add_adapter(model, "new", LoraConfig(r=2)),
                    lambda: adapter_batch(model, ["cats"]).__enter__(), lambda: merge_lora(model, adapter="cats")):
        with pytest.raises(ValueError, match=r"'dogs' is merged|unmerge_lora\(model\) first"):
            refused()
    unmerge_lora(model)
    for name in ("cats", "default"):
        torch.testing.assert_close(outputs(model, x, name), expected[name], rtol=1e-5, atol=1e-5)


def test_unload_keeps_the_named_adapter_and_its_head():
    model, x = three_adapters(), model_input("test_vit")
    expected = outputs(model, x, "cats")
    set_adapter(model, "default")
    plain = unload_lora(model, adapter="cats")
    fresh = base_model("test_vit", num_classes=3)
    assert list(plain.state_dict()) == list(fresh.state_dict()) and not lora_layers(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)


def test_every_head_and_adapter_moves_with_the_model_and_trains():
    model = randomize(three_adapters())
    model = model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "lora_heads.cats.weight", "lora_heads.dogs.weight"} <= trainable
    assert all(n.rpartition(".")[2].startswith("lora_") or "head" in n for n in trainable)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_default_can_join_after_other_adapters_and_leave_before_them():
    model = with_adapters("test_vit", {"cats": ({"targets": ["attn-qv"]}, 3), "default": ({"targets": ["attn"]}, None)})
    qkv = model.blocks[0].attn.qkv
    assert qkv.adapter_names() == ["default", "cats"] and "lora_slices.lora_A_k" in dict(qkv.named_parameters())
    x = model_input("test_vit")
    expected = outputs(model, x, "cats")
    storage = parameter_storage(model)
    delete_adapter(model, "default")
    assert qkv.adapter_names() == ["cats"] and not any(n.startswith("lora_slices") for n, _ in qkv.named_parameters())
    assert type(model.blocks[0].attn.proj) is nn.Linear and not hasattr(model, "lora_heads")
    assert all(storage[key] == ptr for key, ptr in parameter_storage(model).items())
    torch.testing.assert_close(outputs(model, x, "cats"), expected, rtol=0, atol=0)
