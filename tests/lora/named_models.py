"""Tiny models holding several named adapters, for the tests in tests/lora (seeded, non-zero factors and heads)."""

from __future__ import annotations

import warnings

import timm
import torch
from torch import nn

from visionlora import LoraConfig, add_adapter

SIZES = {"test_vit": 32, "test_vit2": 32, "test_vit3": 32, "test_resnet": 48, "test_convnext": 48}


class TinyAttention(nn.Module):
    """One ``nn.MultiheadAttention`` (sequence-first, as open_clip's older towers) and a Linear head."""

    def __init__(self, num_classes: int = 4, batch_first: bool = False):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=batch_first)
        self.head = nn.Linear(16, num_classes)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, length, 6)
        tokens = self.embed(x) if self.batch_first else self.embed(x).transpose(0, 1)
        padding = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
        padding[::2, -1] = True  # every other sample ignores its last token: the mask must follow the samples
        out, _ = self.attn(tokens, tokens, tokens, key_padding_mask=padding)
        return self.head(out.mean(1 if self.batch_first else 0))

    def get_classifier(self) -> nn.Module:
        return self.head


def base_model(name: str, num_classes: int = 5, seed: int = 0) -> nn.Module:
    """A seeded timm model (``pretrained=False``) or TinyAttention, in eval mode; the backbone does not depend on
    ``num_classes`` (a head of another size is made by ``reset_classifier``)."""
    torch.manual_seed(seed)
    if name == "tiny_mha":
        return TinyAttention(num_classes).eval()
    model = timm.create_model(name, pretrained=False, num_classes=5).eval()
    if num_classes != 5:
        model.reset_classifier(num_classes)
    return model


def model_input(name: str, batch: int = 5, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if name == "tiny_mha":
        return torch.randn(batch, 7, 6, generator=generator)
    size = SIZES[name]
    return torch.randn(batch, 3, size, size, generator=generator)


def randomize(model: nn.Module, seed: int = 3) -> nn.Module:
    """Non-zero LoRA factors (DoRA magnitudes scaled) and perturbed heads, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator) * 0.05
            if "magnitude" in name:
                param.mul_(1 + noise)
            elif name.rpartition(".")[2].startswith("lora_"):
                param.copy_(noise)
            else:
                param.add_(noise)
    return model


def with_adapters(name: str | nn.Module, adapters: dict[str, tuple], seed: int = 0) -> nn.Module:
    """A base model (or ``name`` itself when a model) with ``{adapter: (LoraConfig kwargs, num_classes[, label
    names])}`` added in order, randomised."""
    model = base_model(name, seed=seed) if isinstance(name, str) else name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # depthwise convs skipped, ranks capped
        for adapter, (config, classes, *labels) in adapters.items():
            add_adapter(model, adapter, LoraConfig(**{"r": 2, "alpha": 4, **config}), num_classes=classes,
                        label_names=labels[0] if labels else None)
    return randomize(model)


def parameter_storage(model: nn.Module) -> dict[int, int]:
    """Every parameter and buffer object of the model, as the address of its storage."""
    tensors = [*model.parameters(), *model.buffers()]
    return {id(t): t.data_ptr() for t in tensors}


def module_ids(model: nn.Module) -> set[int]:
    return {id(m) for m in model.modules()}
