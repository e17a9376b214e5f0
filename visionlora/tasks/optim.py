"""The optimiser and learning-rate schedule every task trains with: AdamW groups and linear warmup + cosine decay.

Groups: LoRA's A and B factors (B separately, at ``loraplus_lr_ratio`` times the rate: LoRA+, Hayou et al. 2024,
arXiv:2402.12354), fully trained modules (the head), and backbone weights (full fine-tuning). The schedule is
warmup then cosine (Loshchilov & Hutter 2017, "SGDR", arXiv:1608.03983), stepped once per optimiser step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

GROUPS = ("lora_A", "lora_B", "head", "backbone")


def lora_factor_group(parameter_name: str) -> str | None:
    """``lora_A`` or ``lora_B`` for a LoRA parameter (DoRA's magnitude rides with A), else None."""
    leaf = parameter_name.rpartition(".")[2]
    if not leaf.startswith("lora_"):
        return None
    return "lora_B" if "_B" in leaf else "lora_A"


def adamw_groups(named: Iterable[tuple[str, str, nn.Parameter]], hparams) -> list[dict]:
    """AdamW parameter groups from ``(name, group, parameter)`` triples, with each group's rate and decay.

    ``hparams`` has ``lr`` (LoRA's rate), ``head_lr`` and ``backbone_lr`` (None: ``lr``), ``loraplus_lr_ratio``
    (None: 1) and ``lora_weight_decay``, ``head_weight_decay``, ``backbone_weight_decay``. Empty groups are left out.
    """
    buckets: dict[str, list[nn.Parameter]] = {name: [] for name in GROUPS}
    for _, group, param in named:
        buckets[group].append(param)
    h = hparams
    settings = {
        "lora_A": (h.lr, h.lora_weight_decay),
        "lora_B": (h.lr * (h.loraplus_lr_ratio or 1.0), h.lora_weight_decay),
        "head": (h.head_lr if h.head_lr is not None else h.lr, h.head_weight_decay),
        "backbone": (h.backbone_lr if h.backbone_lr is not None else h.lr, h.backbone_weight_decay),
    }
    return [{"params": params, "lr": settings[name][0], "weight_decay": settings[name][1], "name": name}
            for name, params in buckets.items() if params]


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def adamw_warmup_cosine(groups: list[dict], total_steps: int, warmup_fraction: float
                        ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``groups`` and its warmup-cosine schedule over ``total_steps`` optimiser steps."""
    optimizer = torch.optim.AdamW(groups)
    total = max(1, int(total_steps))
    warmup = int(warmup_fraction * total)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
    return optimizer, schedule


def lightning_optimizers(groups: list[dict], total_steps: int, warmup_fraction: float) -> dict:
    """What a LightningModule's ``configure_optimizers`` returns: the optimiser and its per-step schedule."""
    optimizer, schedule = adamw_warmup_cosine(groups, total_steps, warmup_fraction)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
