"""LoRA-FA (``LoraConfig.freeze_A``): A seeded and frozen, only B trains, and tasks on one backbone hold one A."""

from __future__ import annotations

import copy

import pytest
import torch
from named_models import base_model, model_input

from visionlora import LoraConfig, adapter_batch, add_adapter, inject_lora
from visionlora.lora import lora_layers
from visionlora.lora.adapter import load_adapter, save_adapter
from visionlora.lora.frozen_a import seeded_factor

FAMILIES = {"test_resnet": ["conv"], "test_vit": ["vit-all"]}


def _config(name: str, seed: int = 0) -> LoraConfig:
    return LoraConfig(r=2, alpha=2, targets=FAMILIES[name], freeze_A=True, A_seed=seed)


def _a_factors(model: torch.nn.Module, adapter: str) -> dict[str, list[torch.Tensor]]:
    return {path: [pair.A for pair in layer.factors(adapter)] for path, layer in lora_layers(model).items()
            if layer.slot_or_none(adapter) is not None}


def _train_b(model: torch.nn.Module, adapter: str, seed: int) -> None:
    """Set adapter's B factors to seeded random values, as training B alone would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for pair in layer.factors(adapter):
                pair.B.copy_(0.1 * torch.randn(pair.B.shape, generator=generator))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_A_is_the_seeded_projection_frozen_and_a_step_moves_only_B(name):
    model = inject_lora(base_model(name), _config(name, seed=7))
    for path, factors in _a_factors(model, "default").items():
        for index, factor in enumerate(factors):
            expected = seeded_factor(factor.shape, factor[0].numel(), 7, path, index)
            assert torch.equal(factor, expected) and not factor.requires_grad
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trained, lr=0.1)
    model.train()
    model(model_input(name)).square().mean().backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.endswith("lora_B") or "lora_slices.lora_B" in n or n.startswith("head") or
                         n.startswith("fc") for n in moved), sorted(moved)
    assert not any("lora_A" in n for n in moved)


def test_another_seed_gives_another_A_and_the_same_seed_the_same():
    first = _a_factors(inject_lora(base_model("test_resnet"), _config("test_resnet", 0)), "default")
    again = _a_factors(inject_lora(base_model("test_resnet"), _config("test_resnet", 0)), "default")
    other = _a_factors(inject_lora(base_model("test_resnet"), _config("test_resnet", 1)), "default")
    path = next(iter(first))
    assert torch.equal(first[path][0], again[path][0]) and not torch.equal(first[path][0], other[path][0])


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_tasks_added_to_one_backbone_hold_one_A_and_each_adds_only_B_and_a_head(name):
    model = base_model(name)
    add_adapter(model, "t0", _config(name), num_classes=3)
    params_one = {p.data_ptr() for p in model.parameters()}
    add_adapter(model, "t1", _config(name), num_classes=3)
    for path, factors in _a_factors(model, "t1").items():
        assert [f.data_ptr() for f in factors] == [f.data_ptr() for f in _a_factors(model, "t0")[path]]
    added = [p for p in model.parameters() if p.data_ptr() not in params_one]
    b_count = sum(pair.B.numel() for layer in lora_layers(model).values() for pair in layer.factors("t1"))
    head = model.lora_heads["t1"]
    assert sum(p.numel() for p in added) == b_count + sum(p.numel() for p in head.parameters())


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_tasks_trained_apart_share_A_when_loaded_and_predict_as_they_were_trained(name, tmp_path):
    trained = {}
    for index, task in enumerate(("a", "b")):
        model = inject_lora(base_model(name), _config(name))
        _train_b(model, "default", seed=index)
        save_adapter(model, tmp_path / task)
        trained[task] = model.eval()
    served = base_model(name)
    for task in ("a", "b"):
        load_adapter(served, tmp_path / task, name=task)
    for path, factors in _a_factors(served, "b").items():
        assert [f.data_ptr() for f in factors] == [f.data_ptr() for f in _a_factors(served, "a")[path]]
    x = model_input(name, batch=4)
    names = ["a", "b", "b", "a"]
    with torch.no_grad(), adapter_batch(served.eval(), names):
        mixed = served(x)
    for row, task in enumerate(names):
        with torch.no_grad():
            alone = trained[task](x[row : row + 1])
        torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=1e-5)


def test_an_adapter_whose_A_differs_is_loaded_with_its_own_A(tmp_path):
    first = inject_lora(base_model("test_resnet"), _config("test_resnet", 0))
    other = inject_lora(base_model("test_resnet"), _config("test_resnet", 5))
    for model, folder in ((first, "a"), (other, "b")):
        _train_b(model, "default", seed=2)
        save_adapter(model, tmp_path / folder)
    served = copy.deepcopy(base_model("test_resnet"))
    load_adapter(served, tmp_path / "a", name="a")
    load_adapter(served, tmp_path / "b", name="b")
    for path, factors in _a_factors(served, "b").items():
        assert factors[0].data_ptr() != _a_factors(served, "a")[path][0].data_ptr()
        assert torch.equal(factors[0], _a_factors(other, "default")[path][0])
    x = model_input("test_resnet", batch=2)
    with torch.no_grad(), adapter_batch(served.eval(), ["b", "b"]):
        torch.testing.assert_close(served(x), other.eval()(x), atol=1e-5, rtol=1e-5)


def test_pissa_with_frozen_A_is_refused():
    with pytest.raises(ValueError, match="LoraConfig.freeze_A: .*init='pissa'"):
        LoraConfig(freeze_A=True, init="pissa")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_form_leaves_A_without_a_gradient_and_gives_B_the_same_one(name):
    grads = {}
    for form in ("activation", "weight", "fused"):
        config = LoraConfig(r=2, alpha=2, targets=FAMILIES[name], freeze_A=True, init="small-random", form=form)
        torch.manual_seed(4)  # the same B for every form (A is seeded by its path)
        model = inject_lora(base_model(name), config).train()
        model(model_input(name)).square().mean().backward()
        factors = {path: layer.factors("default") for path, layer in lora_layers(model).items()}
        assert all(pair.A.grad is None for pairs in factors.values() for pair in pairs)
        grads[form] = [pair.B.grad for pairs in factors.values() for pair in pairs]
    for form in ("weight", "fused"):
        for got, expected in zip(grads[form], grads["activation"], strict=True):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
