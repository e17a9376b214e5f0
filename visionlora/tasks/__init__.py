"""LightningModules: losses, metrics and optimiser groups for each task."""

from .classification import LoraClassifier
from .detection import LoraDetector, detector_from_hparams

__all__ = ["LoraClassifier", "LoraDetector", "detector_from_hparams"]
