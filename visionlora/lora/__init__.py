"""The LoRA engine: config, layers, injection, merge and adapter I/O. Depends on torch and safetensors only."""

from .config import PRESETS, LoraConfig
from .conv import LoraConv2d
from .inject import inject_lora, lora_layers, lora_state
from .layer import LoraLayer
from .linear import LoraFusedQKV, LoraLinear
from .merge import merge_lora, unload_lora, unmerge_lora
from .mha import LoraMultiheadAttention

__all__ = [
    "PRESETS",
    "LoraConfig",
    "LoraConv2d",
    "LoraFusedQKV",
    "LoraLayer",
    "LoraLinear",
    "LoraMultiheadAttention",
    "inject_lora",
    "lora_layers",
    "lora_state",
    "merge_lora",
    "unload_lora",
    "unmerge_lora",
]
