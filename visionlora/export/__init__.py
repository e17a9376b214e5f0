"""Merged export: LoRA folded into the weights, written as a plain timm folder and verified (see ``merged``)."""

from .merged import DTYPES, TOLERANCES, ExportReport, VerificationError, compare_outputs, export_merged, merged_copy
from .sources import ExportError, ExportSource, source_from_adapter, source_from_path

__all__ = [
    "DTYPES",
    "TOLERANCES",
    "ExportError",
    "ExportReport",
    "ExportSource",
    "VerificationError",
    "compare_outputs",
    "export_merged",
    "merged_copy",
    "source_from_adapter",
    "source_from_path",
]
