"""form='auto': the forms a layer has are timed once, on the first training step, and the outputs do not change."""

import torch
from torch import nn

from visionlora import LoraConfig, inject_lora


def _model(form: str) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Linear(6, 6))
    inject_lora(model, LoraConfig(r=2, targets=[r"\d"], init="small-random", form=form))
    return model


def test_auto_measures_forms_once_on_the_first_training_step(monkeypatch):
    model = _model("auto")
    convs, linear = [model[0], model[2]], model[3]
    # The Linear is measured too since it has a fused form (visionlora/lora/fused.py) besides the other two.
    assert all(layer.form_pending for layer in [*convs, linear])
    calls = []
    import visionlora.lora.layer as layer_module

    original = layer_module.measure_faster_form
    monkeypatch.setattr(layer_module, "measure_faster_form", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(2, 4, 6, 6)
    model.eval()
    with torch.no_grad():
        reference = model(x)
    assert calls == [] and all(layer.weight_form for layer in convs)  # eval: weight form, nothing measured
    model.train()
    model(x).sum().backward()
    model(x).sum().backward()
    assert len(calls) == 3 and not any(layer.form_pending for layer in [*convs, linear])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-6)


def test_forced_forms_are_never_measured():
    for form, expected in (("weight", True), ("activation", False)):
        model = _model(form)
        assert not model[0].form_pending and model[0].weight_form is expected


def _two_linears(form: str) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    inject_lora(model, LoraConfig(r=4, targets=[r"\d"], init="small-random", form=form))
    return model


def test_in_place_activation_form_matches_the_weight_form_in_outputs_and_gradients():
    """The activation form adds x·Aᵀ·Bᵀ into the base output in place; values and gradients match op(x, W + ΔW)."""
    x = torch.randn(3, 5, 16)
    results = []
    for form in ("activation", "weight"):
        model = _two_linears(form)
        inputs = x.clone().requires_grad_()
        out = model(inputs)
        (out * torch.linspace(-1, 1, 8)).sum().backward()
        grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
        results.append((out.detach(), inputs.grad, grads))
    (out_a, gx_a, grads_a), (out_w, gx_w, grads_w) = results
    torch.testing.assert_close(out_a, out_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_a, gx_w, rtol=1e-5, atol=1e-6)
    assert len(grads_a) == 4 and all(g.abs().sum() > 0 for g in grads_a)
    for got, want in zip(grads_a, grads_w, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_in_place_activation_form_under_bf16_autocast_and_on_strided_inputs():
    model = _two_linears("activation")
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with torch.no_grad():
        reference = model(x.detach().float())
    torch.testing.assert_close(out.float(), reference, rtol=5e-2, atol=5e-2)
    strided = torch.randn(16, 6).t()  # a transposed (non-contiguous) input
    with torch.no_grad():
        torch.testing.assert_close(model(strided), model(strided.contiguous()), rtol=1e-5, atol=1e-6)
