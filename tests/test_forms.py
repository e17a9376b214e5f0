"""form='auto' on convs: both forms are timed once, on the first training step, and the outputs do not change."""

import torch
from torch import nn

from visionlora import LoraConfig, inject_lora


def _model(form: str) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Linear(6, 6))
    inject_lora(model, LoraConfig(r=2, targets=[r"\d"], init="small-random", form=form))
    return model


def test_auto_measures_conv_forms_once_on_the_first_training_step(monkeypatch):
    model = _model("auto")
    convs, linear = [model[0], model[2]], model[3]
    assert all(layer.form_pending for layer in convs) and not linear.form_pending
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
    assert len(calls) == 2 and not any(layer.form_pending for layer in convs)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-6)


def test_forced_forms_are_never_measured():
    for form, expected in (("weight", True), ("activation", False)):
        model = _model(form)
        assert not model[0].form_pending and model[0].weight_form is expected
