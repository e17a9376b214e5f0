"""Data for few-shot LoRA fine-tuning: the DataModule, k-shot sampling, augmentation presets, embedded datasets."""

from .datamodule import FewShotDataModule
from .dataset import FewShotDataset
from .digits import BASE_CLASSES, NOVEL_CLASSES, digits_class_names, digits_indices, digits_split
from .imagefolder import IMAGE_EXTENSIONS, ImageFolderSplits, find_bad_images, imagefolder_classes, scan_imagefolder
from .presets import IMAGENET_MEAN, IMAGENET_STD, data_config_from_model, eval_transform, train_transform
from .sampling import sample_k_shot, stratified_split, write_selection

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
]
