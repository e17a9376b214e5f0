"""One benchmark cell: fine-tune a fresh backbone on a few labelled images with one method and test it.

The model, its frozen/trainable split, the AdamW groups, the warmup-cosine schedule and the prototype head
initialisation are exactly ``LoraClassifier``'s (what ``tools/train.py`` trains); the loop is plain PyTorch with a
fixed budget of optimiser steps, because a Lightning Trainer per cell would cost more than the cell itself.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from visionlora.data import FewShotDataset, eval_transform_from, train_transform_from
from visionlora.data.common import seed_transform
from visionlora.models import families
from visionlora.tasks import LoraClassifier
from visionlora.tasks.optim import adamw_warmup_cosine

from .methods import MethodSpec


@dataclass
class Backbone:
    """Which pretrained backbone every cell starts from (``LoraClassifier``'s arguments of the same names)."""

    name: str
    pretrained: bool = False
    pretrained_file: str | None = None
    model_args: dict | None = None
    has_attention: bool | None = None  # filled in on first use


@dataclass
class CellData:
    """The images of one cell: ``[N, H, W, 3]`` uint8 arrays or file paths, and labels ``0..num_classes-1``.

    ``raw_train_images`` and ``raw_test_images`` are the same images as stored, where the protocol's images are a
    render of them (the Omniglot runs: the native 105x105 image behind the centred 28 px render the backbones
    see); ``raw-nn`` compares those when given.
    """

    train_images: np.ndarray | list
    train_labels: np.ndarray
    test_images: np.ndarray | list
    test_labels: np.ndarray
    num_classes: int
    raw_train_images: np.ndarray | list | None = None
    raw_test_images: np.ndarray | list | None = None


@dataclass
class Budget:
    """Optimisation settings shared by every cell of a sweep."""

    steps: int = 60
    batch_size: int = 16
    eval_batch_size: int = 256
    warmup_fraction: float = 0.1


@dataclass
class CellResult:
    accuracy: float
    trainable_params: int
    total_params: int
    seconds: float


def run_cell(spec: MethodSpec, backbone: Backbone, data: CellData, preprocessing: dict, budget: Budget,
             seed: int) -> CellResult:
    """Fine-tune with ``spec`` on ``data``'s training images (seeded), then return test accuracy and costs."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    if spec.method == "raw-nn":
        accuracy = raw_nearest_neighbour(data, budget.eval_batch_size)
        return CellResult(accuracy, 0, 0, time.perf_counter() - started)
    test = _loader(data.test_images, data.test_labels, _eval(preprocessing), budget.eval_batch_size)
    if spec.method == "pixel-nn":
        train = _loader(data.train_images, data.train_labels, _eval(preprocessing), budget.eval_batch_size)
        accuracy = pixel_nearest_neighbour(train, test)
        return CellResult(accuracy, 0, 0, time.perf_counter() - started)
    module = build_module(spec, backbone, data.num_classes, budget)
    support = _loader(data.train_images, data.train_labels, _eval(preprocessing), budget.eval_batch_size)
    # An ncc method never uses its head in training: it is imprinted once, from the adapted features, afterwards.
    if spec.objective != "ncc":
        module.imprint_head(support)
    if spec.trains:
        train_steps(module, spec, data, preprocessing, budget, seed)
    if spec.objective == "ncc":
        module.imprint_head(support)
    accuracy = test_accuracy(module, test)
    changed = module.trainable_parameter_count() if spec.trains else _head_size(module)
    total = sum(p.numel() for p in module.parameters())
    return CellResult(accuracy, changed, total, time.perf_counter() - started)


def build_module(spec: MethodSpec, backbone: Backbone, num_classes: int, budget: Budget) -> LoraClassifier:
    """A fresh ``LoraClassifier`` for the method (``ncm`` builds a linear probe that is never stepped).

    With ``spec.pretrained`` False (``scratch``) the backbone's architecture is built without its weights.
    """
    method = "linear" if spec.method == "ncm" else spec.method
    lora = spec.lora_config(has_attention(backbone)) if method == "lora" else None
    if spec.pretrained:
        weights = dict(backbone=backbone.name, pretrained=backbone.pretrained,
                       pretrained_file=backbone.pretrained_file, model_args=backbone.model_args)
    else:
        name, model_args = random_init_architecture(backbone)
        weights = dict(backbone=name, pretrained=False, pretrained_file=None, model_args=model_args)
    return LoraClassifier(num_classes=num_classes, **weights, method=method, lora=lora, lr=spec.lr,
                          head_lr=spec.head_lr, backbone_lr=spec.lr, warmup_fraction=budget.warmup_fraction,
                          cosine_scale=spec.cosine_scale)


def random_init_architecture(backbone: Backbone) -> tuple[str, dict | None]:
    """The timm architecture and ``create_model`` arguments of ``backbone``, for building it without weights.

    A ``local-dir:`` folder names both in its config.json (``architecture``, ``model_args``: what timm reads when it
    loads the folder, so the random model has the pretrained one's shape, e.g. the bundled ViT's 24 px, depth 4);
    otherwise they are ``backbone.name`` and ``backbone.model_args``. ``backbone.model_args`` win over the file's.
    """
    file = backbone.pretrained_file
    folder = Path(file.removeprefix("local-dir:")) if file else None
    if folder is None or not folder.is_dir():
        return backbone.name, backbone.model_args
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"pretrained_file folder {folder} has no config.json (timm local-dir format)")
    config = json.loads(config_file.read_text())
    stored = {k: v for k, v in (config.get("model_args") or {}).items() if k != "num_classes"}
    return config.get("architecture", backbone.name), stored | (backbone.model_args or {})


def has_attention(backbone: Backbone) -> bool:
    """Whether the backbone has attention blocks (decides what LoRA's "all layers" means); cached.

    The family rule training uses for default targets (``visionlora.models.families``), on a weightless model.
    """
    if backbone.has_attention is None:
        with torch.device("meta"):
            probe = timm.create_model(backbone.name, pretrained=False, num_classes=2, **(backbone.model_args or {}))
        backbone.has_attention = families.has_attention(probe)
    return backbone.has_attention


def train_steps(module: LoraClassifier, spec: MethodSpec, data: CellData, preprocessing: dict, budget: Budget,
                seed: int) -> None:
    """``budget.steps`` AdamW steps on augmented training batches, cycling through the shuffled images: of
    cross-entropy through the head, or with ``objective='ncc'`` of :func:`ncc_loss` on two views of each image."""
    transform = train_transform_from(preprocessing)  # the data module's, random affine (Omniglot) included
    seed_transform(transform, seed)
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(budget.batch_size, len(data.train_labels))
    dataset = FewShotDataset(data.train_images, data.train_labels, transform)
    if spec.objective == "ncc":
        dataset = _TwoViews(dataset)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    optimizer, schedule = adamw_warmup_cosine(module.parameter_groups(), budget.steps, budget.warmup_fraction)
    # A linear probe keeps the frozen backbone in eval mode: BatchNorm statistics of 5 images would drift otherwise.
    module.train(spec.method != "linear")
    step = 0
    while step < budget.steps:
        for batch in loader:
            loss = _step_loss(module, spec, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step == budget.steps:
                break
    module.eval()


def _step_loss(module: LoraClassifier, spec: MethodSpec, batch: list[torch.Tensor]) -> torch.Tensor:
    if spec.objective == "ncc":
        return ncc_loss(module.model, *batch, scale=spec.cosine_scale)
    images, labels = batch
    return F.cross_entropy(module(images), labels)


def ncc_loss(model: torch.nn.Module, first: torch.Tensor, second: torch.Tensor, labels: torch.Tensor,
             scale: float) -> torch.Tensor:
    """The nearest-centroid classifier's loss of task-specific adapters (Li, Liu & Bilen 2022, arXiv:2107.00358),
    with two augmented views: the cosine centroids of one view's features classify the other view, both ways.

    Li et al. compute centroids and queries on the same support images; with one shot per class each image would
    then be its own centroid and the loss would only sharpen the scale, so the second view is the query here.
    Classes are those present in the batch. Cosine logits times ``scale``, the cosine head's temperature.
    """
    features = model.forward_head(model.forward_features(torch.cat([first, second])), pre_logits=True)
    first_features, second_features = F.normalize(features, dim=1).chunk(2)
    classes, targets = labels.unique(return_inverse=True)

    def centroids(view: torch.Tensor) -> torch.Tensor:
        sums = view.new_zeros(len(classes), view.shape[1]).index_add(0, targets, view)
        return F.normalize(sums, dim=1)

    forward = F.cross_entropy(scale * second_features @ centroids(first_features).T, targets)
    backward = F.cross_entropy(scale * first_features @ centroids(second_features).T, targets)
    return (forward + backward) / 2


class _TwoViews(Dataset):
    """Each item of a ``FewShotDataset`` with a random transform as two independent views and its label."""

    def __init__(self, dataset: FewShotDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        first, label = self.dataset[index]
        second, _ = self.dataset[index]
        return first, second, label


@torch.no_grad()
def test_accuracy(module: LoraClassifier, loader: DataLoader) -> float:
    module.eval()
    correct = total = 0
    for images, labels in loader:
        correct += (module(images).argmax(dim=1) == labels).sum().item()
        total += len(labels)
    return correct / total


@torch.no_grad()
def pixel_nearest_neighbour(train: DataLoader, test: DataLoader) -> float:
    """1-nearest-neighbour (Euclidean) of each test image among the training images, on the tensors the loaders yield.

    ``pixel-nn`` passes the eval-transformed, normalised model input (resized to the backbone's input size);
    ``raw-nn`` (:func:`raw_nearest_neighbour`) the raw stored pixels. Ties go to the first training image.
    """
    support, support_labels = (torch.cat(parts) for parts in zip(*train, strict=True))
    correct = total = 0
    for images, labels in test:
        nearest = torch.cdist(images.flatten(1), support.flatten(1)).argmin(dim=1)
        correct += (support_labels[nearest] == labels).sum().item()
        total += len(labels)
    return correct / total


@torch.no_grad()
def raw_nearest_neighbour(data: CellData, batch_size: int) -> float:
    """1-nearest-neighbour (Euclidean) on the images as stored: raw uint8 pixels of every channel, no resize, no
    normalisation, the no-learning baseline that owes nothing to the backbone's preprocessing.

    ``data.raw_train_images``/``raw_test_images`` when given (the native Omniglot images), else the cell's images.
    Distances are computed in float64, where sums of squared integer pixel differences are exact, so the nearest
    image does not depend on rounding. Every image must have the first training image's size.
    """
    train_images = data.train_images if data.raw_train_images is None else data.raw_train_images
    test_images = data.test_images if data.raw_test_images is None else data.raw_test_images
    shape = tuple(FewShotDataset(train_images, data.train_labels)[0][0].shape)
    as_stored = _RawPixels(shape)
    train = _loader(train_images, data.train_labels, as_stored, batch_size)
    test = _loader(test_images, data.test_labels, as_stored, batch_size)
    return pixel_nearest_neighbour(train, test)


class _RawPixels:
    """A ``FewShotDataset`` transform: the stored ``H x W x 3`` uint8 image as float64, after checking its size."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __call__(self, image: np.ndarray) -> dict:
        image = np.asarray(image)
        if image.shape != self.shape:
            raise ValueError(f"raw-nn: every image must be stored at one size (the first training image is "
                             f"{self.shape}, another is {image.shape}); pixel-nn resizes them to the model input")
        return {"image": torch.from_numpy(image.astype(np.float64))}


def _head_size(module: LoraClassifier) -> int:
    return sum(p.numel() for p in module.model.get_classifier().parameters())


def _eval(preprocessing: dict):
    return eval_transform_from(preprocessing)


def _loader(images, labels, transform, batch_size: int, shuffle: bool = False, generator=None) -> DataLoader:
    return DataLoader(FewShotDataset(images, labels, transform), batch_size=batch_size, shuffle=shuffle,
                      generator=generator)
