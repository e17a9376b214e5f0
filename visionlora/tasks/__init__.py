"""LightningModules: losses, metrics and optimiser groups for each task."""

from .classification import LoraClassifier

__all__ = ["LoraClassifier"]
