"""The files of an adapter folder in Hugging Face PEFT's LoRA layout, read without unpickling anything.

``adapter_config.json`` (PEFT's ``LoraConfig`` as JSON) and ``adapter_model.safetensors`` (tensors named
``base_model.model.<module path>.lora_A.weight`` and so on). Shared by adapter loading (``adapter.py``) and the
rank report (``rank.py``), which reads adapters without a model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# PEFT's PeftModel wraps the base model twice (PeftModel.base_model is a LoraModel whose .model is the user's).
PREFIX = "base_model.model."
FORMAT_VERSION = 1


def read_adapter_config(file: Path) -> dict:
    """``adapter_config.json`` as a dict; FileNotFoundError or ValueError naming the file."""
    if not file.is_file():
        raise FileNotFoundError(f"adapter config not found: {file}")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None


def read_adapter_weights(file: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The tensors and metadata of ``adapter_model.safetensors``; FileNotFoundError or ValueError naming the file."""
    if not file.is_file():
        raise FileNotFoundError(f"adapter weights not found: {file}")
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{file}: not a readable safetensors file ({err})") from None


def pattern_value(patterns: dict, path: str, default):
    """PEFT's rule for ``rank_pattern``/``alpha_pattern``: a key applies when it matches a dotted suffix of the path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default
