"""Data for few-shot LoRA fine-tuning: the DataModule, k-shot sampling, augmentation presets, embedded datasets."""

from .coco import CocoSplit, DetectionRecord, load_coco
from .datamodule import FewShotDataModule
from .dataset import FewShotDataset
from .detection_datamodule import CocoDetectionDataModule
from .detection_dataset import DetectionDataset, collate_detection
from .detection_presets import eval_detection_transform, train_detection_transform
from .detection_sampling import InstanceSample, sample_k_instances, write_fewshot_selection
from .digits import BASE_CLASSES, NOVEL_CLASSES, digits_class_names, digits_indices, digits_split
from .imagefolder import IMAGE_EXTENSIONS, ImageFolderSplits, find_bad_images, imagefolder_classes, scan_imagefolder
from .presets import IMAGENET_MEAN, IMAGENET_STD, data_config_from_model, eval_transform, train_transform
from .sampling import sample_k_shot, stratified_split, write_selection
from .synthetic_scenes import BASE_CLASS_NAMES as SYNTHETIC_BASE_CLASSES
from .synthetic_scenes import CLASS_NAMES as SYNTHETIC_CLASSES
from .synthetic_scenes import ensure_synthetic_scenes, generate_scenes

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
    "find_bad_images",
    "imagefolder_classes",
    "sample_k_shot",
    "scan_imagefolder",
    "stratified_split",
    "train_transform",
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
