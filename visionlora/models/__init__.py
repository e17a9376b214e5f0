"""Building backbones and detectors from timm, with local weights for machines without the hub."""

from .backbone import create_backbone, save_backbone
from .detection import create_detector, detector_config, unload_detector_lora
from .detector_folder import load_merged_detector

__all__ = ["create_backbone", "create_detector", "detector_config", "load_merged_detector", "save_backbone",
           "unload_detector_lora"]
