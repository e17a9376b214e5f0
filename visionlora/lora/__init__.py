"""The LoRA engine: config, layers, injection, merge, adapter I/O and named adapters (several tasks on one
backbone, mixed-task batches). Depends on torch and safetensors only."""

from .adapter import load_adapter, save_adapter
from .adapters import (
    AdapterInfo,
    active_adapter,
    adapter_info,
    add_adapter,
    delete_adapter,
    list_adapters,
    set_adapter,
)
from .batch import AdapterBatch, adapter_batch
from .config import PRESETS, LoraConfig
from .conv import LoraConv2d
from .inject import inject_lora, lora_layers, lora_state
from .layer import DEFAULT_ADAPTER, LoraLayer
from .linear import LoraFusedQKV, LoraLinear
from .merge import merge_lora, unload_lora, unmerge_lora
from .mha import LoraMultiheadAttention
from .rank import RankReport, rank_report, rank_report_from_adapter
from .summary import LoraSummary, lora_summary

__all__ = [
    "DEFAULT_ADAPTER",
    "PRESETS",
    "AdapterBatch",
    "AdapterInfo",
    "LoraConfig",
    "LoraConv2d",
    "LoraFusedQKV",
    "LoraLayer",
    "LoraLinear",
    "LoraMultiheadAttention",
    "LoraSummary",
    "RankReport",
    "active_adapter",
    "adapter_batch",
    "adapter_info",
    "add_adapter",
    "delete_adapter",
    "inject_lora",
    "list_adapters",
    "load_adapter",
    "lora_summary",
    "lora_layers",
    "lora_state",
    "merge_lora",
    "rank_report",
    "rank_report_from_adapter",
    "save_adapter",
    "set_adapter",
    "unload_lora",
    "unmerge_lora",
]
