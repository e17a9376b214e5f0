"""Shared helpers for the LoRA tests: tiny timm models with seeded weights and inputs, and comparison helpers."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

NUM_CLASSES = 5
TOOLS = Path(__file__).resolve().parents[1] / "tools"

# The test tensors are tiny: a second intra-op thread buys nothing, and when the CPUs are shared (CI, other jobs)
# OpenMP threads spinning against each other made this suite 5-10x slower. One thread keeps it fast and steady.
torch.set_num_threads(1)


@dataclass(frozen=True)
class ModelCase:
    """A timm model to build (``pretrained=False``) and the smallest input that runs it quickly."""

    name: str
    kwargs: dict = field(default_factory=dict)
    size: int = 64

    @property
    def id(self) -> str:
        extra = "-".join(f"{k}{v}" for k, v in self.kwargs.items())
        return f"{self.name}-{extra}" if extra else self.name


# One entry per family the engine must handle; ``size`` keeps every forward pass in the milliseconds.
MODEL_CASES: dict[str, ModelCase] = {
    case.id: case
    for case in [
        ModelCase("test_vit", size=32),  # fused qkv Linear, dynamic image size
        ModelCase("test_resnet"),  # BatchNorm, 1x1 and 3x3 convs
        ModelCase("test_convnext"),  # depthwise 7x7, LayerNorm, Linear MLPs
        ModelCase("test_efficientnet"),  # depthwise 3x3, SE convs, BatchNormAct2d
        ModelCase("resnetv2_50x1_bit"),  # StdConv2d (weight standardisation), conv head
        ModelCase("tf_efficientnet_b0"),  # Conv2dSame (TF "same" padding)
        ModelCase("resnext26ts"),  # grouped 3x3 convs
        ModelCase("resnet18", {"output_stride": 8}),  # dilated convs (dilation 2 and 4)
    ]
}


def create_model(case: ModelCase | str, seed: int = 0) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=5)`` with seeded weights, in eval mode."""
    case = MODEL_CASES[case] if isinstance(case, str) else case
    torch.manual_seed(seed)
    return timm.create_model(case.name, pretrained=False, num_classes=NUM_CLASSES, **case.kwargs).eval()


def make_input(case: ModelCase | str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    case = MODEL_CASES[case] if isinstance(case, str) else case
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, case.size, case.size, generator=generator)


def make_model(case: ModelCase | str, batch: int = 2) -> tuple[nn.Module, torch.Tensor]:
    """A seeded model in eval mode and a seeded input of the case's small size."""
    return create_model(case), make_input(case, batch)


def state_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of ``module.state_dict()`` (tensors cloned)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_state_equal(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    """Same keys and bit-identical tensors."""
    assert list(before) == list(after)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"tensors changed: {changed[:5]}"


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the scale of ``a`` (its max abs value)."""
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


def randomize_lora(model: nn.Module, std: float = 0.05, seed: int = 3) -> None:
    """Give every ``lora_*`` parameter (A, B, DoRA magnitude offsets) non-zero seeded values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rpartition(".")[2].startswith("lora_"):
                noise = torch.randn(param.shape, generator=generator) * std
                if "magnitude" in name:
                    param.mul_(1 + noise)
                else:
                    param.copy_(noise)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def load_tool(name: str):
    """``tools/<name>.py`` as a module (the tools are scripts, not a package), so tests call its ``main``."""
    spec = importlib.util.spec_from_file_location(f"{name}_tool", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
