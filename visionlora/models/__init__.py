"""Building backbones (and later detectors) from timm, with local weights for machines without the hub."""

from .backbone import create_backbone, save_backbone

__all__ = ["create_backbone", "save_backbone"]
