"""The fused form (visionlora/lora/fused.py) equals the activation and weight forms in outputs and gradients."""

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import StdConv2d
from torch import nn

from visionlora import LoraConfig, inject_lora, lora_summary
from visionlora.lora.conv import LoraConv2d
from visionlora.lora.fused import CONV_SUBCLASS_REASON, DORA_REASON, DROPOUT_REASON
from visionlora.lora.inject import lora_layers
from visionlora.lora.linear import LoraFusedQKV, LoraLinear

FORMS = ("activation", "weight", "fused")
# fused-split: Linears with out > in, and 1x1 stride-1 ungrouped convs whichever way they go.
SPLIT_CASES = ["linear-expanding", "qkv@qv", "qkv@qkv", "conv1x1", "conv1x1-contracting"]


def _seeded(*shape: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _conv(**kwargs):
    def build(form: str) -> LoraConv2d:
        return LoraConv2d(nn.Conv2d(**kwargs), rank=3, scale=0.75, form=form)
    return build


CASES = {
    "linear": (lambda form: LoraLinear(nn.Linear(12, 9), rank=3, scale=1.25, form=form), (2, 5, 12)),
    "linear-expanding": (lambda form: LoraLinear(nn.Linear(6, 14), rank=3, scale=1.25, form=form), (2, 5, 6)),
    "qkv@qv": (lambda form: LoraFusedQKV(nn.Linear(12, 18), rank=2, scale=0.5, slices="qv", form=form), (2, 5, 12)),
    "qkv@qkv": (lambda form: LoraFusedQKV(nn.Linear(12, 18), rank=2, scale=0.5, slices="qkv", form=form), (4, 12)),
    "conv3x3-strided": (_conv(in_channels=6, out_channels=8, kernel_size=3, stride=2, padding=1), (2, 6, 9, 9)),
    "conv-dilated": (_conv(in_channels=6, out_channels=8, kernel_size=3, padding=2, dilation=2), (2, 6, 9, 9)),
    "conv-grouped": (_conv(in_channels=6, out_channels=9, kernel_size=3, padding=1, groups=3), (2, 6, 8, 8)),
    "conv-depthwise": (_conv(in_channels=6, out_channels=6, kernel_size=5, padding=2, groups=6), (2, 6, 8, 8)),
    "conv1x1": (_conv(in_channels=6, out_channels=10, kernel_size=1), (2, 6, 7, 7)),
    "conv1x1-contracting": (_conv(in_channels=10, out_channels=6, kernel_size=1, bias=False), (3, 10, 5, 4)),
    "conv-same-reflect": (_conv(in_channels=4, out_channels=5, kernel_size=4, padding="same", padding_mode="reflect"),
                          (2, 4, 7, 7)),
}


def _run(build, shape: tuple, form: str, autocast: bool = False):
    """Output, input gradient and LoRA gradients of one form, from the same seeded layer and input."""
    torch.manual_seed(0)
    layer = build(form)
    with torch.no_grad():
        for param in layer.parameters():
            if param.requires_grad:  # the LoRA factors, large enough that ΔW shows
                param.normal_(0.0, 0.3)
    layer.base_layer.requires_grad_(False)
    x = _seeded(*shape).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    (y.float() * _seeded(*y.shape, seed=3)).sum().backward()
    grads = [p.grad for name, p in layer.named_parameters() if "lora_" in name]
    return layer, y.detach().float(), x.grad, grads


@pytest.mark.parametrize("case", list(CASES))
def test_fused_form_equals_activation_and_weight_forms(case):
    build, shape = CASES[case]
    results = {form: _run(build, shape, form) for form in FORMS}
    fused_layer, y, gx, grads = results["fused"]
    assert fused_layer.form_name() == "fused" and fused_layer.base_layer.weight.grad is None
    assert (y - fused_layer.base_layer(_seeded(*shape))).abs().max() > 0.1  # the update is not negligible
    assert len(grads) >= 2 and all(g.abs().max() > 0 for g in grads)
    for form in ("activation", "weight"):
        _, y_ref, gx_ref, grads_ref = results[form]
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", SPLIT_CASES)
def test_fused_split_equals_activation_and_weight_forms(case):
    build, shape = CASES[case]
    layer, y, gx, grads = _run(build, shape, "fused-split")
    assert layer.form_name() == "fused-split" and layer.base_layer.weight.grad is None
    assert len(grads) >= 2 and all(g.abs().max() > 0 for g in grads)
    for form in ("activation", "weight", "fused"):
        _, y_ref, gx_ref, grads_ref = _run(build, shape, form)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fused_split_output_is_contiguous_and_the_fused_one_strided():
    build, shape = CASES["linear-expanding"]  # 6 -> 14, rank 3
    split, fused = build("fused-split"), build("fused")
    for layer in (split, fused):
        layer.base_layer.requires_grad_(False)
    x = _seeded(*shape)
    y_split, y_fused = split(x), fused(x)
    assert y_split.is_contiguous() and y_split.stride() == (70, 14, 1)
    assert not y_fused.is_contiguous() and y_fused.stride() == (85, 17, 1)  # rows out + r = 17 apart
    torch.relu_(y_split)  # in place on the output: allowed


def test_a_pointwise_conv_in_fused_split_returns_a_contiguous_output():
    build, shape = CASES["conv1x1"]  # 6 -> 10 channels, rank 3, 7x7
    (split, y_split, _, _), (fused, y_fused, _, _) = (_run(build, shape, form) for form in ("fused-split", "fused"))
    assert split(_seeded(*shape)).is_contiguous() and y_split.shape == (2, 10, 7, 7)
    assert fused(_seeded(*shape)).stride()[0] == 13 * 49  # out + r channels per image
    assert split.candidate_forms(split) == ["weight", "activation", "fused"]  # fused-split: asked for only
    torch.testing.assert_close(y_split, y_fused, rtol=1e-5, atol=1e-5)
    x, x_ref = _seeded(*shape).requires_grad_(), _seeded(*shape).requires_grad_()
    y = split(x)
    torch.relu_(y)  # in place on the output, as timm's inplace activations do: allowed, and the gradient is right
    y.sum().backward()
    torch.relu(fused(x_ref)).sum().backward()
    assert x.grad.abs().sum() > 0
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


# A conv that is not 1x1 stride 1; a Linear with out <= in (12 -> 9).
@pytest.mark.parametrize("case", ["conv3x3-strided", "conv-dilated", "linear"])
def test_fused_split_without_that_layout_runs_the_fused_form(case):
    build, shape = CASES[case]
    layer, y, gx, _ = _run(build, shape, "fused-split")
    _, y_ref, gx_ref, _ = _run(build, shape, "weight")
    assert layer.form_name() == "fused" and not layer.form_pending and not y.is_contiguous()
    assert layer.candidate_forms(layer) == ["weight", "activation", "fused"]
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case, form", [("linear", "fused"), ("qkv@qv", "fused"), ("conv3x3-strided", "fused"),
                                        ("conv-grouped", "fused"), ("linear-expanding", "fused-split"),
                                        ("qkv@qv", "fused-split"), ("conv1x1", "fused-split")])
