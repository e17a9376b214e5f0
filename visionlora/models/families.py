"""The LoRA targets a timm backbone gets when a config names none, chosen by its family.

Attention backbones (ViT, DeiT, Swin, EVA, ...: blocks with an ``attn.qkv`` projection, or separate ``q_proj`` /
``k_proj`` / ``v_proj``) get the ``attn`` preset, where Hu et al. 2021 (arXiv:2106.09685) put LoRA; ConvNets get
``conv`` (every Conv2d), since ``attn`` matches nothing there. LoraClassifier and LoraDetector both use this, and
the command line uses it for a ``lora:`` section that leaves ``targets`` out.
"""

from __future__ import annotations

import re

import timm
import torch
from torch import nn

# A projection the ``attn`` preset adapts; an ``attn`` slot of another kind (a ConvNet's SE/ECA module or an
# nn.Identity, as in timm's ByobNet) does not make a backbone an attention one.
ATTENTION_PROJECTION = re.compile(r"(.*\.)?attn\.(qkv|q_proj|k_proj|v_proj|in_proj)")
ATTENTION_MODULE = re.compile(r"(.*\.)?attn")

__all__ = ["architecture_lora_targets", "default_lora_targets", "has_attention"]


def has_attention(model: nn.Module) -> bool:
    """Whether ``model`` has attention blocks the ``attn`` preset adapts (qkv projections or an MHA ``attn``)."""
    return any(ATTENTION_PROJECTION.fullmatch(path)
               or (isinstance(module, nn.MultiheadAttention) and ATTENTION_MODULE.fullmatch(path))
               for path, module in model.named_modules())


def default_lora_targets(model: nn.Module) -> list[str]:
    """``["attn"]`` for an attention backbone, else ``["conv"]``."""
    return ["attn"] if has_attention(model) else ["conv"]


def architecture_lora_targets(architecture: str, model_args: dict | None = None) -> list[str]:
    """:func:`default_lora_targets` of a timm architecture, built on the meta device (no weights, no memory)."""
    with torch.device("meta"):
        model = timm.create_model(architecture, pretrained=False, **(model_args or {}))
    return default_lora_targets(model)
