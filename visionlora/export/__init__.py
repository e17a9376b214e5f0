"""Merged export: LoRA folded into the weights, written as a plain timm folder (classifiers, see ``merged``) or a
``create_detector`` folder (detectors, see ``detection``), verified at every export."""

from .detection import (
    DetectorExportReport,
    DetectorSource,
    compare_raw_outputs,
    detector_source_from_path,
    export_merged_detector,
    is_detection_checkpoint,
)
from .merged import (
    DTYPES,
    TOLERANCES,
    ExportReport,
    VerificationError,
    compare_outputs,
    export_merged,
    merged_copy,
    staged_export,
)
from .sources import ExportError, ExportSource, source_from_adapter, source_from_path

__all__ = [
    "DTYPES",
    "TOLERANCES",
    "DetectorExportReport",
    "DetectorSource",
    "ExportError",
    "ExportReport",
    "ExportSource",
    "VerificationError",
    "compare_outputs",
    "compare_raw_outputs",
    "detector_source_from_path",
    "export_merged",
    "export_merged_detector",
    "is_detection_checkpoint",
    "merged_copy",
    "source_from_adapter",
    "source_from_path",
    "staged_export",
]
