"""``CocoDetectionDataModule``: few-shot object detection data (K instances per class) as a LightningDataModule.

Batches are ``(images, targets)``: a list of float32 ``[3, H, W]`` tensors in 0..1 (not normalised; the
torchvision detector normalises) and a list of dicts with ``boxes`` float32 ``[N, 4]`` (absolute ``x0, y0, x1,
y1`` pixels of the transformed image), ``labels`` int64 ``[N]`` in ``1..num_classes`` (0 is the background) and
``image_id`` int64 scalar. Training images come out ``image_size`` square; evaluation images keep their aspect
ratio with the longer side ``image_size``. The training set is drawn with TFA's K-instance sampler
(:mod:`~visionlora.data.detection.sampling`); validation and test sets are used whole and never depend on
``seed``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from ..common import make_loader, seed_transform
from ..sources import DetectionSource, detection_source
from ..sources.synthetic_scenes import ensure_synthetic_scenes
from .coco import BAD_POLICIES, CocoSplit, DetectionRecord, check_image_files, load_coco
from .dataset import DetectionDataset, collate_detection
from .presets import DEFAULT_SCALE, eval_detection_transform, train_detection_transform
from .sampling import InstanceSample, sample_k_instances, write_fewshot_selection

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SELECTION_FILE = "fewshot_selection.json"


class CocoDetectionDataModule(L.LightningDataModule):
    """Few-shot detection data from the embedded synthetic scenes or any COCO-format folder.

    ``num_classes`` and ``class_names`` are known right after construction (label ``i + 1`` is
    ``class_names[i]``), so LightningCLI can link them into the model. Standard layout of a dataset folder:
    ``<root>/<split>/annotations.json`` with images under ``<root>/<split>/images/`` for ``split`` in
    ``train``/``val``/``test``; ``val`` and ``test`` are optional (a missing one gives an empty dataloader list,
    which Lightning skips).

    Args:
        dataset: A registered detection source (:func:`~visionlora.data.sources.detection_source_names`):
            ``"synthetic"`` (the embedded shapes scenes, generated under ``root`` on first use, about 4 s),
            ``"synthetic_night"`` (the same scenes seen by a grey, noisy camera: a domain shift),
            ``"synthetic_base"`` (the same scenes with the six disjoint base shapes, 2000 training images, for
            pretraining a backbone; about 20 s to generate) or ``"coco"`` (any COCO-format detection data).
        root: Dataset folder. Synthetic: default ``data/synthetic_scenes`` (``data/synthetic_scenes_night``,
            ``data/synthetic_scenes_base``), relative to the working directory.
            COCO: the folder with the standard layout, needed unless every split path below is given.
        train_annotations: COCO only: the training json, instead of the standard layout (with ``train_images``).
        train_images: COCO only: the folder the training json's ``file_name`` entries are relative to.
        val_annotations: COCO only: validation json (with ``val_images``).
        val_images: COCO only: validation image folder.
        test_annotations: COCO only: test json (with ``test_images``).
        test_images: COCO only: test image folder.
        shots: Annotated instances per class in the training set (K, TFA's protocol); ``None`` trains on the
            whole training split.
        seed: Seed of the K-instance draw and of the training shuffle and augmentation.
        batch_size: Training batch size.
        eval_batch_size: Validation and test batch size.
        num_workers: DataLoader worker processes (0: load in the main process).
        image_size: Side of the square training images and longer side of evaluation images. The synthetic
            scenes are 128 px; photos want 512 or more.
        hflip: Random horizontal flips in training.
        scale: Range of the random rescale in training (see
            :func:`~visionlora.data.detection.presets.train_detection_transform`).
        on_bad: ``"drop"`` or ``"error"``: what :func:`~visionlora.data.detection.coco.load_coco` does with bad
            annotations and missing image files, and the setup scan with unreadable ones (dropped with one counted
            warning naming them, or an error listing them).
        keep_empty_images: With ``shots=None``, keep training images that have no annotation (as negatives).
            The K-instance draw never picks them; validation and test always keep them.
        run_dir: When set, ``setup`` writes the chosen image ids and counts per class to
            ``<run_dir>/fewshot_selection.json`` (only when ``shots`` is set).
    """

    def __init__(
        self,
        dataset: str = "synthetic",
        root: str | None = None,
        train_annotations: str | None = None,
        train_images: str | None = None,
        val_annotations: str | None = None,
        val_images: str | None = None,
        test_annotations: str | None = None,
        test_images: str | None = None,
        shots: int | None = 10,
        seed: int = 0,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        image_size: int = 128,
        hflip: bool = True,
        scale: tuple[float, float] = DEFAULT_SCALE,
        on_bad: str = "drop",
        keep_empty_images: bool = False,
        run_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        _check_arguments(dataset, shots, seed, batch_size, eval_batch_size, num_workers, image_size, on_bad)
        self.dataset, self.shots, self.seed, self.run_dir = dataset, shots, seed, run_dir
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.image_size, self.hflip, self.scale = image_size, hflip, tuple(scale)
        self.on_bad, self.keep_empty_images = on_bad, keep_empty_images
        explicit = {
            "train": (train_annotations, train_images),
            "val": (val_annotations, val_images),
            "test": (test_annotations, test_images),
        }
        source = self._source
        if source.generated:
            if any(path is not None for pair in explicit.values() for path in pair):
                raise ValueError(f"CocoDetectionDataModule: split paths are for dataset='coco'; {dataset} uses root")
            self.root = Path(root or source.default_root)
        else:
            self.root = Path(root) if root is not None else None
        self._paths = {split: self._split_paths(split, *pair) for split, pair in explicit.items()}
        # Only the categories are read now (cheap), so the model can be built before setup.
        self._category_ids, self._class_names = source.categories(self._paths["train"][0])
        self._parts: dict[str, list[DetectionRecord]] | None = None
        self.selection: InstanceSample | None = None

    @property
    def num_classes(self) -> int:
        """Number of foreground classes (labels ``1..num_classes``), available before ``setup``."""
        return len(self._class_names)

    @property
    def category_ids(self) -> list[int]:
        """The dataset's category id of each label (label ``i + 1`` is ``category_ids[i]``); the embedded scenes
        number their categories 1..C in label order."""
        return list(self._category_ids) if self._category_ids is not None else list(range(1, self.num_classes + 1))

    @property
    def class_names(self) -> list[str]:
        """Class names: label ``i + 1`` is ``class_names[i]``; available before ``setup``."""
        return list(self._class_names)

    def prepare_data(self) -> None:
        """Generate the synthetic scenes if they are not there yet (Lightning calls this on one process)."""
        scenes = self._source.scenes
        if scenes is not None:
            ensure_synthetic_scenes(self.root, **scenes)

    def setup(self, stage: str | None = None) -> None:
        """Read and check every split and draw the K-shot training set; runs once, later calls return.

        Every image file of every split is decoded here, before training: unreadable ones follow ``on_bad`` and a
        file whose size differs from its record's is an error, so no epoch (nor the test after a whole fit) crashes
        on one.
        """
        if self._parts is not None:
            return
        self.prepare_data()  # idempotent and atomic, so safe on every rank; covers setup() without a Trainer
        splits = {split: self._load(split) for split in SPLITS if self._paths[split] is not None}
        train_json = self._paths["train"][0]
        # Checked before any image is decoded: a training json without boxes is a mistake, found in a second.
        if not _has_boxes(splits["train"].records):
            raise ValueError(f"CocoDetectionDataModule: the train split ({train_json}) has no annotations to train on "
                             "(crowd and unusable annotations do not count)")
        self._parts = {split: check_image_files(loaded.records, self.on_bad, self._paths[split][0])
                       for split, loaded in splits.items()}  # fmt: skip
        _require_training_boxes(self._parts["train"], train_json, "once the unreadable image files were left out")
        if self.shots is not None:
            self._draw_shots(train_json)

    def _draw_shots(self, train_json: Path) -> None:
        """Keep the K-shot draw of the training pool (and write the selection file when ``run_dir`` is set)."""
        self.selection = sample_k_instances(self._parts["train"], self.shots, self.seed, self._class_names)
        self._parts["train"] = self.selection.records
        _require_training_boxes(self._parts["train"], train_json, f"after the {self.shots}-shot draw")
        counts = {self._class_names[label - 1]: n for label, n in self.selection.counts.items()}
        logger.info("CocoDetectionDataModule: %d training images, instances per class %s",
                    len(self._parts["train"]), counts)  # fmt: skip
        if self.run_dir is not None:
            info = {"dataset": self.dataset, "annotations": str(train_json), "shots": self.shots, "seed": self.seed}
            write_fewshot_selection(Path(self.run_dir) / SELECTION_FILE, self.selection, self._class_names, **info)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches with seeded augmentation (order and augmentation repeat for a given seed)."""
        transform = train_detection_transform(self.image_size, self.scale, self.hflip)
        seed_transform(transform, self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        return self._loader("train", transform, self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in image id order, or an empty list (Lightning skips validation) without a val split."""
        if "val" not in self._require_setup():
            return []
        return self._loader("val", eval_detection_transform(self.image_size), self.eval_batch_size)

    def test_dataloader(self) -> DataLoader | list:
        """Test batches in image id order, or an empty list without a test split."""
        if "test" not in self._require_setup():
            return []
        return self._loader("test", eval_detection_transform(self.image_size), self.eval_batch_size)

    def sample_batch(self, n: int = 4) -> list[torch.Tensor]:
        """The first ``n`` evaluation images (test split, else validation), eval-transformed, in image id order.

        Deterministic and independent of ``seed``, so an exported model can be checked on the same inputs; runs
        ``setup`` if needed. Returns a list of float32 ``[3, H, W]`` tensors in 0..1.
        """
        self.setup()
        part = next((p for p in ("test", "val") if p in self._parts), None)
        if part is None:
            raise ValueError("CocoDetectionDataModule.sample_batch: no test or val split to take images from")
        records = self._parts[part]
        if not 1 <= n <= len(records):
            raise ValueError(f"sample_batch: n must be in [1, {len(records)}] ({part} set size), got {n}")
        dataset = DetectionDataset(records[:n], eval_detection_transform(self.image_size))
        return [dataset[i][0] for i in range(n)]

    def split_records(self, part: str) -> list[DetectionRecord]:
        """Untransformed records (original pixel boxes) of ``train`` (after the K-shot draw), ``val`` or ``test``."""
        parts = self._require_setup()
        if part not in parts:
            raise ValueError(f"CocoDetectionDataModule has no {part!r} split; it has {sorted(parts)}")
        return parts[part]

    def _split_paths(self, split: str, annotations: str | None, images: str | None) -> tuple[Path, Path] | None:
        """``(json, image folder)`` of a split, from the explicit pair or the standard layout; None if absent."""
        if (annotations is None) != (images is None):
            raise ValueError(f"CocoDetectionDataModule: give both {split}_annotations and {split}_images, or neither")
        if annotations is not None:
            return Path(annotations), Path(images)
        if self.root is None:
            if split == "train":
                raise ValueError(f"CocoDetectionDataModule: dataset={self.dataset!r} needs root or "
                                 "train_annotations/train_images")
            return None
        json_path = self.root / split / "annotations.json"
        # The synthetic scenes may not be generated yet; their layout is known, so every split is expected.
        if self._source.generated or split == "train" or json_path.is_file():
            return json_path, self.root / split / "images"
        return None

    def _load(self, split: str) -> CocoSplit:
        json_path, image_dir = self._paths[split]
        keep_empty = self.keep_empty_images if split == "train" else True
        loaded = load_coco(json_path, image_dir, on_bad=self.on_bad, keep_empty=keep_empty)
        if loaded.class_names != self._class_names:
            raise ValueError(
                f"CocoDetectionDataModule: categories of {json_path} ({loaded.class_names}) differ from those the "
                f"data module was built with ({self._class_names})"
            )
        if self._category_ids is not None and loaded.category_ids != self._category_ids:
            raise ValueError(f"CocoDetectionDataModule: category ids of {json_path} differ from the training file's")
        return loaded

    @property
    def _source(self) -> DetectionSource:
        # Looked up, not stored: the data module stays plain values, as pickling for spawned processes needs.
        return detection_source(self.dataset)

    def _require_setup(self) -> dict[str, list[DetectionRecord]]:
        if self._parts is None:
            raise RuntimeError("CocoDetectionDataModule: call setup() before asking for dataloaders")
        return self._parts

    def _loader(self, part: str, transform, batch_size: int, shuffle: bool = False, generator=None) -> DataLoader:
        return make_loader(DetectionDataset(self._require_setup()[part], transform), batch_size, self.num_workers,
                           shuffle=shuffle, generator=generator, collate_fn=collate_detection)


def _has_boxes(records: list[DetectionRecord]) -> bool:
    return any(len(record.labels) for record in records)


def _require_training_boxes(records: list[DetectionRecord], train_json: Path, when: str) -> None:
    """Raise naming the training json when no training image with a box is left (torch would say num_samples=0)."""
    if not _has_boxes(records):
        raise ValueError(f"CocoDetectionDataModule: no training image left in the train split ({train_json}) {when}")


def _check_arguments(dataset, shots, seed, batch_size, eval_batch_size, num_workers, image_size, on_bad) -> None:
    """Raise naming the first constructor argument that is out of range."""
    try:
        detection_source(dataset)
    except ValueError as error:
        raise ValueError(f"CocoDetectionDataModule: {error}") from None
    problems = {
        "shots": (shots is not None and shots < 1, f"must be >= 1 or None, got {shots}"),
        "seed": (seed < 0, f"must be >= 0, got {seed}"),
        "batch_size": (batch_size < 1, f"must be >= 1, got {batch_size}"),
        "eval_batch_size": (eval_batch_size < 1, f"must be >= 1, got {eval_batch_size}"),
        "num_workers": (num_workers < 0, f"must be >= 0, got {num_workers}"),
        "image_size": (image_size < 16, f"must be >= 16, got {image_size}"),
        "on_bad": (on_bad not in BAD_POLICIES, f"must be one of {BAD_POLICIES}, got {on_bad!r}"),
    }
    for name, (bad, message) in problems.items():
        if bad:
            raise ValueError(f"CocoDetectionDataModule: {name} {message}")
