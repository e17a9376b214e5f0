"""The worked examples of the LoRA maths: ΔW = scale·B·A, its textbook transpose, and parameter counts."""

import torch
from torch import nn

from visionlora import LoraConfig, inject_lora, lora_summary, merge_lora

W = torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])
TEXTBOOK_A = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8]])  # m×r
TEXTBOOK_B = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])  # r×n
EXPECTED_DELTA = torch.tensor(
    [[0.11, 0.14, 0.17, 0.20], [0.23, 0.30, 0.37, 0.44], [0.35, 0.46, 0.57, 0.68], [0.47, 0.62, 0.77, 0.92]]
)
EXPECTED_ADAPTED = torch.tensor(
    [[1.11, 2.14, 3.17, 4.20], [5.23, 6.30, 7.37, 8.44], [9.35, 10.46, 11.57, 12.68], [13.47, 14.62, 15.77, 16.92]]
)


def _adapted_linear() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(W)
    inject_lora(model, LoraConfig(r=2, alpha=2, targets=["0"]))  # alpha = r: scale 1
    layer = model[0]
    with torch.no_grad():
        # Our B (out×r) is the textbook A; our A (r×in) is the textbook B.
        layer.lora_B.copy_(TEXTBOOK_A)
        layer.lora_A.copy_(TEXTBOOK_B)
    return model


def test_worked_example_delta_and_adapted_weight():
    model = _adapted_linear()
    layer = model[0]
    assert layer.scale == 1.0
    torch.testing.assert_close(layer.delta_weight(), EXPECTED_DELTA, rtol=0, atol=1e-6)
    torch.testing.assert_close(TEXTBOOK_A @ TEXTBOOK_B, EXPECTED_DELTA, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.adapted_weight(), EXPECTED_ADAPTED, rtol=0, atol=1e-5)


def test_worked_example_forward_and_merge_agree():
    model = _adapted_linear()
    x = torch.eye(4)
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        merged = model(x)
    # Feeding the identity returns Wᵀ: the adapted weight, read column-wise.
    torch.testing.assert_close(unmerged, EXPECTED_ADAPTED.T, rtol=0, atol=1e-5)
    torch.testing.assert_close(model[0].base_layer.weight, EXPECTED_ADAPTED, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-6)


def test_rslora_scale():
    model = nn.Sequential(nn.Linear(16, 16))
    inject_lora(model, LoraConfig(r=4, alpha=8, use_rslora=True, targets=["0"]))
    assert model[0].scale == 8 / 2


def test_thousand_by_thousand_rank_ten_counts():
    model = nn.Sequential(nn.Linear(1000, 1000, bias=False))
    inject_lora(model, LoraConfig(r=10, alpha=10, targets=["0"]))
    summary = lora_summary(model)
    assert summary.lora_params == 20_000
    assert summary.adapted_base_params == 1_000_000
    assert summary.reduction == 50.0
    assert summary.rows[0].lora_params == 20_000 and summary.rows[0].reduction == 50.0
    assert summary.trainable_params == 20_000
    text = str(summary)
    assert "20,000" in text and "1,000,000" in text and "50.0x" in text
