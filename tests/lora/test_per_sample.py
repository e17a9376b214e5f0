"""The batched per-sample branches of mixed-task batches (visionlora.lora.per_sample) equal each adapter run alone,
for every conv geometry they take (strided, dilated, grouped, depthwise, 'same' padding, 1x1), for Linear and fused
qkv, in values and gradients, and are what the layers really run (no per-task loop)."""

from __future__ import annotations

import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from named_models import randomize
from torch import nn

from visionlora import LoraConfig, adapter_batch, add_adapter, set_adapter
from visionlora.lora import LoraConv2d, LoraFusedQKV, LoraLinear, lora_layers
from visionlora.lora.per_sample import stacked_factors

NAMES = ["b", "default", "c", "b", "c", "c", "default"]
CONVS = {
    "3x3": dict(in_channels=6, out_channels=8, kernel_size=3, padding=1),
    "strided 5x5": dict(in_channels=6, out_channels=8, kernel_size=5, stride=2, padding=2),
    "dilated": dict(in_channels=6, out_channels=8, kernel_size=3, padding=2, dilation=2),
    "grouped": dict(in_channels=6, out_channels=9, kernel_size=3, padding=1, groups=3),
    # 1x9 blocks take no LoRA (the engine skips plain depthwise convs); with a channel multiplier of 2 they do
    "depthwise x2": dict(in_channels=6, out_channels=12, kernel_size=3, padding=1, groups=6),
    "same padding": dict(in_channels=6, out_channels=8, kernel_size=(3, 2), padding="same"),
    "1x1": dict(in_channels=6, out_channels=8, kernel_size=1),
    "1x1 strided": dict(in_channels=6, out_channels=8, kernel_size=1, stride=2),
}


