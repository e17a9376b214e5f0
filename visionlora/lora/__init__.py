"""The LoRA engine: config, layers, injection, merge and adapter I/O. Depends on torch and safetensors only."""

from .adapter import load_adapter, save_adapter
from .config import PRESETS, LoraConfig
from .conv import LoraConv2d
from .inject import inject_lora, lora_layers, lora_state
from .layer import LoraLayer
from .linear import LoraFusedQKV, LoraLinear
from .merge import merge_lora, unload_lora, unmerge_lora
from .mha import LoraMultiheadAttention
from .rank import RankReport, rank_report, rank_report_from_adapter
from .summary import LoraSummary, lora_summary

__all__ = [
    "PRESETS",
    "LoraConfig",
    "LoraConv2d",
    "LoraFusedQKV",
    "LoraLayer",
    "LoraLinear",
    "LoraMultiheadAttention",
    "LoraSummary",
    "RankReport",
    "inject_lora",
    "load_adapter",
    "lora_summary",
    "lora_layers",
    "lora_state",
    "merge_lora",
    "rank_report",
    "rank_report_from_adapter",
    "save_adapter",
    "unload_lora",
    "unmerge_lora",
]
