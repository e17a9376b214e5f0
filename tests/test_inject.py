"""inject_lora / merge_lora / unload_lora on real timm families: invariants, targeting, bad input, checkpointing."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    MODEL_CASES,
    ModelCase,
    assert_state_equal,
    create_model,
    make_model,
    max_rel_diff,
    state_copy,
)
from timm.layers import Conv2dSame, StdConv2d
from torch import nn

from visionlora.lora import (
    LoraConfig,
    LoraConv2d,
    LoraFusedQKV,
    LoraLinear,
    inject_lora,
    lora_layers,
    merge_lora,
    unload_lora,
    unmerge_lora,
)
from visionlora.lora.layer import LoraLayer

CASES = list(MODEL_CASES.values())
CASE_IDS = [case.id for case in CASES]
BN_CASES = [MODEL_CASES["test_resnet"], MODEL_CASES["test_efficientnet"]]
# Families with Linear layers worth adapting: the regex of the Linears that the "vit-all" preset must pick.
LINEAR_TARGETS = {
    "test_vit": r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])",
    "test_convnext": r"stages\.\d+\.blocks\.\d+\.mlp\.fc[12]",
}
RANK = 4


def config_for(case: ModelCase, **overrides) -> LoraConfig:
    targets = ["conv", "vit-all"] if case.name in LINEAR_TARGETS else ["conv"]
    return LoraConfig(**{"r": RANK, "alpha": 8.0, "targets": targets, **overrides})


def inject_quietly(model: nn.Module, config: LoraConfig) -> nn.Module:
    """inject_lora without the expected skip/cap warnings of tiny depthwise or 1x1 layers."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LoRA (skips|rank for)")
        return inject_lora(model, config)


def injected(case: ModelCase, **overrides) -> tuple[nn.Module, torch.Tensor]:
    model, x = make_model(case)
    return inject_quietly(model, config_for(case, **overrides)), x


def head_path(model: nn.Module) -> str:
    head = model.get_classifier()
    return next(path for path, module in model.named_modules() if module is head)


def block_shape(module: nn.Module, path: str) -> tuple[int, int, int]:
    """(groups, rows per block, fan-in per block) of the weight blocks a LoRA adapter on ``module`` factorises."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.groups, module.out_channels // module.groups, module.in_channels // module.groups * kh * kw
    rows = module.out_features // 3 if path.endswith(".qkv") else module.out_features
    return 1, rows, module.in_features


def largest_rank(rows: int, fan_in: int, wanted: int) -> int:
    """The largest rank <= wanted whose factors are no larger than the rows x fan_in block."""
    rank = wanted
    while rank > 0 and rank * (rows + fan_in) > rows * fan_in:
        rank -= 1
    return rank


def expected_ranks(model: nn.Module, case: ModelCase, wanted: int) -> dict[str, int]:
    """Rank per adapted path for ``config_for(case)``, derived from the unadapted model's layer shapes."""
    head = model.get_classifier()
    expected = {}
    for path, module in model.named_modules():
        if module is head:
            continue
        is_target = isinstance(module, nn.Conv2d) or (
            isinstance(module, nn.Linear) and case.name in LINEAR_TARGETS
            and re.fullmatch(LINEAR_TARGETS[case.name], path) is not None
        )
        if is_target:
            _, rows, fan_in = block_shape(module, path)
            rank = largest_rank(rows, fan_in, wanted)
            if rank:
                expected[path] = rank
    return expected