class Stack(nn.Module):
    """One layer under test (named ``qkv`` for the fused-qkv cases) and a linear head."""

    def __init__(self, layer: nn.Module, features: int, name: str = "layer"):
        super().__init__()
        self.name = name
        setattr(self, name, layer)
        self.head = nn.Linear(features, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = getattr(self, self.name)(x)
        return self.head(out.flatten(2).mean(2) if out.dim() == 4 else out.mean(1))

    def get_classifier(self) -> nn.Module:
        return self.head


def adapted(layer: nn.Module, features: int, target: str = "layer", form: str = "activation") -> nn.Module:
    """Three adapters of ranks 2, 3 and 1 (zero-padded to 3 in the batched branch), their own heads of 4, 3, 5."""
    torch.manual_seed(0)
    model = Stack(layer, features, target.partition("@")[0])
    warnings.simplefilter("ignore")  # ranks capped to small grouped blocks
    for name, rank, classes in (("default", 2, None), ("b", 3, 3), ("c", 1, 5)):
        add_adapter(model, name, LoraConfig(r=rank, alpha=2 * rank, targets=[target], form=form),
                    num_classes=classes)
    set_adapter(model, "default")
    return randomize(model)


def alone(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    rows = {}
    for name in dict.fromkeys(NAMES):
        set_adapter(model, name)
        rows[name] = model(x)
    set_adapter(model, "default")
    return [rows[name][i] for i, name in enumerate(NAMES)]


def mixed(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with adapter_batch(model, NAMES) as batch:
        return batch.split(model(x))


def no_per_task_loop(monkeypatch) -> None:
    """Fail if a layer falls back to running each adapter's branch on its own rows."""
    for kind in (LoraConv2d, LoraLinear, LoraFusedQKV):
        monkeypatch.setattr(kind, "activation_delta", lambda *a, **k: pytest.fail("per-task loop used"))


# Weight-form slots take the batched branch too: the same ΔW applied to the activations, not one conv per task.
@pytest.mark.parametrize("form", ["activation", "weight"])
@pytest.mark.parametrize("case", list(CONVS))
def test_conv_batched_branch_equals_each_adapter_alone(case, form, monkeypatch):
    model = adapted(nn.Conv2d(**CONVS[case]), CONVS[case]["out_channels"], form=form)
    x = torch.randn(len(NAMES), 6, 11, 10)
    with torch.no_grad():
        expected = alone(model, x)
        no_per_task_loop(monkeypatch)
        monkeypatch.setattr(LoraConv2d, "adapted_weight", lambda *a, **k: pytest.fail("a conv per task"))
        got = mixed(model, x)
    assert [row.shape[0] for row in got] == [3, 4, 5, 3, 5, 5, 4]
    for row, want in zip(got, expected, strict=True):
        torch.testing.assert_close(row, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "qkv@qv", "qkv@qkv"])
def test_linear_and_fused_qkv_batched_branch_values_and_gradients(kind, monkeypatch):
    target = "layer" if kind == "linear" else kind
    model = adapted(nn.Linear(8, 12), 12, target)
    assert type(lora_layers(model)[target.partition("@")[0]]) is (LoraLinear if kind == "linear" else LoraFusedQKV)
    x = torch.randn(len(NAMES), 5, 8, requires_grad=True)
    expected = alone(model, x)
    want = torch.autograd.grad(sum(row.square().sum() for row in expected), [x, *trainable(model)])
    no_per_task_loop(monkeypatch)
    got = mixed(model, x)
    for row, value in zip(got, expected, strict=True):
        torch.testing.assert_close(row, value, rtol=0, atol=1e-5)
    grads = torch.autograd.grad(sum(row.square().sum() for row in got), [x, *trainable(model)])
    for grad, reference in zip(grads, want, strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-6)


def trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def test_conv_gradients_reach_each_adapter_from_its_own_samples():
    model = adapted(nn.Conv2d(**CONVS["grouped"]), 9)
    x = torch.randn(len(NAMES), 6, 9, 9)
    want = torch.autograd.grad(sum(row.sum() for row in alone(model, x)), trainable(model))
    got = torch.autograd.grad(sum(row.sum() for row in mixed(model, x)), trainable(model))
    for grad, reference in zip(got, want, strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-6)
    assert all(grad.abs().sum() > 0 for grad in got)


def test_bf16_autocast_stays_close_to_fp32():
    model = adapted(nn.Conv2d(**CONVS["3x3"]), 8)
    x = torch.randn(len(NAMES), 6, 11, 10)
    with torch.no_grad():
        reference = mixed(model, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = mixed(model, x)
    for row, want in zip(low, reference, strict=True):
        assert row.dtype == torch.bfloat16
        torch.testing.assert_close(row.float(), want, rtol=0.05, atol=0.05)


def test_channels_last_and_reflect_padding_fall_back_to_the_per_task_loop():
    for conv, layout in ((nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"), torch.contiguous_format),
                         (nn.Conv2d(6, 8, 3, padding=1), torch.channels_last)):
        model = adapted(conv, 8).to(memory_format=layout)
        x = torch.randn(len(NAMES), 6, 11, 10).contiguous(memory_format=layout)
        with torch.no_grad():
            for row, want in zip(mixed(model, x), alone(model, x), strict=True):
                torch.testing.assert_close(row, want, rtol=0, atol=1e-5)


STEM = dict(in_channels=3, out_channels=8, kernel_size=7, stride=2, padding=3)


def down_projection_route(monkeypatch) -> list[str]:
    """Record how each per-sample branch projects down: 'grouped' (a group per sample), 'dense' (one plain conv)."""
    import visionlora.lora.per_sample as per_sample

    routes, conv2d = [], per_sample.F.conv2d

    def recording(x, weight, bias, stride, padding, dilation, groups=1):
        routes.append("grouped" if groups > 1 else "dense")
        return conv2d(x, weight, bias, stride, padding, dilation, groups)

    # per_sample's own name F only: the base layer's conv (torch.nn.functional.conv2d) is not recorded.
    monkeypatch.setattr(per_sample, "F", SimpleNamespace(conv2d=recording))
    return routes


@pytest.mark.parametrize("case, channels, samples, route", [
    ("1x1 strided", 6, 7, []),  # a matmul on every second position: no conv at all
    ("3x3", 6, 7, ["grouped"]),
    ("stem", 3, 14, ["dense"]),  # 3 input channels, 3 distinct A's against 14 samples
    ("stem", 3, 7, ["grouped"]),  # 3 distinct A's are too many for 7 samples
])
def test_each_conv_geometry_takes_its_down_projection_and_equals_each_adapter_alone(case, channels, samples, route,
                                                                                     monkeypatch):
    model = adapted(nn.Conv2d(**(STEM if case == "stem" else CONVS[case])), 8)
    names = (NAMES * 2)[:samples]
    monkeypatch.setattr(sys.modules[__name__], "NAMES", names)
    x = torch.randn(samples, channels, 12, 11)
    with torch.no_grad():
        expected = alone(model, x)
        no_per_task_loop(monkeypatch)
        routes = down_projection_route(monkeypatch)
        got = mixed(model, x)
    assert routes == route
    for row, want in zip(got, expected, strict=True):
        torch.testing.assert_close(row, want, rtol=0, atol=1e-5)


# One shared A is few against 7 samples: the stem projects all of them with one plain conv.
@pytest.mark.parametrize("conv, route", [(STEM, ["dense"]), (CONVS["3x3"], ["grouped"]), (CONVS["1x1 strided"], [])],
                         ids=["stem", "3x3", "1x1 strided"])
def test_lora_fa_tasks_stack_their_shared_A_once(conv, route, monkeypatch):
    torch.manual_seed(0)
    model = Stack(nn.Conv2d(**conv), 8)
    for name, classes in (("default", None), ("b", 3), ("c", 5)):
        add_adapter(model, name, LoraConfig(r=2, targets=["layer"], form="activation", freeze_A=True),
                    num_classes=classes)
    set_adapter(model, "default")
    randomize(model)
    layer = lora_layers(model)["layer"]
    pairs = [(slot.lora_A, slot.lora_B, slot.scale) for slot in (layer.slot(name) for name in ("default", "b", "c"))]
    stacked_a, stacked_b, a_row = stacked_factors(pairs)
    assert stacked_a.shape[0] == 1 and a_row.tolist() == [0, 0, 0] and stacked_b.shape[0] == 3
    x = torch.randn(len(NAMES), conv["in_channels"], 12, 11)
    with torch.no_grad():
        expected = alone(model, x)
        routes = down_projection_route(monkeypatch)
        got = mixed(model, x)
    assert routes == route
    for row, want in zip(got, expected, strict=True):
        torch.testing.assert_close(row, want, rtol=0, atol=1e-5)


def test_a_batch_of_one_weight_form_adapter_runs_one_conv_with_its_weight(monkeypatch):
    model = adapted(nn.Conv2d(**CONVS["3x3"]), 8, form="weight")
    x = torch.randn(3, 6, 11, 10)
    with torch.no_grad():
        set_adapter(model, "b")
        expected = model(x)
        set_adapter(model, "default")
        monkeypatch.setattr(LoraConv2d, "add_per_sample_deltas_", lambda *a, **k: pytest.fail("gathered factors"))
        batches, original = [], LoraConv2d.forward_with_weight
        monkeypatch.setattr(LoraConv2d, "forward_with_weight",
                            lambda self, rows, weight: batches.append(rows.data_ptr()) or original(self, rows, weight))
        with adapter_batch(model, ["b"] * 3):
            got = model(x)
    assert batches == [x.data_ptr()]  # the whole batch itself, not a copy of each group's rows
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