def test_fused_form_under_bf16_autocast(case, form):
    build, shape = CASES[case]
    layer, y, gx, grads = _run(build, shape, form, autocast=True)
    assert layer.form_name() == form
    _, y_ref, gx_ref, grads_ref = _run(build, shape, "weight", autocast=True)
    assert all(g.dtype == torch.float32 for g in grads)  # factor gradients in the factors' dtype
    scale = y_ref.abs().max().item()
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2 * scale)
    torch.testing.assert_close(gx, gx_ref, rtol=2e-2, atol=2e-2 * gx_ref.abs().max().item())
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * want.abs().max().item())


def test_fused_output_accepts_in_place_ops_and_merges_exactly():
    build, shape = CASES["linear"]
    layer = build("fused")
    layer.initialize("small-random")
    layer.base_layer.requires_grad_(False)
    x = _seeded(*shape)
    y = layer(x)
    expected = F.linear(x, layer.base_layer.weight + layer.delta_weight(), layer.base_layer.bias)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    torch.relu_(y).sum().backward()  # in place on the output: allowed (it is not a view)
    with torch.no_grad():
        layer.lora_A.sub_(0.1 * layer.lora_A.grad)
        trained = layer(x)
        layer.merge()
        torch.testing.assert_close(layer.base_layer(x), trained, rtol=1e-5, atol=1e-6)


def test_fused_is_excluded_with_a_reason_and_falls_back():
    dora = LoraLinear(nn.Linear(6, 4), rank=2, scale=1.0, use_dora=True, form="fused")
    dropout = LoraLinear(nn.Linear(6, 4), rank=2, scale=1.0, dropout=0.1, form="fused")
    std = LoraConv2d(StdConv2d(4, 6, 3, padding=1), rank=2, scale=1.0, form="fused")
    assert dora.fused_blocker(dora) == DORA_REASON and dora.form_name() == "weight"
    assert dropout.fused_blocker(dropout) == DROPOUT_REASON and dropout.form_name() == "activation"
    assert std.fused_blocker(std) == CONV_SUBCLASS_REASON.format(name="StdConv2d") and std.form_name() == "weight"
    assert not (dora.form_pending or dropout.form_pending or std.form_pending)  # one form left: nothing to measure
    assert std.candidate_forms(std) == ["weight"]
    plain = LoraLinear(nn.Linear(6, 4), rank=2, scale=1.0)
    assert plain.candidate_forms(plain) == ["weight", "activation", "fused"]
    wide = LoraLinear(nn.Linear(4, 6), rank=2, scale=1.0)
    assert wide.candidate_forms(wide) == ["weight", "activation", "fused"]  # auto never measures fused-split