def expected_lora_numel(layer: LoraLayer) -> int:
    """Factor sizes from the base layer's shape: r·(out + fan_in) per matrix (per slice for fused qkv)."""
    base, rank = layer.base_layer, layer.rank
    if isinstance(layer, LoraFusedQKV):
        return len(layer.lora_slices.slices) * rank * (base.in_features + base.out_features // 3)
    if isinstance(layer, LoraLinear):
        return rank * (base.in_features + base.out_features)
    assert isinstance(layer, LoraConv2d)
    kh, kw = base.kernel_size
    return rank * (base.out_channels + base.in_channels * kh * kw)  # groups · r · (out/g + in/g·kh·kw)


def is_lora_name(name: str) -> bool:
    return name.rpartition(".")[2].startswith("lora_")


def base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every state tensor except LoRA factors and the classifier head."""
    head = head_path(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not is_lora_name(k) and not k.startswith(head + ".")}


def structure(model: nn.Module) -> tuple[list[tuple[str, type]], list[tuple[str, bool]]]:
    """Module types and parameters' requires_grad flags: what a failed inject_lora must leave untouched."""
    modules = [(name, type(module)) for name, module in model.named_modules()]
    flags = [(name, param.requires_grad) for name, param in model.named_parameters()]
    return modules, flags


# ----- invariants on every family ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_default_init_leaves_output_unchanged(case):
    model, x = make_model(case)
    with torch.no_grad():
        y0 = model(x)
    assert y0.shape == (2, 5) and y0.std() > 0
    inject_quietly(model, config_for(case))
    assert len(lora_layers(model)) > 0
    with torch.no_grad():
        y1 = model(x)
    assert (y1 - y0).abs().max().item() <= 1e-6


# What each family is in the list for: the adapted layers must really include that kind of layer.
FAMILY_FEATURE = {
    "test_vit": lambda layer: isinstance(layer, LoraFusedQKV) and layer.lora_slices.slices == "qkv",
    "test_resnet": lambda layer: layer.base_layer.kernel_size == (3, 3),
    "test_convnext": lambda layer: isinstance(layer, LoraLinear),
    "test_efficientnet": lambda layer: layer.base_layer.kernel_size == (1, 1) and layer.base_layer.bias is not None,
    "resnetv2_50x1_bit": lambda layer: type(layer.base_layer) is StdConv2d,
    "tf_efficientnet_b0": lambda layer: type(layer.base_layer) is Conv2dSame,
    "resnext26ts": lambda layer: 1 < layer.base_layer.groups < layer.base_layer.in_channels,
    "resnet18-output_stride8": lambda layer: isinstance(layer, LoraConv2d) and max(layer.base_layer.dilation) > 1,
}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_family_adapts_its_characteristic_layers(case):
    model, x = injected(case, init="small-random")
    special = {path: layer for path, layer in lora_layers(model).items() if FAMILY_FEATURE[case.id](layer)}
    assert special
    with torch.no_grad():
        y = model(x)
        for layer in special.values():  # these layers alone merged: the output must not move
            layer.merge()
        assert max_rel_diff(y, model(x)) <= 1e-5
        merge_lora(model)
        assert max_rel_diff(y, model(x)) <= 1e-5
    if case.id == "resnet18-output_stride8":
        assert {layer.base_layer.dilation for layer in special.values()} == {(2, 2), (4, 4)}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_trainable_parameters_are_lora_and_head(case):
    model, _ = make_model(case)
    expected = expected_ranks(model, case, RANK)
    head = head_path(model)
    inject_quietly(model, config_for(case))
    layers = lora_layers(model)
    assert {path: layer.rank for path, layer in layers.items()} == expected
    assert not isinstance(model.get_submodule(head), LoraLayer)

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    lora_names = {name for name, _ in model.named_parameters() if is_lora_name(name)}
    head_names = {f"{head}.{name}" for name, _ in model.get_submodule(head).named_parameters()}
    assert lora_names and head_names
    assert trainable == lora_names | head_names

    head_numel = sum(p.numel() for p in model.get_submodule(head).parameters())
    expected_count = sum(expected_lora_numel(layer) for layer in layers.values()) + head_numel
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected_count
    assert sum(layer.lora_parameter_count() for layer in layers.values()) + head_numel == expected_count


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_optimizer_step_changes_only_lora_and_head(case):
    model, x = injected(case)
    frozen = base_tensors(model)
    b_before = {n: p.detach().clone() for n, p in model.named_parameters() if re.search(r"\.lora_B\w*$", n)}
    head_before = {k: v.clone() for k, v in model.get_classifier().state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    model.train()
    loss = F.cross_entropy(model(x), torch.tensor([1, 3]))
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    # Residual branches behind a zero-initialised last BatchNorm (timm's zero_init_last) get no gradient at all.
    has_grad = [n for n, p in model.named_parameters() if n in b_before and p.grad.abs().max() > 0]
    assert has_grad
    optimizer.step()

    assert_state_equal(frozen, base_tensors(model))  # weights and BatchNorm buffers, bit for bit
    changed = [n for n, p in model.named_parameters() if n in b_before and not torch.equal(p, b_before[n])]
    assert changed == has_grad
    head_after = model.get_classifier().state_dict()
    assert all(not torch.equal(head_after[k], v) for k, v in head_before.items())


@pytest.mark.parametrize("case", [MODEL_CASES["test_vit"], MODEL_CASES["test_resnet"]], ids=["test_vit", "test_resnet"])
def test_sgd_steps_keep_base_weights(case):
    model, x = injected(case, init="small-random")
    frozen = base_tensors(model)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if is_lora_name(n)}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model(x).logsumexp(dim=1).mean().backward()
        optimizer.step()
    assert_state_equal(frozen, base_tensors(model))
    for name, param in model.named_parameters():
        if name in lora_before:
            assert not torch.equal(param, lora_before[name]), name


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_merge_equals_unmerged_and_is_idempotent(case):
    model, x = make_model(case)
    with torch.no_grad():
        y_base = model(x)
    inject_quietly(model, config_for(case, init="small-random"))
    before = base_tensors(model)
    with torch.no_grad():
        y = model(x)
        assert max_rel_diff(y, y_base) > 1e-4  # the adapters really change the output
        merge_lora(model)
        assert all(layer.merged for layer in lora_layers(model).values())
        y_merged = model(x)
        merged_state = state_copy(model)
        merge_lora(model)
        assert_state_equal(merged_state, state_copy(model))
        assert max_rel_diff(y, y_merged) <= 1e-5
        unmerge_lora(model)
        assert not any(layer.merged for layer in lora_layers(model).values())
        for name, tensor in base_tensors(model).items():
            assert (tensor - before[name]).abs().max().item() <= 1e-6, name
        assert max_rel_diff(y, model(x)) <= 1e-5


@pytest.mark.parametrize("form", ["activation", "weight"])
@pytest.mark.parametrize("name", ["test_vit", "test_resnet"])
def test_merge_in_either_form(name, form):
    case = MODEL_CASES[name]
    model, x = injected(case, init="small-random", form=form)
    layers = lora_layers(model)
    assert all(layer.weight_form == (form == "weight") for layer in layers.values())
    with torch.no_grad():
        y = model(x)
        merge_lora(model)
        assert max_rel_diff(y, model(x)) <= 1e-5


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_unload_gives_a_plain_timm_model(case):
    model, x = make_model(case)
    keys = list(model.state_dict())
    inject_quietly(model, config_for(case, init="small-random"))
    with torch.no_grad():
        y = model(x)
    unload_lora(model)
    assert not lora_layers(model)
    assert list(model.state_dict()) == keys
    fresh = create_model(case, seed=123)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        y_unloaded, y_fresh = model(x), fresh(x)
    assert torch.equal(y_fresh, y_unloaded)
    assert max_rel_diff(y, y_fresh) <= 1e-5


@pytest.mark.parametrize("case", BN_CASES, ids=[c.id for c in BN_CASES])
@pytest.mark.parametrize("freeze", [True, False])
def test_batchnorm_running_stats(case, freeze):
    model, x = injected(case, freeze_bn_stats=freeze)
    bn = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    assert len(bn) > 3
    with torch.no_grad():
        y_eval = model(x)
        model.train()
        y_train = model(x)
        model(x * 2 + 1)
    after = model.state_dict()
    changed = [k for k, v in bn.items() if not torch.equal(after[k], v)]
    if freeze:
        assert changed == []
        torch.testing.assert_close(y_train, y_eval, atol=1e-6, rtol=1e-6)  # BN used its running stats
    else:
        assert set(changed) == set(bn)
        assert after[next(k for k in bn if "num_batches" in k)].item() == 2


# ----- targeting -----------------------------------------------------------------------------------------------
def vit() -> nn.Module:
    return make_model("test_vit")[0]


def test_target_regex_is_fullmatch():
    model = inject_lora(vit(), LoraConfig(targets=[r"blocks\.0\.attn\.proj"]))
    assert list(lora_layers(model)) == ["blocks.0.attn.proj"]
    assert type(model.patch_embed.proj) is nn.Conv2d
    model = inject_lora(vit(), LoraConfig(targets=[r".*proj"]))
    assert sorted(lora_layers(model)) == sorted(["patch_embed.proj"] + [f"blocks.{i}.attn.proj" for i in range(6)])
    with pytest.raises(ValueError, match="proj"):
        inject_lora(vit(), LoraConfig(targets=["proj"]))


@pytest.mark.parametrize("preset, kinds", [
    ("attn", {"attn.qkv": ("LoraFusedQKV", "qkv"), "attn.proj": ("LoraLinear", "")}),
    ("attn-qv", {"attn.qkv": ("LoraFusedQKV", "qv")}),
    ("vit-all", {"attn.qkv": ("LoraFusedQKV", "qkv"), "attn.proj": ("LoraLinear", ""),
                 "mlp.fc1": ("LoraLinear", ""), "mlp.fc2": ("LoraLinear", "")}),
])
def test_vit_presets(preset, kinds):
    model = inject_lora(vit(), LoraConfig(r=2, targets=[preset], init="small-random"))
    layers = lora_layers(model)
    expected = {f"blocks.{i}.{suffix}": kind for i in range(6) for suffix, kind in kinds.items()}
    got = {path: (type(layer).__name__, getattr(getattr(layer, "lora_slices", None), "slices", ""))
           for path, layer in layers.items()}
    assert got == expected
    qkv = layers["blocks.0.attn.qkv"]
    slices = kinds["attn.qkv"][1]
    names = {n for n, _ in qkv.named_parameters() if is_lora_name(n)}
    assert names == {f"lora_slices.lora_{f}_{s}" for s in slices for f in "AB"}
    delta = qkv.delta_weight()
    for index, name in enumerate("qkv"):
        rows = delta[index * 64:(index + 1) * 64]
        assert (rows.abs().max() > 0) == (name in slices)


def test_qkv_slice_suffix_and_split_qkv_false():
    model = inject_lora(vit(), LoraConfig(r=2, targets=[r"blocks\.1\.attn\.qkv@vq"]))
    layer = lora_layers(model)["blocks.1.attn.qkv"]
    assert isinstance(layer, LoraFusedQKV) and layer.lora_slices.slices == "qv"
    model = inject_lora(vit(), LoraConfig(r=2, targets=[r"blocks\.1\.attn\.qkv@k", r"blocks\.\d\.attn\.qkv@v"]))
    layers = lora_layers(model)
    assert [layers[f"blocks.{i}.attn.qkv"].lora_slices.slices for i in range(6)] == ["v", "kv", "v", "v", "v", "v"]
    model = inject_lora(vit(), LoraConfig(r=2, targets=[r"blocks\.1\.attn\.qkv"], split_qkv=False))
    layer = lora_layers(model)["blocks.1.attn.qkv"]
    assert type(layer) is LoraLinear and layer.lora_B.shape == (192, 2)


@pytest.mark.parametrize("preset, name", [("conv", "test_resnet"), ("conv-pointwise", "test_efficientnet"),
                                          ("conv-pointwise", "resnetv2_50x1_bit")])
def test_conv_presets(preset, name):
    model, _ = make_model(name)
    head = model.get_classifier()
    convs = {p: m for p, m in model.named_modules() if isinstance(m, nn.Conv2d) and m is not head}
    if preset == "conv-pointwise":
        convs = {p: m for p, m in convs.items() if m.kernel_size == (1, 1)}
    inject_quietly(model, LoraConfig(r=2, targets=[preset]))
    layers = lora_layers(model)
    assert set(layers) == set(convs)
    assert all(isinstance(layer, LoraConv2d) for layer in layers.values())
    assert not isinstance(model.get_classifier(), LoraLayer)
    kernels = {layer.base_layer.kernel_size for layer in layers.values()}
    assert (kernels == {(1, 1)}) == (preset == "conv-pointwise")


def test_exclude_and_rank_alpha_patterns():
    config = LoraConfig(r=4, alpha=8.0, targets=["vit-all"], exclude=[r"blocks\.[0-2]\..*"],
                        rank_pattern={r"blocks\.3\..*": 2, r".*\.fc1": 6}, alpha_pattern={r".*\.proj": 3.0})
    layers = lora_layers(inject_lora(vit(), config))
    assert sorted(layers) == sorted(f"blocks.{i}.{s}" for i in range(3, 6)
                                    for s in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    expected = {  # path: (rank, scale); the first matching rank_pattern wins
        "blocks.3.mlp.fc1": (2, 8.0 / 2), "blocks.3.attn.proj": (2, 3.0 / 2), "blocks.3.mlp.fc2": (2, 8.0 / 2),
        "blocks.4.mlp.fc1": (6, 8.0 / 6), "blocks.4.attn.proj": (4, 3.0 / 4), "blocks.4.attn.qkv": (4, 8.0 / 4),
    }
    for path, (rank, scale) in expected.items():
        layer = layers[path]
        assert layer.rank == rank and layer.scale == pytest.approx(scale), path
        assert all(pair.A.shape[0] == rank and pair.B.shape[-1] == rank for pair in layer.factors())
    assert layers["blocks.4.mlp.fc1"].lora_A.shape == (6, 64)


def test_rslora_scale_in_model():
    layers = lora_layers(inject_lora(vit(), LoraConfig(r=4, alpha=8.0, targets=["attn"], use_rslora=True)))
    assert len(layers) == 12 and all(layer.scale == pytest.approx(8.0 / 4**0.5) for layer in layers.values())


def test_trainable_module_is_trained_fully_and_not_wrapped():
    model, x = make_model("test_vit")
    inject_lora(model, LoraConfig(r=2, targets=["vit-all"], trainable=[r"blocks\.0\.mlp\.fc1", r"blocks\.5"]))
    layers = lora_layers(model)
    assert type(model.blocks[0].mlp.fc1) is nn.Linear
    assert isinstance(model.blocks[1].mlp.fc1, LoraLinear)
    assert not any(path.startswith("blocks.5.") for path in layers)
    assert len(layers) == 4 * 5 - 1
    full = ["blocks.0.mlp.fc1.", "blocks.5.", "head."]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if is_lora_name(n) or n.startswith(tuple(full))}
    before = model.blocks[0].mlp.fc1.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).square().mean().backward()
    optimizer.step()
    assert not torch.equal(model.blocks[0].mlp.fc1.weight, before)


