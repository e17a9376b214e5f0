"""The ``coco`` source: any COCO-format detection folder, read as it is by ``detection.coco``.

Standard layout ``<root>/<split>/annotations.json`` with images under ``<root>/<split>/images/`` (``val`` and
``test`` optional), or explicit json and image folder per split; the training json's categories give the classes.
"""

from __future__ import annotations

from ..detection.coco import read_coco_categories
from .base import DetectionSource

COCO = DetectionSource(name="coco", categories=read_coco_categories)
