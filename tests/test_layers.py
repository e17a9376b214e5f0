"""Unit tests of each LoRA layer on plain torch (and timm.layers) modules: ΔW, forward, merge/unmerge, forms, inits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_lora
from timm.layers import Conv2dSame, ScaledStdConv2d, StdConv2d, StdConv2dSame
from torch import nn

from visionlora.lora import (
    LoraConfig,
    LoraConv2d,
    LoraFusedQKV,
    LoraLinear,
    LoraMultiheadAttention,
    inject_lora,
    lora_layers,
)

QKV_SUBSETS = ["q", "k", "v", "qk", "qv", "kv", "qkv"]


def seeded(*shape: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def conv_delta_reference(layer: LoraConv2d) -> torch.Tensor:
    """scale · blockdiag_g(B_g·A_g) in the conv weight's shape, computed group by group."""
    weight = layer.base_layer.weight
    groups, rank = layer.base_layer.groups, layer.rank
    rows_per_group = weight.shape[0] // groups
    a = layer.lora_A.detach().reshape(groups, rank, -1)
    b = layer.lora_B.detach().reshape(weight.shape[0], rank)
    blocks = [b[g * rows_per_group:(g + 1) * rows_per_group] @ a[g] for g in range(groups)]
    return layer.scale * torch.cat(blocks).reshape(weight.shape)