@pytest.mark.parametrize("train_head", [True, False])
def test_head_is_never_wrapped(train_head):
    model = inject_lora(vit(), LoraConfig(targets=[r"head|blocks\.0\.attn\.proj"], train_head=train_head))
    assert list(lora_layers(model)) == ["blocks.0.attn.proj"]
    assert type(model.head) is nn.Linear
    assert all(p.requires_grad == train_head for p in model.head.parameters())
    model, _ = make_model("resnetv2_50x1_bit")  # its head is a 1x1 Conv2d that "conv" would otherwise catch
    inject_quietly(model, LoraConfig(r=2, targets=["conv"]))
    assert type(model.head.fc) is nn.Conv2d and "head.fc" not in lora_layers(model)


@pytest.mark.parametrize("name", ["test_efficientnet", "test_convnext"])
def test_depthwise_convs_too_small_for_rank_one_are_skipped(name):
    model, _ = make_model(name)
    depthwise = {p for p, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels > 1}
    assert depthwise
    with pytest.warns(UserWarning, match="LoRA skips") as record:
        inject_lora(model, LoraConfig(r=2, targets=["conv"]))
    skipped = {m.group(1) for w in record for m in [re.match(r"LoRA skips (\S+):", str(w.message))] if m}
    assert skipped == depthwise
    assert all(type(model.get_submodule(p)) is nn.Conv2d for p in depthwise)
    assert lora_layers(model)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ranks_are_capped_to_layer_size(case):
    model, _ = make_model(case)
    with pytest.warns(UserWarning, match="capped"):
        warnings.filterwarnings("ignore", message="LoRA skips")
        inject_lora(model, config_for(case, r=64))
    layers = lora_layers(model)
    assert layers
    for path, layer in layers.items():
        groups, rows, fan_in = block_shape(layer.base_layer, path)
        assert layer.lora_parameter_count() <= layer.base_weight().numel(), path
        assert layer.rank == largest_rank(rows, fan_in, 64), path


