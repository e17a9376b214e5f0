"""Mixed-task batches: every sample with its own adapter and head in one pass equals running each task alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from named_models import TinyAttention, model_input, with_adapters

from visionlora import adapter_batch, set_adapter
from visionlora.lora import LoraFusedQKV, LoraLinear, LoraMultiheadAttention, lora_layers

NAMES = ["cats", "default", "dogs", "cats", "dogs", "default"]
CONVNEXT_MLP = r"stages\.\d+\.blocks\.\d+\.mlp\.fc[12]"
CONVNEXT_CONVS = r"stem\.0|stages\.\d+\.downsample\.1|stages\.\d+\.blocks\.\d+\.conv_dw"

CASES = {
    # fused qkv with q/v slices, Linear MLP and projection, adapters that adapt different layers
    "vit": ("test_vit", {"default": {"targets": ["attn-qv"]}, "cats": {"targets": ["vit-all"], "r": 3},
                         "dogs": {"targets": [r"blocks\.[0-2]\.mlp\.fc1", r"blocks\.\d\.attn\.qkv@v"]}}),
    "resnet": ("test_resnet", {"default": {"targets": ["conv"]}, "cats": {"targets": ["conv-pointwise"], "r": 3},
                               "dogs": {"targets": [r"layer\d\.\d\.conv2"]}}),
    "convnext": ("test_convnext", {"default": {"targets": [CONVNEXT_MLP]}, "cats": {"targets": [CONVNEXT_CONVS]},
                                   "dogs": {"targets": [CONVNEXT_MLP, CONVNEXT_CONVS], "r": 1}}),
    "mha": ("tiny_mha", {"default": {"targets": ["attn"]}, "cats": {"targets": ["attn-qv"], "r": 3},
                         "dogs": {"targets": [r"attn@k", "embed"]}}),
}
HEADS = {"default": None, "cats": 3, "dogs": 7}


def mixed_model(case: str, form: str, **extra):
    name, configs = CASES[case]
    adapters = {adapter: ({**config, "form": form, **extra}, HEADS[adapter]) for adapter, config in configs.items()}
    return with_adapters(name, adapters), model_input(name, batch=len(NAMES))


def per_task(model, x, names):
    """What each sample gets when its adapter runs alone on the whole batch."""
    expected = {}
    with torch.no_grad():
        for name in dict.fromkeys(names):
            set_adapter(model, name)
            expected[name] = model(x)
    set_adapter(model, "default")
    return [expected[name][i] for i, name in enumerate(names)]


@pytest.mark.parametrize("form", ["activation", "weight"])
@pytest.mark.parametrize("case", list(CASES))
def test_mixed_batch_equals_each_task_alone(case, form):
    model, x = mixed_model(case, form)
    kinds = {type(layer) for layer in lora_layers(model).values()}
    assert {"vit": {LoraFusedQKV, LoraLinear}, "mha": {LoraMultiheadAttention, LoraLinear}}.get(case, kinds) <= kinds
    forms = {(type(layer), layer.slot(n).weight_form) for layer in lora_layers(model).values()
             for n in layer.adapter_names()}
    assert {form for kind, form in forms if kind is not LoraMultiheadAttention} == {form == "weight"}
    expected = per_task(model, x, NAMES)
    with torch.no_grad(), adapter_batch(model, NAMES) as batch:
        logits = model(x)
    assert logits.shape == (len(NAMES), 7)
    rows = batch.split(logits)
    assert [row.shape[0] for row in rows] == [3, 5, 7, 3, 7, 5] == batch.num_classes
    for got, want in zip(rows, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert torch.isneginf(logits[~batch.mask]).all() and torch.isfinite(logits[batch.mask]).all()
    # The adapters really differ, so the test would see a sample run with another's adapter.
    set_adapter(model, "cats")
    with torch.no_grad():
        assert (model(x)[1] - expected[1][:3]).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["vit", "resnet"])
def test_mixed_batch_with_dora(case):
    model, x = mixed_model(case, "auto", use_dora=True)
    expected = per_task(model, x, NAMES)
    with torch.no_grad(), adapter_batch(model, NAMES) as batch:
        rows = batch.split(model(x))
    for got, want in zip(rows, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_mixed_batch_trains_each_adapter_as_its_own_samples_would():
    """The loss of a mixed batch gives each adapter and head the gradient of its own samples' loss."""
    model, x = mixed_model("vit", "auto")
    targets = torch.tensor([2, 4, 6, 0, 1, 3])
    model.train()
    with adapter_batch(model, NAMES):
        F.cross_entropy(model(x), targets, reduction="sum").backward()  # -inf padding: exp() = 0
    names = {id(p): n for n, p in model.named_parameters()}
    mixed = {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for name in dict.fromkeys(NAMES):
        rows = [i for i, n in enumerate(NAMES) if n == name]
        set_adapter(model, name)
        F.cross_entropy(model(x[rows]), targets[rows], reduction="sum").backward()
    alone = {id(p): p.grad for p in model.parameters() if p.grad is not None}
    assert mixed.keys() == alone.keys() and any("lora_adapters.dogs" in names[key] for key in mixed)
    assert any(names[key].startswith("lora_heads.dogs") for key in mixed)
    for key, grad in alone.items():
        torch.testing.assert_close(mixed[key], grad, rtol=1e-4, atol=1e-6, msg=names[key])


def test_same_sized_heads_and_a_single_task_batch():
    model, x = mixed_model("resnet", "auto")
    names = ["cats"] * len(NAMES)
    expected = per_task(model, x, names)
    with torch.no_grad(), adapter_batch(model, names) as batch:
        logits = model(x)
    assert logits.shape == (len(NAMES), 3) and batch.mask.all()
    torch.testing.assert_close(logits, torch.stack(expected), rtol=0, atol=1e-5)


def test_batch_errors_name_the_problem_and_leave_the_model_as_it_was():
    model, x = mixed_model("vit", "auto")
    with pytest.raises(ValueError, match=r"no adapter named 'lions'"):
        adapter_batch(model, ["cats", "lions"]).__enter__()
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv got a batch of 6 .* but 2 adapter names"):
        with adapter_batch(model, ["cats", "dogs"]):
            model(x)
    with adapter_batch(model, NAMES), pytest.raises(ValueError, match="do not nest"):
        adapter_batch(model, NAMES).__enter__()
    assert all(layer.batch_plan is None for layer in lora_layers(model).values())
    assert not model.get_classifier()._forward_hooks
    set_adapter(model, "dogs")
    with torch.no_grad():
        assert model(x).shape == (len(NAMES), 7)


def test_batch_first_attention_and_a_per_sample_attention_mask():
    model = with_adapters(TinyAttention(batch_first=True).eval(), {
        "default": ({"targets": ["attn"]}, None), "cats": ({"targets": ["attn-qv"]}, 3)})
    x = model_input("tiny_mha", batch=4)
    names = ["cats", "default", "default", "cats"]
    expected = per_task(model, x, names)
    with torch.no_grad(), adapter_batch(model, names) as batch:
        rows = batch.split(model(x))
    for got, want in zip(rows, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # A 3-D mask (batch·heads, L, S) follows its samples into their groups.
    attn = model.attn
    tokens = torch.randn(4, 5, 16)
    mask = torch.randn(4 * 2, 5, 5)
    want = []
    with torch.no_grad():
        for i, name in enumerate(names):
            set_adapter(model, name)
            want.append(attn(tokens, tokens, tokens, attn_mask=mask)[0][i])
        with adapter_batch(model, names):
            got, weights = attn(tokens, tokens, tokens, attn_mask=mask)
    assert weights.shape == (4, 5, 5)
    torch.testing.assert_close(got, torch.stack(want), rtol=0, atol=1e-5)
