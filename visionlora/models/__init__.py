"""Building backbones and detectors from timm, with local weights for machines without the hub."""

from .backbone import create_backbone, save_backbone
from .detection import apply_detector_lora, create_detector, freeze_for_method, unload_detector_lora

__all__ = ["apply_detector_lora", "create_backbone", "create_detector", "freeze_for_method", "save_backbone",
           "unload_detector_lora"]
