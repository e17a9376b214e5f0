"""visionlora: Low-Rank Adaptation (LoRA) for timm vision backbones.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
"""

from .lora import (
    LoraConfig,
    inject_lora,
    load_adapter,
    lora_layers,
    lora_summary,
    merge_lora,
    save_adapter,
    unload_lora,
    unmerge_lora,
)

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "inject_lora",
    "load_adapter",
    "lora_layers",
    "lora_summary",
    "merge_lora",
    "save_adapter",
    "unload_lora",
    "unmerge_lora",
]