def test_stdconv_with_form_fused_equals_the_weight_form():
    def build(form: str) -> LoraConv2d:
        return LoraConv2d(StdConv2d(4, 6, 3, padding=1), rank=2, scale=1.0, form=form)
    layer, y, gx, grads = _run(build, (2, 4, 7, 7), "fused")
    _, y_ref, gx_ref, grads_ref = _run(build, (2, 4, 7, 7), "weight")
    assert layer.form_name() == "weight"
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)


def test_auto_measures_three_forms_and_summary_shows_the_choice(monkeypatch):
    import visionlora.lora.layer as layer_module

    monkeypatch.setattr(layer_module.time, "perf_counter", iter(range(10**6)).__next__)  # every form takes 1 s ...
    model = nn.Sequential(nn.Linear(8, 8))
    inject_lora(model, LoraConfig(r=2, targets=[r"0"], train_head=False))
    layer = model[0]
    assert layer.form_pending and "form=activation?" in layer.extra_repr()
    assert lora_summary(model).rows[0].form == "activation?"
    model(torch.randn(3, 8, requires_grad=True)).sum().backward()
    assert not layer.form_pending and layer.form_name() == "fused"  # ... so fused wins: the others are not 25% faster
    assert lora_summary(model).rows[0].form == "fused" and "form=fused" in str(layer.extra_repr())


def _timm_step(name: str, form: str, targets: list[str], split_qkv: bool = True):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5)
    inject_lora(model, LoraConfig(r=2, alpha=4, targets=targets, init="small-random", form=form,
                                  split_qkv=split_qkv))
    x = _seeded(2, 3, *model.pretrained_cfg["input_size"][1:]).requires_grad_()
    loss = F.cross_entropy(model(x), torch.tensor([1, 3]))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    forms = {layer.form_name() for layer in lora_layers(model).values()}
    return loss.detach(), x.grad, grads, forms


TIMM_CASES = [
    ("test_vit", ["attn-qv", r".*\.(attn\.proj|mlp\.fc[12])"]),
    ("test_resnet", ["conv"]),
    ("test_convnext", [r"stages\.\d+\.(blocks\.\d+\.mlp\.fc[12]|downsample\.1)"]),  # the benchmark's targets
]


@pytest.mark.parametrize("form", ["fused", "fused-split"])
@pytest.mark.parametrize("name, targets", TIMM_CASES, ids=[case[0] for case in TIMM_CASES])
def test_timm_model_step_fused_equals_activation(name, targets, form):
    loss_f, gx_f, grads_f, forms_f = _timm_step(name, form, targets)
    loss_a, gx_a, grads_a, forms_a = _timm_step(name, "activation", targets)
    # fused-split: the expanding Linears (qkv, fc1) and 1x1 stride-1 convs in that layout; the other convs, proj and
    # fc2 in the fused one.
    expected = {"fused"} if form == "fused" else {"fused-split", "fused"}
    assert forms_f == expected and forms_a == {"activation"}
    assert len(grads_f) == len(grads_a) > 4 and sum(g.abs().sum() > 0 for g in grads_f.values()) > 4
    torch.testing.assert_close(loss_f, loss_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_f, gx_a, rtol=1e-4, atol=1e-6)
    for key, grad in grads_f.items():
        torch.testing.assert_close(grad, grads_a[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("activation_s, expected", [(0.8, "fused"), (0.7, "activation")])
def test_auto_takes_another_form_only_when_it_is_a_quarter_faster(monkeypatch, activation_s, expected):
    import itertools

    import visionlora.lora.layer as layer_module

    # seconds per forward + backward, in the order the forms are measured; fused-split is not among them
    durations = {"weight": 5.0, "activation": activation_s, "fused": 1.0}
    clock = itertools.accumulate(itertools.chain.from_iterable(
        (0.0, durations[form]) for _ in range(3) for form in durations))
    monkeypatch.setattr(layer_module.time, "perf_counter", clock.__next__)
    layer = LoraLinear(nn.Linear(8, 16), rank=2, scale=1.0)  # expanding: it has the fused-split layout
    layer.base_layer.requires_grad_(False)
    assert layer.candidate_forms(layer) == list(durations)
    assert layer_module.measure_faster_form(layer, torch.randn(3, 8)) == expected
