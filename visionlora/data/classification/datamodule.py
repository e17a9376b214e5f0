"""``FewShotDataModule``: k-shot training sets from any registered classification source, as a LightningDataModule.

The constructor takes plain typed keyword arguments so LightningCLI/jsonargparse can build it from YAML, and
``num_classes`` is known right after construction so the CLI can link it into the model. What differs between
datasets (class names, splits, selection ids, preprocessing defaults, whether a root is needed) comes from the
source registry (:mod:`visionlora.data.sources`), looked up by ``dataset``. Preprocessing follows the backbone
(``set_data_config``) unless set explicitly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

from ..common import make_loader, seed_transform
from ..sources import ClassificationPools, ClassificationSource, LabelledImages, SourceOptions, classification_source
from .balanced import ClassBalancedBatchSampler
from .dataset import FewShotDataset
from .imagefolder import BAD_IMAGE_POLICIES
from .presets import (
    CROP_MODES,
    DEFAULT_CROP_MODE,
    DEFAULT_CROP_PCT,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_SCALE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATION_NAME,
    eval_transform_from,
    normalize_data_config,
    train_transform_from,
)
from .sampling import sample_k_shot, stratified_split, write_selection

logger = logging.getLogger(__name__)

SELECTION_FILE = "fewshot_selection.csv"


class _Resolved:
    """Read-only attribute holding the preprocessing value in use (see ``FewShotDataModule.preprocessing``)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj, objtype=None):
        return self if obj is None else obj.preprocessing[self.name]

    def __set__(self, obj, value) -> None:
        raise AttributeError(f"FewShotDataModule.{self.name} is read-only: pass it to the constructor")


