"""visionlora: Low-Rank Adaptation (LoRA) for timm vision backbones.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
"""

from .lora import (
    LoraConfig,
    RankReport,
    adapter_batch,
    add_adapter,
    delete_adapter,
    inject_lora,
    list_adapters,
    load_adapter,
    lora_layers,
    lora_summary,
    merge_lora,
    rank_report,
    rank_report_from_adapter,
    save_adapter,
    set_adapter,
    unload_lora,
    unmerge_lora,
)

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "RankReport",
    "adapter_batch",
    "add_adapter",
    "delete_adapter",
    "inject_lora",
    "list_adapters",
    "load_adapter",
    "lora_layers",
    "lora_summary",
    "merge_lora",
    "rank_report",
    "rank_report_from_adapter",
    "save_adapter",
    "set_adapter",
    "unload_lora",
    "unmerge_lora",
]