def test_inject_twice_raises():
    model = inject_lora(vit(), LoraConfig(r=2))
    state, layout = state_copy(model), structure(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, LoraConfig(r=2))
    assert_state_equal(state, state_copy(model))
    assert structure(model) == layout


# ----- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target, close", [(r"blocks\.0\.attn\.qkvv", "blocks.0.attn.qkv"),
                                           (r"blocks\.1\.atn\.proj", "blocks.1.attn.proj"),
                                           ("patch_embed.prj", "patch_embed.proj")])
def test_unmatched_target_names_closest_modules(target, close):
    with pytest.raises(ValueError) as info:
        inject_lora(vit(), LoraConfig(targets=[target]))
    message = str(info.value)
    assert "targets" in message and repr(target) in message
    assert close in message.partition("Closest module names:")[2].strip().split(", ")


BAD_FIELDS = [
    ({"r": 0}, "r"),
    ({"r": -3}, "r"),
    ({"alpha": 0}, "alpha"),
    ({"alpha": -1.0}, "alpha"),
    ({"targets": ["vit-everything"]}, "targets"),
    ({"targets": ["<convs>"]}, "targets"),
    ({"targets": []}, "targets"),
    ({"init": "xavier"}, "init"),
]


@pytest.mark.parametrize("kwargs, field_name", BAD_FIELDS, ids=[f"{f}={v}" for (kw, f) in BAD_FIELDS
                                                                 for v in kw.values()])