def with_weight(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A copy of ``module`` whose ``weight`` is replaced: the reference for "the base op with W + ΔW"."""
    reference = copy.deepcopy(module)
    with torch.no_grad():
        reference.weight.copy_(weight)
    return reference


def assert_merge_roundtrip(layer, x: torch.Tensor, atol: float = 1e-5) -> None:
    """merge() writes W + ΔW and keeps the output; unmerge() restores W to within 1e-6."""
    with torch.no_grad():
        w0 = layer.base_weight().detach().clone()
        y = layer(x)
        expected = layer.adapted_weight().detach().clone()
        layer.merge()
        assert layer.merged
        assert torch.equal(layer.base_weight(), expected)
        torch.testing.assert_close(layer(x), y, atol=atol, rtol=1e-5)
        layer.unmerge()
        assert not layer.merged
        assert (layer.base_weight() - w0).abs().max().item() <= 1e-6
        torch.testing.assert_close(layer(x), y, atol=atol, rtol=1e-5)


# ----- Linear --------------------------------------------------------------------------------------------------
def test_linear_delta_forward_and_merge():
    base = nn.Linear(12, 10)
    w0 = base.weight.detach().clone()
    layer = LoraLinear(base, rank=3, scale=2.0)
    layer.initialize("default")
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) == 3 * 12
    randomize_lora(layer)
    delta = 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()
    torch.testing.assert_close(layer.delta_weight(), delta, atol=1e-7, rtol=0)
    x = seeded(4, 12)
    torch.testing.assert_close(layer(x), F.linear(x, w0 + delta, base.bias), atol=1e-6, rtol=1e-6)
    assert layer.lora_parameter_count() == 3 * (12 + 10)
    with torch.no_grad():
        layer.merge()
    assert torch.equal(base.weight, w0 + layer.delta_weight())
    layer.unmerge()
    assert_merge_roundtrip(layer, x)


@pytest.mark.parametrize("slices", QKV_SUBSETS)
def test_fused_qkv_slices(slices):
    dim, in_features, rank, scale = 8, 6, 2, 1.5
    base = nn.Linear(in_features, 3 * dim)
    w0 = base.weight.detach().clone()
    layer = LoraFusedQKV(base, rank=rank, scale=scale, slices=slices)
    layer.initialize("small-random")
    names = {n for n, _ in layer.named_parameters() if n.rpartition(".")[2].startswith("lora_")}
    assert names == {f"lora_slices.lora_{f}_{s}" for s in slices for f in "AB"}
    assert layer.lora_parameter_count() == len(slices) * rank * (in_features + dim)

    delta = layer.delta_weight()
    for index, name in enumerate("qkv"):
        rows = delta[index * dim:(index + 1) * dim]
        if name in slices:
            a = getattr(layer.lora_slices, f"lora_A_{name}").detach()
            b = getattr(layer.lora_slices, f"lora_B_{name}").detach()
            torch.testing.assert_close(rows, scale * b @ a, atol=1e-7, rtol=0)
            assert rows.abs().max() > 0
        else:
            assert torch.equal(rows, torch.zeros_like(rows))

    x = seeded(5, in_features)
    torch.testing.assert_close(layer(x), F.linear(x, w0 + delta, base.bias), atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        layer.merge()
    assert torch.equal(base.weight, w0 + delta)  # merged into the native qkv.weight
    for index, name in enumerate("qkv"):
        if name not in slices:
            assert torch.equal(base.weight[index * dim:(index + 1) * dim], w0[index * dim:(index + 1) * dim])
    layer.unmerge()
    assert (base.weight - w0).abs().max().item() <= 1e-6
    assert_merge_roundtrip(layer, x)


def test_fused_qkv_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible by 3"):
        LoraFusedQKV(nn.Linear(4, 10), rank=1, scale=1.0)
    with pytest.raises(ValueError, match="subset of 'qkv'"):
        LoraFusedQKV(nn.Linear(4, 12), rank=1, scale=1.0, slices="qx")


# ----- Conv2d grid ---------------------------------------------------------------------------------------------
# (in, out, kernel, stride, padding, dilation, padding_mode, groups, rank)
CONV_CASES = [
    pytest.param(4, 6, 1, 1, 0, 1, "zeros", 1, 2, id="pointwise"),
    pytest.param(4, 6, 3, 1, 1, 1, "zeros", 1, 2, id="3x3"),
    pytest.param(4, 6, 3, 2, 1, 1, "zeros", 1, 3, id="3x3-stride2"),
    pytest.param(4, 6, 3, 1, 2, 2, "zeros", 1, 2, id="3x3-dilation2"),
    pytest.param(4, 6, (3, 5), (1, 2), (1, 2), (2, 1), "zeros", 1, 2, id="3x5-asymmetric"),
    pytest.param(4, 6, 3, 1, 1, 1, "reflect", 1, 2, id="reflect"),
    pytest.param(4, 6, 3, 1, "same", 2, "reflect", 1, 2, id="reflect-same-dilation2"),
    pytest.param(4, 6, 3, 2, 1, 1, "circular", 1, 2, id="circular-stride2"),
    pytest.param(6, 6, 3, 1, 1, 1, "zeros", 2, 3, id="groups2-rank3"),
    pytest.param(6, 9, 3, 1, 1, 1, "zeros", 3, 2, id="groups3-rank2"),
    pytest.param(6, 6, 3, 1, 2, 2, "circular", 3, 2, id="groups3-circular-dilation2"),
    pytest.param(8, 8, 3, 1, 1, 1, "zeros", 8, 1, id="depthwise"),
    pytest.param(4, 8, 5, 2, 2, 1, "reflect", 4, 3, id="depthwise-x2-reflect-rank3"),
]


def make_conv_layer(in_ch, out_ch, kernel, stride, padding, dilation, mode, groups, rank, form, seed=0):
    torch.manual_seed(seed)
    base = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     padding_mode=mode)
    layer = LoraConv2d(base, rank=rank, scale=0.75, form=form)
    layer.initialize("default")
    randomize_lora(layer, std=0.2)
    return layer


@pytest.mark.parametrize("in_ch, out_ch, kernel, stride, padding, dilation, mode, groups, rank", CONV_CASES)
def test_conv2d_forms_agree_with_reference(in_ch, out_ch, kernel, stride, padding, dilation, mode, groups, rank):
    args = (in_ch, out_ch, kernel, stride, padding, dilation, mode, groups, rank)
    activation = make_conv_layer(*args, form="activation")
    weight = make_conv_layer(*args, form="weight")
    assert not activation.weight_form and weight.weight_form
    assert activation.lora_A.shape == (groups * rank, in_ch // groups, *activation.base_layer.kernel_size)
    assert activation.lora_B.shape == (out_ch, rank, 1, 1)
    assert torch.equal(activation.lora_A, weight.lora_A) and torch.equal(activation.lora_B, weight.lora_B)

    delta = conv_delta_reference(activation)
    torch.testing.assert_close(activation.delta_weight(), delta, atol=1e-6, rtol=1e-6)
    x = seeded(2, in_ch, 9, 9)
    reference = with_weight(activation.base_layer, activation.base_layer.weight + delta)(x)
    assert (reference - activation.base_layer(x)).abs().max() > 1e-3  # the update is not negligible

    grad_out = None
    grads = {}
    for name, layer in (("activation", activation), ("weight", weight)):
        y = layer(x)
        torch.testing.assert_close(y, reference, atol=1e-5, rtol=1e-5)
        grad_out = seeded(*y.shape, seed=11) if grad_out is None else grad_out
        (y * grad_out).sum().backward()
        grads[name] = (layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    for got, want in zip(grads["activation"], grads["weight"], strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)

    assert_merge_roundtrip(activation, x)
    assert_merge_roundtrip(weight, x)


def test_conv2d_auto_form_and_parameter_count():
    layer = LoraConv2d(nn.Conv2d(6, 12, 3, groups=3), rank=2, scale=1.0)
    assert layer.weight_form  # 'auto' picks the weight-space form for convs
    assert layer.lora_parameter_count() == 3 * 2 * (12 // 3 + 6 // 3 * 9)
    assert LoraConv2d(nn.Conv2d(6, 12, 3), rank=2, scale=1.0, dropout=0.1).weight_form is False
    assert LoraLinear(nn.Linear(4, 4), rank=2, scale=1.0).weight_form is False


# ----- activation-space vs weight-space forms on Linear / fused qkv ------------------------------------------------
def build_linear(form: str) -> LoraLinear:
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(10, 7), rank=3, scale=1.25, form=form)
    layer.initialize("small-random")
    return layer


def build_qkv(form: str) -> LoraFusedQKV:
    torch.manual_seed(0)
    layer = LoraFusedQKV(nn.Linear(10, 12), rank=2, scale=0.5, slices="kv", form=form)
    layer.initialize("small-random")
    return layer


@pytest.mark.parametrize("build", [build_linear, build_qkv], ids=["linear", "qkv"])
def test_activation_and_weight_forms_agree(build):
    activation, weight = build("activation"), build("weight")
    assert not activation.weight_form and weight.weight_form
    x = seeded(3, 4, 10)
    y_act, y_w = activation(x), weight(x)
    assert (y_act - activation.base_layer(x)).abs().max() > 1e-5
    torch.testing.assert_close(y_act, y_w, atol=1e-6, rtol=1e-5)
    grad_out = seeded(*y_act.shape, seed=3)
    (y_act * grad_out).sum().backward()
    (y_w * grad_out).sum().backward()
    params_act = [p for n, p in activation.named_parameters() if "lora_" in n]
    params_w = [p for n, p in weight.named_parameters() if "lora_" in n]
    assert len(params_act) == len(params_w) >= 2
    for p_act, p_w in zip(params_act, params_w, strict=True):
        assert p_w.grad.abs().max() > 0
        torch.testing.assert_close(p_act.grad, p_w.grad, atol=1e-6, rtol=1e-4)


# ----- DoRA ----------------------------------------------------------------------------------------------------
def dora_layers():
    torch.manual_seed(0)
    return [
        ("linear", LoraLinear(nn.Linear(10, 7), rank=2, scale=1.0, use_dora=True), seeded(3, 10)),
        ("qkv", LoraFusedQKV(nn.Linear(8, 12), rank=2, scale=1.0, slices="qv", use_dora=True), seeded(3, 8)),
        ("conv", LoraConv2d(nn.Conv2d(6, 8, 3, padding=1, groups=2), rank=2, scale=1.0, use_dora=True),
         seeded(2, 6, 7, 7)),
        ("stdconv", LoraConv2d(StdConv2d(4, 6, 3, padding=1), rank=2, scale=1.0, use_dora=True),
         seeded(2, 4, 7, 7)),
    ]


@pytest.mark.parametrize("index", range(4), ids=["linear", "qkv", "conv", "stdconv"])
def test_dora_merged_equals_unmerged(index):
    _, layer, x = dora_layers()[index]
    assert layer.weight_form
    y_base = layer.base_layer(x).detach()
    layer.initialize("default")
    torch.testing.assert_close(layer(x), y_base, atol=1e-6, rtol=1e-6)  # m = ||W|| at init: W·m/||W|| = W
    randomize_lora(layer, std=0.1)
    with torch.no_grad():
        w0 = layer.base_weight().clone()
        adapted = w0 + layer.delta_weight()
        norm = adapted.reshape(adapted.shape[0], -1).norm(dim=1)
        expected_weight = adapted * (layer.lora_magnitude / norm).reshape(-1, *[1] * (adapted.dim() - 1))
        y = layer(x)
    torch.testing.assert_close(layer.adapted_weight(), expected_weight, atol=1e-6, rtol=1e-6)
    assert (y - y_base).abs().max() > 1e-3
    assert_merge_roundtrip(layer, x)
    layer(x).sum().backward()
    assert layer.lora_magnitude.grad is not None and layer.lora_magnitude.grad.abs().max() > 0


def test_dora_and_weight_only_layers_reject_dropout():
    with pytest.raises(ValueError, match="dropout"):
        LoraLinear(nn.Linear(4, 4), rank=1, scale=1.0, dropout=0.1, use_dora=True)
    with pytest.raises(ValueError, match="dropout"):
        LoraConv2d(Conv2dSame(4, 4, 3), rank=1, scale=1.0, dropout=0.1)
    with pytest.raises(ValueError, match="dropout"):
        LoraLinear(nn.Linear(4, 4), rank=1, scale=1.0, dropout=0.1, form="weight")


# ----- initialisation ------------------------------------------------------------------------------------------
def init_cases():
    torch.manual_seed(0)
    return {
        "linear": (LoraLinear(nn.Linear(12, 10), rank=3, scale=2.0), seeded(4, 12)),
        "qkv": (LoraFusedQKV(nn.Linear(8, 24), rank=2, scale=0.5, slices="qv"), seeded(4, 8)),
        "conv": (LoraConv2d(nn.Conv2d(6, 8, 3, padding=1, groups=2), rank=2, scale=1.0), seeded(2, 6, 6, 6)),
        "conv-activation": (LoraConv2d(nn.Conv2d(4, 6, 3), rank=2, scale=4.0, form="activation"),
                            seeded(2, 4, 6, 6)),
    }


@pytest.mark.parametrize("init", ["default", "gaussian"])
@pytest.mark.parametrize("kind", ["linear", "qkv", "conv", "conv-activation"])
def test_zero_b_inits_leave_output_unchanged(kind, init):
    layer, x = init_cases()[kind]
    y_base = layer.base_layer(x)
    layer.initialize(init)
    for pair in layer.factors():
        assert torch.count_nonzero(pair.B) == 0
        assert torch.count_nonzero(pair.A) == pair.A.numel()
    assert torch.equal(layer(x), y_base)


def test_gaussian_and_small_random_init_scales():
    layer = LoraLinear(nn.Linear(400, 300), rank=4, scale=1.0)
    layer.initialize("gaussian")
    assert abs(layer.lora_A.std().item() - 1 / 4) < 0.01  # std 1/r, as PEFT's init_lora_weights="gaussian"
    layer.initialize("small-random")
    assert abs(layer.lora_A.std().item() - 0.02) < 0.002 and abs(layer.lora_B.std().item() - 0.02) < 0.002


@pytest.mark.parametrize("kind", ["linear", "qkv", "conv", "conv-activation"])
def test_small_random_init_changes_output(kind):
    layer, x = init_cases()[kind]
    y_base = layer.base_layer(x)
    layer.initialize("small-random")
    assert all(torch.count_nonzero(p.B) == p.B.numel() for p in layer.factors())
    diff = (layer(x) - y_base).abs().max().item()
    assert diff > 1e-6
    torch.testing.assert_close(layer(x), layer.forward_with_weight(x, layer.base_weight() + layer.delta_weight()),
                               atol=1e-6, rtol=1e-5)


def top_r_blocks(matrix: torch.Tensor, groups: int, rank: int) -> torch.Tensor:
    """The best rank-r approximation of each of ``groups`` row blocks of ``matrix`` (Eckart-Young)."""
    parts = []
    for block in matrix.reshape(groups, -1, matrix.shape[1]).double():
        u, s, vh = torch.linalg.svd(block, full_matrices=False)
        parts.append(u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank])
    return torch.cat(parts).float()


@pytest.mark.parametrize("kind", ["linear", "qkv", "conv", "conv-activation"])
def test_pissa_init(kind):
    layer, x = init_cases()[kind]
    w0 = layer.base_weight().detach().clone()
    y_base = layer.base_layer(x).detach()
    layer.initialize("pissa")
    torch.testing.assert_close(layer(x), y_base, atol=1e-5, rtol=1e-5)  # W_res + ΔW = W

    matrix = w0.reshape(w0.shape[0], -1)
    expected = torch.zeros_like(matrix)
    for pair in layer.factors():
        expected[pair.rows] = top_r_blocks(matrix[pair.rows], pair.groups, pair.rank)
    delta = layer.delta_weight().detach().reshape(matrix.shape)
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-4)
    assert delta.abs().max() > 0.1 * matrix.abs().max()
    torch.testing.assert_close(layer.base_weight().reshape(matrix.shape), matrix - expected, atol=1e-5, rtol=1e-4)
    if kind == "qkv":  # the un-adapted k slice keeps its original rows exactly
        assert torch.equal(layer.base_weight()[8:16], w0[8:16])
    initial = layer.pissa_initial_factors()
    assert initial is not None and len(initial) == len(layer.factors())
    for (a0, b0), pair in zip(initial, layer.factors(), strict=True):
        assert torch.equal(a0, pair.A) and torch.equal(b0, pair.B)
    assert_merge_roundtrip(layer, x)


# ----- scale, dropout ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_rslora, expected_scale", [(False, 12.0 / 4), (True, 12.0 / 2)])
def test_scale_alpha_over_r_or_sqrt_r(use_rslora, expected_scale):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Conv2d(3, 8, 3))
    inject_lora(model, LoraConfig(r=4, alpha=12.0, targets=["0", "2"], use_rslora=use_rslora, init="small-random"))
    layers = lora_layers(model)
    assert sorted(layers) == ["0", "2"]
    for layer in layers.values():
        assert layer.scale == pytest.approx(expected_scale)
    linear = layers["0"]
    expected = expected_scale * linear.lora_B.detach() @ linear.lora_A.detach()
    torch.testing.assert_close(linear.delta_weight(), expected, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(layers["2"].delta_weight(), conv_delta_reference(layers["2"]), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_dropout_acts_only_on_lora_branch(kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = LoraLinear(nn.Linear(16, 8), rank=2, scale=2.0, dropout=0.5), seeded(6, 16)
    else:
        layer, x = LoraConv2d(nn.Conv2d(4, 6, 3, padding=1), rank=2, scale=2.0, dropout=0.5), seeded(2, 4, 6, 6)
    assert not layer.weight_form
    layer.initialize("default")
    layer.train()
    y_base = layer.base_layer(x)
    assert torch.equal(layer(x), y_base)  # B = 0: dropout never touches the base path

    randomize_lora(layer, std=0.3)
    torch.manual_seed(123)
    y_train = layer(x)
    torch.manual_seed(123)
    dropped = F.dropout(x, p=0.5, training=True)
    assert not torch.equal(dropped, x)
    torch.testing.assert_close(y_train, y_base + layer.activation_delta(dropped), atol=1e-6, rtol=1e-6)

    layer.eval()
    y_eval = layer(x)
    torch.testing.assert_close(y_eval, y_base + layer.activation_delta(x), atol=1e-6, rtol=1e-6)
    assert (y_train - y_eval).abs().max() > 1e-4


# ----- nn.MultiheadAttention -----------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("slices, adapt_out", [("qkv", True), ("qv", True), ("qv", False), ("k", False), ("", True)])
def test_multihead_attention(batch_first, slices, adapt_out):
    embed, heads, rank, scale = 8, 2, 2, 1.5
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(embed, heads, batch_first=batch_first)
    w_in0 = mha.in_proj_weight.detach().clone()
    w_out0 = mha.out_proj.weight.detach().clone()
    x = seeded(2, 5, embed) if batch_first else seeded(5, 2, embed)
    y_base, attn_base = (t.detach() for t in mha(x, x, x))

    layer = LoraMultiheadAttention(mha, rank=rank, scale=scale, slices=slices, adapt_out_proj=adapt_out)
    assert layer.weight_form
    layer.initialize("default")
    torch.testing.assert_close(layer(x, x, x)[0], y_base, atol=1e-6, rtol=1e-6)
    randomize_lora(layer, std=0.2)
    expected_count = len(slices) * rank * 2 * embed + (2 * rank * embed if adapt_out else 0)
    assert layer.lora_parameter_count() == expected_count

    delta_in = layer.delta_weight()
    for index, name in enumerate("qkv"):
        rows = delta_in[index * embed:(index + 1) * embed]
        if name in slices:
            a = getattr(layer.lora_slices, f"lora_A_{name}").detach()
            b = getattr(layer.lora_slices, f"lora_B_{name}").detach()
            torch.testing.assert_close(rows, scale * b @ a, atol=1e-7, rtol=0)
        else:
            assert torch.equal(rows, torch.zeros_like(rows))
    delta_out = layer.out_delta_weight()
    if adapt_out:
        torch.testing.assert_close(delta_out, scale * layer.lora_out_B.detach() @ layer.lora_out_A.detach())
    else:
        assert torch.equal(delta_out, torch.zeros_like(delta_out))

    reference = copy.deepcopy(mha)
    with torch.no_grad():
        reference.in_proj_weight.copy_(w_in0 + delta_in)
        reference.out_proj.weight.copy_(w_out0 + delta_out)
    y, attn = layer(x, x, x)
    y_ref, attn_ref = reference(x, x, x)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attn, attn_ref, atol=1e-6, rtol=1e-5)
    assert (y - y_base).abs().max() > 1e-4

    with torch.no_grad():
        layer.merge()
        layer.merge()
    assert torch.equal(mha.in_proj_weight, w_in0 + delta_in)
    assert torch.equal(mha.out_proj.weight, w_out0 + delta_out)
    torch.testing.assert_close(layer(x, x, x)[0], y, atol=1e-6, rtol=1e-5)
    layer.unmerge()
    assert (mha.in_proj_weight - w_in0).abs().max().item() <= 1e-6
    assert (mha.out_proj.weight - w_out0).abs().max().item() <= 1e-6
    torch.testing.assert_close(layer(x, x, x)[0], y, atol=1e-6, rtol=1e-5)


def test_multihead_attention_rejects_unsupported():
    with pytest.raises(ValueError, match="at least one"):
        LoraMultiheadAttention(nn.MultiheadAttention(8, 2), rank=1, scale=1.0, slices="", adapt_out_proj=False)
    with pytest.raises(ValueError, match="kdim"):
        LoraMultiheadAttention(nn.MultiheadAttention(8, 2, kdim=4, vdim=4), rank=1, scale=1.0)
    layer = LoraMultiheadAttention(nn.MultiheadAttention(8, 2), rank=1, scale=1.0)
    with pytest.raises(ValueError, match="pissa"):
        layer.initialize("pissa")


# ----- timm conv subclasses ------------------------------------------------------------------------------------
TIMM_CONVS = {
    "Conv2dSame": lambda: Conv2dSame(4, 6, 3, stride=2),
    "Conv2dSame-depthwise": lambda: Conv2dSame(4, 4, 5, stride=2, groups=4),
    "StdConv2d": lambda: StdConv2d(4, 6, 3, padding=1),
    "StdConv2dSame": lambda: StdConv2dSame(4, 6, 3, stride=2, padding="same"),
    "ScaledStdConv2d": lambda: ScaledStdConv2d(4, 6, 3, padding=1, groups=2),
}


@pytest.mark.parametrize("form", ["activation", "weight", "auto"])
@pytest.mark.parametrize("kind", list(TIMM_CONVS))
def test_timm_conv_subclasses_merge_exactly(kind, form):
    torch.manual_seed(0)
    conv = TIMM_CONVS[kind]()
    w0 = conv.weight.detach().clone()
    x = seeded(2, 4, 11, 11)
    y_base = conv(x).detach()
    layer = LoraConv2d(conv, rank=2, scale=1.0, form=form)
    assert layer.weight_form  # the weight transform / dynamic padding needs op(x, W + ΔW)
    layer.initialize("default")
    assert torch.equal(layer(x), y_base)
    randomize_lora(layer, std=0.3)
    delta = conv_delta_reference(layer)
    with torch.no_grad():
        y = layer(x)
        torch.testing.assert_close(y, with_weight(conv, w0 + delta)(x), atol=1e-5, rtol=1e-5)
        assert (y - y_base).abs().max() > 1e-3
        layer.merge()
        assert torch.equal(layer(x), y)  # merged == unmerged, bit for bit
        assert torch.equal(conv(x), y)
        layer.unmerge()
        assert (conv.weight - w0).abs().max().item() <= 1e-6
