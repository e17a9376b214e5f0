"""Data for few-shot LoRA fine-tuning, by task, behind one registry of named sources.

- ``classification/``: :class:`FewShotDataModule`, the ImageFolder scan, k-shot sampling, presets, the dataset.
- ``detection/``: :class:`CocoDetectionDataModule`, the COCO reader, TFA K-instance sampling, bbox-aware presets.
- ``sources/``: the named datasets (digits, Omniglot, ImageFolder, torchvision's FGVC sets; synthetic scenes,
  COCO folders) and the registry both data modules look names up in.
- ``common``: image reading and seeded augmentation, shared by both tasks.
"""

from .classification.datamodule import FewShotDataModule
from .classification.dataset import FewShotDataset
from .classification.imagefolder import (
    IMAGE_EXTENSIONS,
    ImageFolderSplits,
    imagefolder_classes,
    scan_imagefolder,
)
from .classification.presets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    data_config_from_model,
    eval_transform,
    eval_transform_from,
    timm_data_config,
    train_transform,
    train_transform_from,
)
from .classification.sampling import sample_k_shot, stratified_split, write_selection
from .common import find_bad_images
from .detection.coco import CocoSplit, DetectionRecord, load_coco
from .detection.datamodule import CocoDetectionDataModule
from .detection.dataset import DetectionDataset, collate_detection
from .detection.presets import eval_detection_transform, train_detection_transform
from .detection.sampling import InstanceSample, sample_k_instances, write_fewshot_selection
from .sources.digits import BASE_CLASSES, NOVEL_CLASSES, digits_class_names, digits_indices, digits_split
from .sources.synthetic_scenes import BASE_CLASS_NAMES as SYNTHETIC_BASE_CLASSES
from .sources.synthetic_scenes import CLASS_NAMES as SYNTHETIC_CLASSES
from .sources.synthetic_scenes import ensure_synthetic_scenes, generate_scenes

__all__ = [
    "BASE_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "NOVEL_CLASSES",
    "FewShotDataModule",
    "FewShotDataset",
    "ImageFolderSplits",
    "data_config_from_model",
    "digits_class_names",
    "digits_indices",
    "digits_split",
    "eval_transform",
    "eval_transform_from",
    "EvalTransform",
    "timm_data_config",
    "find_bad_images",
    "imagefolder_classes",
    "sample_k_shot",
    "scan_imagefolder",
    "stratified_split",
    "train_transform",
    "train_transform_from",
    "write_selection",
    "CocoSplit",
    "DetectionRecord",
    "load_coco",
    "CocoDetectionDataModule",
    "DetectionDataset",
    "collate_detection",
    "eval_detection_transform",
    "train_detection_transform",
    "InstanceSample",
    "sample_k_instances",
    "write_fewshot_selection",
    "SYNTHETIC_BASE_CLASSES",
    "SYNTHETIC_CLASSES",
    "ensure_synthetic_scenes",
    "generate_scenes",
]