class FewShotDataModule(L.LightningDataModule):
    """Few-shot image classification data: k seeded images per class for training, a fixed test set.

    Batches are ``(images float32 [B, 3, S, S], labels int64 [B])``. After construction, ``image_size``, ``mean``,
    ``std``, ``crop_pct``, ``crop_mode``, ``hflip`` and ``crop_scale`` read back the values in use (argument, else
    dataset default, else backbone, else default), not the raw arguments. The test set never depends on ``seed``;
    the training images do (and are written to ``run_dir`` when given). Validation images come from a ``val/``
    folder when the ImageFolder has one, else, with ``val_fraction > 0``, from the training pool minus the chosen
    shots; with neither, ``val_dataloader`` returns an empty list and Lightning skips validation. Validation is
    never taken from the test set.

    Args:
        dataset: A registered classification source (:func:`~visionlora.data.sources.classification_source_names`):
            ``"digits"`` (scikit-learn's 8x8 handwritten digits, embedded, no download), ``"imagefolder"``
            (``root/<class>/<images>``, or ``root/train`` + ``root/test`` and/or ``root/val``),
            ``"digits+omniglot"`` (pretraining data: the digits of ``classes`` plus every Omniglot background-small
            character rendered like a digit; ``root`` is the folder of the Omniglot archives), ``"omniglot"``
            (pretraining data for the Omniglot one-shot runs: all 292 background-small characters in the
            ``"centred"`` 28 px render, drawers 1-16 as the training pool and drawers 17-20 as the test set, see
            :func:`~visionlora.data.sources.omniglot.omniglot_background_part`; ``root`` as for ``"digits+omniglot"``),
            ``"omniglot-unique"`` (the same with each of the 242 distinct characters once: Greek and Latin are in
            both splits) and ``"omniglot-dev"`` (those without the validation alphabets, for recipe search; see
            :func:`~visionlora.data.sources.omniglot.omniglot_background_unique`)
            or ``"torchvision:<name>"`` (``pets``, ``flowers102``, ``aircraft``, ``food101``, ``cars``: torchvision's
            dataset under ``root`` in its own layout, its official train(val) and test splits; no download).
        root: Folder of the ImageFolder dataset, of the Omniglot archives or of the torchvision dataset; must be left
            unset for ``"digits"``.
        classes: Digits only: ``"novel"`` (digits 5-9), ``"base"`` (0-4) or ``"all"`` (0-9).
        shots: Training images per class (k); ``None`` trains on the whole training pool.
        seed: Seed of the k-shot draw, the validation draw and the training shuffle and augmentation.
        batch_size: Training batch size (the last batch may be smaller).
        eval_batch_size: Validation and test batch size.
        num_workers: DataLoader worker processes (0: load in the main process).
        image_size: Side of the square model input; ``None``: the backbone's (``set_data_config``), else 224.
        mean: Normalisation mean (0..1 scale); ``None``: the backbone's, else ImageNet's.
        std: Normalisation std (0..1 scale); ``None``: the backbone's, else ImageNet's.
        crop_pct: Share of the resized image kept by the eval centre crop; ``None``: 1.0 for digits and Omniglot
            (no crop, strokes sit at the border), else the backbone's, else 0.875.
        crop_mode: How evaluation fits an image to the square input, as timm's eval transform (which validation,
            test and exports use, see :func:`~visionlora.data.classification.presets.eval_transform_from`) does:
            ``"center"`` (the shorter side resized to ``image_size / crop_pct``, aspect ratio kept, centre crop: the
            long side of a non-square image is cut), ``"squash"`` (both sides resized, aspect ratio not kept, then
            the centre crop: nothing is lost at ``crop_pct=1``) or ``"border"`` (the longer side, padded with the
            mean colour). ``None``: ``"center"``, timm's default. An export's ``config.json`` records it.
        hflip: Random horizontal flips in training; ``None``: off for digits and Omniglot (a mirrored character
            is not that character), on otherwise.
        crop_scale: Area range of the training random resized crop; ``None``: (0.85, 1.0) for digits and
            Omniglot, (0.6, 1.0) otherwise.
        affine: Random affine in training, before the crop (``presets.AFFINE``: rotation ±15°, shear ±10°, shift ±8%,
            scale ±10%; uncovered borders are black, the Omniglot background); ``None``: on for Omniglot (a new
            drawer writes the character slanted and placed differently), off otherwise. ``"strokes"``: a wider
            affine plus a mild elastic distortion (``presets.STROKES_AFFINE``, ``presets.STROKES_ELASTIC``).
        val_fraction: Share of each class's training pool, after removing the chosen shots, used for
            validation (at most ``max_val_per_class`` images per class); 0 disables it. Ignored when the
            ImageFolder has a ``val/`` folder.
        max_val_per_class: Cap on validation images per class drawn from the training pool.
        on_bad_image: ImageFolder only: ``"skip"`` leaves out unreadable image files (one logged warning with
            their count and first paths) or ``"error"`` raises a ValueError listing them. Checked in ``setup``.
        test_fraction: ImageFolder only: share of each class held out for testing when the folder has no
            ``train/`` + ``test/`` split; the split uses a fixed seed, not ``seed``.
        per_class_in_batch: When set (>= 2), every training batch is ``batch_size // per_class_in_batch`` classes
            with this many images each (:class:`~visionlora.data.classification.balanced.ClassBalancedBatchSampler`),
            as a prototypical loss needs (``LoraClassifier(prototype_loss=...)``); one process only (a trainer of
            more devices is refused). ``None``: plain shuffled batches.
        run_dir: When set, ``setup`` writes the training selection to ``<run_dir>/fewshot_selection.csv``
            (digits: row of ``sklearn.datasets.load_digits``; ImageFolder and torchvision: path relative to
            ``root``; Omniglot: path inside the archives, ``split/alphabet/character/file.png``).
    """

    def __init__(
        self,
        dataset: str = "digits",
        root: str | None = None,
        classes: str = "novel",
        shots: int | None = 5,
        seed: int = 0,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        image_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        crop_pct: float | None = None,
        crop_mode: str | None = None,
        hflip: bool | None = None,
        crop_scale: tuple[float, float] | None = None,
        affine: bool | str | None = None,
        val_fraction: float = 0.0,
        max_val_per_class: int = 20,
        on_bad_image: str = "skip",
        test_fraction: float = 0.3,
        per_class_in_batch: int | None = None,
        run_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        _check_arguments(dataset, root, shots, seed, val_fraction, max_val_per_class, on_bad_image, test_fraction)
        if per_class_in_batch is not None and (per_class_in_batch < 2 or batch_size % per_class_in_batch):
            raise ValueError(f"FewShotDataModule: per_class_in_batch must be >= 2 and divide batch_size "
                             f"{batch_size}, got {per_class_in_batch}")
        if crop_mode is not None and crop_mode not in CROP_MODES:
            raise ValueError(f"FewShotDataModule: crop_mode must be one of {CROP_MODES} or None, got {crop_mode!r}")
        self.dataset, self.root, self.classes = dataset, root, classes
        self.shots, self.seed, self.run_dir = shots, seed, run_dir
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.val_fraction, self.max_val_per_class = val_fraction, max_val_per_class
        self.on_bad_image, self.test_fraction = on_bad_image, test_fraction
        self.per_class_in_batch = per_class_in_batch
        # Kept apart from the backbone's settings so that explicit arguments keep winning over set_data_config.
        self._explicit = {"image_size": image_size, "mean": mean, "std": std, "crop_pct": crop_pct}
        self._explicit |= {"crop_mode": crop_mode, "hflip": hflip, "crop_scale": crop_scale, "affine": affine}
        self._backbone_config: dict = {}
        # Listing the classes now (folder names only) lets LightningCLI link num_classes into the model before
        # setup, and fails early on a wrong root.
        self._class_names = self._source.list_classes(self._options)
        self._parts: dict[str, FewShotDataset] | None = None
        self._restored_streams: dict | None = None  # what load_state_dict brought back, for the next train loader

    image_size = _Resolved()
    mean = _Resolved()
    std = _Resolved()
    crop_pct = _Resolved()
    crop_mode = _Resolved()
    hflip = _Resolved()
    crop_scale = _Resolved()
    affine = _Resolved()

    @property
    def num_classes(self) -> int:
        """Number of classes (available before ``setup``)."""
        return len(self._class_names)

    @property
    def class_names(self) -> list[str]:
        """Class names in label order (available before ``setup``)."""
        return list(self._class_names)

    def set_data_config(self, config: dict) -> None:
        """Take the backbone's preprocessing; arguments given to the constructor still win.

        Args:
            config: Any of ``image_size``, ``mean``, ``std``, ``crop_pct`` (as from
                :func:`~visionlora.data.classification.presets.data_config_from_model`), or timm's
                ``resolve_model_data_config(model)`` dict as is (``input_size`` gives ``image_size``).
        """
        self._backbone_config = normalize_data_config(config)

    @property
    def preprocessing(self) -> dict:
        """The settings the transforms use: explicit argument, else dataset default, else backbone, else default.

        Keys: ``image_size``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``, ``hflip``, ``crop_scale``, ``affine``
        and ``interpolation`` (always ``"bicubic"``). The evaluation ones are what an export writes to its
        ``pretrained_cfg`` (:func:`~visionlora.data.classification.presets.timm_data_config`).
        """
        return resolve_preprocessing(self._explicit, self._source.preprocessing, self._backbone_config)

    def setup(self, stage: str | None = None) -> None:
        """Load (and for ImageFolder check) every image list and draw the shots; runs once, later calls return."""
        if self._parts is not None:
            return
        pools = self._read_pools()
        pool, test = _items(pools.train), _items(pools.test)
        val = _items(pools.val) if pools.val is not None else None
        train_idx = self._draw_shots(pool.labels)
        if val is None and self.val_fraction > 0:
            val, train_idx = self._draw_val(pool, train_idx)
            if not train_idx:  # else torch's num_samples=0 at the first epoch
                raise ValueError(f"FewShotDataModule: no training image left in {self.dataset!r} (root {self.root}) "
                                 f"after the validation draw: val_fraction={self.val_fraction} took all {len(pool)} "
                                 "images of the training pool; lower val_fraction or give a val/ folder")
        self._parts = {"train": _subset(pool, train_idx), "test": test}
        if val is not None:
            self._parts["val"] = val
        if self.run_dir is not None:
            rows = self._selection_rows(pool, train_idx, pools.selection_ids())
            write_selection(Path(self.run_dir) / SELECTION_FILE, rows)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches with seeded augmentation (order and augmentation repeat for a given seed)."""
        transform = train_transform_from(self.preprocessing)
        seed_transform(transform, self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        if self._restored_streams is not None:
            set_stream_state(generator, transform, self._restored_streams)
            self._restored_streams = None
        if self.per_class_in_batch is None:
            return self._loader("train", transform, self.batch_size, shuffle=True, generator=generator)
        self._check_single_process()
        labels = self._require_setup()["train"].labels
        batches = ClassBalancedBatchSampler(labels, self.batch_size, self.per_class_in_batch, generator)
        return self._loader("train", transform, self.batch_size, generator=generator, batch_sampler=batches)

    def _check_single_process(self) -> None:
        # Every rank would draw the same batches from the same seed, and Lightning cannot shard a batch sampler
        # that is not a torch BatchSampler: refuse before the first step instead of training on repeated data.
        world_size = getattr(self.trainer, "world_size", 1)  # no trainer: one process
        if world_size > 1:
            raise ValueError(f"FewShotDataModule: per_class_in_batch={self.per_class_in_batch} (class-balanced "
                             f"batches) runs in a single process, but the trainer runs {world_size}; use one device "
                             "or drop per_class_in_batch")

    def state_dict(self) -> dict:
        """Where the training loader's shuffle and augmentation streams stand, saved in each Lightning checkpoint.

        With it, a run resumed from a checkpoint saved at an epoch's end shuffles and augments the next epochs as
        an uninterrupted run does. Exact with ``num_workers=0``; with workers each (persistent) worker holds its own
        augmentation stream, seeded from the shuffle generator when the workers start, so a resumed run's workers
        draw reproducible streams but not the ones the uninterrupted run would have drawn.
        """
        # The trainer's own loader: other train_dataloader() calls (the prototype pass) have streams of their own.
        loader = self.trainer.train_dataloader if self.trainer is not None else None
        if not isinstance(loader, DataLoader):
            return {}
        return stream_state(loader.generator, loader.dataset.transform)

    def load_state_dict(self, state_dict: dict) -> None:
        """Keep the streams of :meth:`state_dict` for the next ``train_dataloader`` (Lightning restores the data
        module before it builds the loaders)."""
        self._restored_streams = state_dict or None

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches, or an empty list (Lightning then skips validation) when there is no validation set."""
        if "val" not in self._require_setup():
            return []
        return self._loader("val", self._eval_transform(), self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """Test batches, in a fixed order; under DDP every test image goes to exactly one rank.

        Lightning's DistributedSampler would pad the split to a multiple of the world size with repeated images,
        which the synchronised test metrics would then count twice; ranks may differ by one image instead.
        """
        return self._loader("test", self._eval_transform(), self.eval_batch_size, unpadded=True)

    def sample_batch(self, n: int = 8) -> torch.Tensor:
        """``n`` eval-transformed test images, ``[n, 3, S, S]``, taking the classes in turn.

        The first test image of class 0, of class 1, ..., then the second of each, so every class appears once
        ``n >= num_classes``. Deterministic and independent of ``seed``, so exports can be checked against the
        same inputs; runs ``setup`` if needed.
        """
        if self._parts is None:
            self.setup()
        test = self._parts["test"]
        if not 1 <= n <= len(test):
            raise ValueError(f"sample_batch: n must be in [1, {len(test)}] (test set size), got {n}")
        dataset = FewShotDataset(test.images, test.labels, self._eval_transform())
        return torch.stack([dataset[i][0] for i in _classes_in_turn(test.labels, n)])

    def raw_split(self, part: str) -> FewShotDataset:
        """The untransformed images (uint8 H x W x 3 arrays or file paths) and labels of ``train``/``val``/``test``."""
        self.setup()
        if part not in self._parts:
            raise ValueError(f"FewShotDataModule has no {part!r} split; it has {sorted(self._parts)}")
        return self._parts[part]

    @property
    def _source(self) -> ClassificationSource:
        # Looked up, not stored: the data module stays plain values, as pickling for spawned processes needs.
        return classification_source(self.dataset)

    @property
    def _options(self) -> SourceOptions:
        return SourceOptions(self.root, self.classes, self.test_fraction, self.on_bad_image)

    def _read_pools(self) -> ClassificationPools:
        pools = self._source.read(self._options)
        self._class_names = list(pools.class_names)
        if pools.val is not None and self.val_fraction > 0:
            logger.info("FewShotDataModule: using the validation split of %s under %s; val_fraction is ignored",
                        self.dataset, self.root)  # fmt: skip
        return pools

    def _draw_shots(self, labels: np.ndarray) -> list[int]:
        if self.shots is None:
            return list(range(len(labels)))
        return sample_k_shot(labels, self.shots, self.seed, self._class_names)

    def _draw_val(self, pool: FewShotDataset, train_idx: list[int]) -> tuple[FewShotDataset, list[int]]:
        """Validation images from the pool minus the shots; returns them and the (possibly reduced) train indices.

        With ``shots=None`` the whole pool is the training set, so the validation images are taken out of it.
        """
        whole = self.shots is None
        rest = np.arange(len(pool)) if whole else np.setdiff1d(np.arange(len(pool)), train_idx)
        _, taken = stratified_split(pool.labels[rest], self.val_fraction, self.seed, self.max_val_per_class)
        val_idx = rest[taken]
        if whole:
            train_idx = sorted(set(train_idx) - {int(i) for i in val_idx})
        return _subset(pool, val_idx), train_idx

    def _selection_rows(self, pool: FewShotDataset, train_idx: list[int], ids: list) -> list[dict]:
        """One CSV row per training image: what identifies it outside this package (``ids``), its label and class."""
        column, names = self._source.selection_column, self._class_names
        return [{column: ids[i], "label": int(pool.labels[i]), "class_name": names[pool.labels[i]]} for i in train_idx]

    def _eval_transform(self):
        return eval_transform_from(self.preprocessing)

    def _require_setup(self) -> dict[str, FewShotDataset]:
        if self._parts is None:
            raise RuntimeError("FewShotDataModule: call setup() before asking for dataloaders")
        return self._parts

    def _loader(self, part: str, transform, batch_size: int, shuffle: bool = False, generator=None,
                unpadded: bool = False, batch_sampler=None) -> DataLoader:
        items = self._require_setup()[part]
        dataset = FewShotDataset(items.images, items.labels, transform)
        trainer = self.trainer
        sampler = None
        if unpadded and trainer is not None and trainer.world_size > 1:
            # A DistributedSampler of its own, so Lightning keeps it instead of putting its padding one in.
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                                   shuffle=False)
        return make_loader(dataset, batch_size, self.num_workers, shuffle=shuffle, generator=generator, sampler=sampler,
                           batch_sampler=batch_sampler)


def resolve_preprocessing(given: dict, source: Mapping, backbone: dict) -> dict:
    """The preprocessing in use: an explicit argument, else the dataset's default, else the backbone's, else ours.

    Args:
        given: The data module's explicit arguments (``None`` where not given); may be empty.
        source: The dataset source's defaults (``ClassificationSource.preprocessing``).
        backbone: The backbone's data config (:func:`~visionlora.data.classification.presets.normalize_data_config`).
    """
    given = {key: given.get(key) for key in _PREPROCESSING_ARGUMENTS}
    return {
        "image_size": _first(given["image_size"], backbone.get("image_size"), DEFAULT_IMAGE_SIZE),
        "mean": tuple(_first(given["mean"], backbone.get("mean"), IMAGENET_MEAN)),
        "std": tuple(_first(given["std"], backbone.get("std"), IMAGENET_STD)),
        "crop_pct": _first(given["crop_pct"], source.get("crop_pct"), backbone.get("crop_pct"), DEFAULT_CROP_PCT),
        "crop_mode": _first(given["crop_mode"], DEFAULT_CROP_MODE),
        "hflip": _first(given["hflip"], source.get("hflip"), True),
        "crop_scale": tuple(_first(given["crop_scale"], source.get("crop_scale"), DEFAULT_SCALE)),
        "affine": _first(given["affine"], source.get("affine"), False),
        "interpolation": INTERPOLATION_NAME,
    }


_PREPROCESSING_ARGUMENTS = ("image_size", "mean", "std", "crop_pct", "crop_mode", "hflip", "crop_scale", "affine")


def _check_arguments(dataset, root, shots, seed, val_fraction, max_val_per_class, on_bad_image, test_fraction) -> None:
    """Raise naming the first constructor argument that is out of range."""
    try:
        source = classification_source(dataset)
    except ValueError as error:
        raise ValueError(f"FewShotDataModule: {error}") from None
    needs = f"must be unset for {dataset!r}"
    if source.needs_root:
        needs = f"is required for {dataset!r} ({source.root_help})"
    problems = {
        "root": (source.needs_root != (root is not None), needs),
        "shots": (shots is not None and shots < 1, f"must be >= 1 or None, got {shots}"),
        "seed": (seed < 0, f"must be >= 0, got {seed}"),
        "val_fraction": (not 0.0 <= val_fraction < 1.0, f"must be in [0, 1), got {val_fraction}"),
        "max_val_per_class": (max_val_per_class < 1, f"must be >= 1, got {max_val_per_class}"),
        "on_bad_image": (
            on_bad_image not in BAD_IMAGE_POLICIES,
            f"must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}",
        ),
        "test_fraction": (not 0.0 < test_fraction < 1.0, f"must be in (0, 1), got {test_fraction}"),
    }
    for name, (bad, message) in problems.items():
        if bad:
            raise ValueError(f"FewShotDataModule: {name} {message}")


def _classes_in_turn(labels: np.ndarray, n: int) -> list[int]:
    """The first ``n`` indices of the order: 1st item of each class by label, then the 2nd of each, and so on."""
    rank = np.zeros(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = labels == label
        rank[members] = np.arange(members.sum())
    return [int(i) for i in np.lexsort((labels, rank))[:n]]


def stream_state(generator: torch.Generator | None, transform) -> dict:
    """The state of a training loader's shuffle generator (when it has one: Lightning's DDP sampler shuffles by
    epoch instead) and of its seeded albumentations pipeline (see :func:`~visionlora.data.common.seed_transform`), as
    tensors and plain values, so the checkpoint loads with ``weights_only=True``."""
    state = {"augment_numpy": transform.random_generator.bit_generator.state,
             "augment_python": transform.py_random.getstate()}
    if generator is not None:
        state["shuffle"] = generator.get_state()
    return state


def set_stream_state(generator: torch.Generator, transform, state: dict) -> None:
    """Put a :func:`stream_state` back; the pipeline's steps share one generator pair, so setting it sets theirs."""
    if "shuffle" in state:
        generator.set_state(state["shuffle"])
    transform.random_generator.bit_generator.state = state["augment_numpy"]
    transform.py_random.setstate(state["augment_python"])


def _first(*values):
    """The first value that is not None."""
    return next(v for v in values if v is not None)


def _items(images: LabelledImages) -> FewShotDataset:
    """Images and labels without a transform yet: the loaders attach the transform for their part."""
    return FewShotDataset(images.images, images.labels, transform=None)


def _subset(items: FewShotDataset, indices) -> FewShotDataset:
    indices = np.asarray(indices, dtype=np.int64)
    images = items.images[indices] if isinstance(items.images, np.ndarray) else [items.images[i] for i in indices]
    return FewShotDataset(images, items.labels[indices], transform=None)