def test_bad_config_names_the_field(kwargs, field_name):
    with pytest.raises(ValueError, match=rf"LoraConfig\.{field_name}\b"):
        LoraConfig(**kwargs)
    config = LoraConfig()
    for key, value in kwargs.items():
        setattr(config, key, value)  # edited after construction: inject_lora validates again
    model = vit()
    state, layout = state_copy(model), structure(model)
    with pytest.raises(ValueError, match=rf"LoraConfig\.{field_name}\b"):
        inject_lora(model, config)
    assert_state_equal(state, state_copy(model))
    assert structure(model) == layout


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(8, 8))
    model.add_module("conv", Conv2dSame(4, 4, 3, stride=2))
    model.add_module("attn", nn.MultiheadAttention(8, 2))
    return model


@pytest.mark.parametrize("make, config", [
    (vit, LoraConfig(targets=["attn", r"blocks\.0\.atn\.proj"])),
    (vit, LoraConfig(targets=["vit-all"], rank_pattern={r"blocks\.1\..*": 2}, init="pissa", use_dora=True,
                     dropout=0.1)),
    (small_model, LoraConfig(r=2, targets=["fc", "conv"], dropout=0.1)),
    (small_model, LoraConfig(r=2, targets=["fc", "conv", "attn"], init="pissa")),
], ids=["unmatched-target", "dora-with-dropout", "conv2dsame-with-dropout", "pissa-after-mha"])
def test_failed_inject_leaves_model_unchanged(make, config):
    model = make()
    state, layout = state_copy(model), structure(model)
    with pytest.raises(ValueError):
        inject_lora(model, config)
    assert_state_equal(state, state_copy(model))
    assert structure(model) == layout
    assert not lora_layers(model) and not hasattr(model, "_visionlora_state")


# ----- gradient checkpointing ----------------------------------------------------------------------------------
def test_grad_checkpointing_gives_same_lora_grads():
    model, x = make_model("test_vit")
    inject_lora(model, LoraConfig(r=2, targets=["vit-all"], init="small-random"))
    model.train()
    target = torch.tensor([0, 4])

    def lora_grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if is_lora_name(n)}

    plain = lora_grads()
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    checkpointed = lora_grads()
    assert len(plain) == 6 * (3 * 2 + 3 * 2)  # per block: qkv 3 slices x (A, B); proj, fc1, fc2 (A, B)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-7, rtol=1e-5)
