"""Export a pretraining run's backbone as a bundled weights folder with a model card.

The bundled backbones exist so that the offline default task fine-tunes a *pretrained* model: LoRA on a randomly
initialised backbone proves nothing. They are trained on data disjoint from the few-shot target classes.
"""

from __future__ import annotations

import hashlib
import shlex
import sys
from pathlib import Path

import timm

from visionlora.models import save_backbone

# Where a detection pretraining export keeps its whole detector, beside the backbone's timm files.
BASE_DETECTOR_DIR = "detector"


def export_pretrained(cli, row: dict, export_dir: Path) -> Path:
    """Write ``export_dir`` (timm local-dir: config.json + model.safetensors) and its MODEL_CARD.md."""
    model, data = cli.model, cli.datamodule
    prep = data.preprocessing
    size = prep["image_size"]
    data_config = {"input_size": (3, size, size), "mean": prep["mean"], "std": prep["std"],
                   "crop_pct": prep["crop_pct"], "interpolation": prep["interpolation"]}
    save_backbone(model.model, export_dir, data_config=data_config, label_names=data.class_names)
    digest = sha256_of(export_dir / "model.safetensors")
    card = MODEL_CARD.format(
        name=export_dir.name,
        architecture=model.hparams.backbone,
        model_args=model.model_args,
        command="python tools/pretrain.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        seed=cli.config.seed_everything,
        classes=summarise_classes(data.class_names),
        dataset=getattr(data, "dataset", "?"),
        accuracy=100 * row["test acc"],
        params=sum(p.numel() for p in model.model.parameters()),
        epochs=row["epochs"],
        size=size,
        mean=data_config["mean"],
        std=data_config["std"],
        sha256=digest,
    )
    (export_dir / "MODEL_CARD.md").write_text(card)
    print(f"exported backbone to {export_dir} (sha256 {digest[:16]}...)")
    return export_dir


def export_pretrained_detector_backbone(cli, row: dict, export_dir: Path) -> Path:
    """Write the backbone of a detection pretraining run as a timm local-dir folder (no head) with MODEL_CARD.md.

    TFA's base training (Wang et al. 2020, arXiv:2003.06957) in the forms this package fine-tunes from: the
    backbone alone (a timm folder) and, in ``detector/``, the whole base detector (see :func:`export_base_detector`).
    """
    model, data = cli.model, cli.datamodule
    h = model.hparams
    plain = backbone_as_timm_model(model.model.backbone.body, h.backbone, h.model_args)
    size = data.image_size
    data_config = {"input_size": (3, size, size), "mean": tuple(h.image_mean), "std": tuple(h.image_std),
                   "crop_pct": 1.0, "interpolation": "bilinear"}
    save_backbone(plain, export_dir, data_config=data_config, model_args=h.model_args or None)
    export_base_detector(model, data, export_dir / BASE_DETECTOR_DIR)
    digest = sha256_of(export_dir / "model.safetensors")
    card = DETECTION_MODEL_CARD.format(
        name=export_dir.name, architecture=h.backbone, model_args=h.model_args or {}, detector=h.detector,
        command="python tools/pretrain.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        seed=cli.config.seed_everything, classes=summarise_classes(data.class_names), dataset=data.dataset,
        train_images=len(data.split_records("train")), map=row["test mAP"], map_50=row["mAP@50"],
        params=sum(p.numel() for p in plain.parameters()), epochs=row["epochs"], seconds=row["fit seconds"],
        size=size, mean=data_config["mean"], std=data_config["std"], sha256=digest,
        detector_sha256=sha256_of(export_dir / BASE_DETECTOR_DIR / "model.safetensors"),
    )  # fmt: skip
    (export_dir / "MODEL_CARD.md").write_text(card)
    print(f"exported backbone to {export_dir} (sha256 {digest[:16]}...)")
    return export_dir


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_base_detector(model, data, folder: Path) -> Path:
    """The whole base detector (backbone, FPN, head) as a merged detector folder, checked by loading it back.

    Few-shot runs start from it with ``base_detector`` (TFA's fine-tuning stage keeps the base FPN and head too).
    """
    from visionlora.export.detection import DetectorSource, export_merged_detector
    from visionlora.tasks.detection import DETECTOR_KWARGS

    config = {k: model.hparams[k] for k in DETECTOR_KWARGS} | {"pretrained": False, "pretrained_file": None}
    source = DetectorSource(model.model.eval(), config, list(data.class_names), data.image_size,
                            data.sample_batch(4), "the pretraining run")
    report = export_merged_detector(source, folder, force=True)
    print(f"exported the base detector to {folder} (relative difference {report.max_rel_diff:.2g})")
    return folder


def backbone_as_timm_model(body, architecture: str, model_args: dict | None):
    """The detector's timm ``features_only`` body as the plain timm model (no classifier) with the same weights.

    The detector's BatchNorm layers are frozen copies without ``num_batches_tracked``; that counter is the only
    tensor allowed to differ.
    """
    plain = timm.create_model(architecture, pretrained=False, num_classes=0, **(model_args or {}))
    missing, unexpected = plain.load_state_dict(body.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"pretrain: the {architecture} detector backbone's tensors do not map onto timm's model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}); only families whose features_only "
                         f"model keeps timm's module names can be exported this way")
    return plain.eval()


def summarise_classes(names: list[str], shown: int = 8) -> str:
    """A readable list of the source classes: all of them when few, else the first ones and a count."""
    if len(names) <= shown:
        return ", ".join(names)
    return f"{', '.join(names[:shown])}, ... ({len(names)} classes)"


MODEL_CARD = """# {name}

A small timm `{architecture}` trained from scratch by visionlora, bundled so the offline default task fine-tunes a
pretrained backbone. Load it without visionlora:
`timm.create_model("local-dir:data/weights/{name}", pretrained=True, num_classes=N)`.

| field | value |
|---|---|
| architecture | `{architecture}` with `{model_args}` |
| parameters | {params:,} |
| recipe | `{command}` |
| seed | {seed} |
| source data | `{dataset}` classes {classes} (the few-shot default uses the other, disjoint classes) |
| epochs | {epochs} |
| input | {size}x{size} RGB, mean {mean}, std {std} |
| test accuracy on the source classes | {accuracy:.2f}% |
| sha256 of model.safetensors | `{sha256}` |

Rerunning the recipe command on the same software versions reproduces these weights (seeded, single process, CPU).
"""


DETECTION_MODEL_CARD = """# {name}

A small timm `{architecture}` backbone, trained from scratch by visionlora as part of a `{detector}` detector on
the embedded *base* shape classes, bundled so the offline few-shot detection default fine-tunes a pretrained
backbone on the disjoint *novel* classes (circle, square, triangle, cross, ring, stripes): TFA's base/novel
protocol (Wang et al. 2020, arXiv:2003.06957). Two forms: this folder is the backbone alone, in timm's local-dir
format: `timm.create_model("local-dir:data/weights/{name}", pretrained=True, num_classes=0)` (add
`features_only=True` for the feature maps); `detector/` is the whole base detector (backbone, FPN and head,
`visionlora.models.detection.load_merged_detector`), which few-shot runs start from with `base_detector`: everything
but the class predictor is loaded, as in TFA's fine-tuning stage.

| field | value |
|---|---|
| architecture | `{architecture}` with `{model_args}` |
| parameters | {params:,} |
| recipe | `{command}` |
| seed | {seed} |
| source data | `{dataset}`: {train_images} training scenes of {classes} (disjoint from the targets) |
| epochs | {epochs} ({seconds:.0f} s of training) |
| input | images of {size} px, mean {mean}, std {std} (the detector normalises) |
| base-class test mAP of the pretraining detector | {map:.3f} (mAP@50 {map_50:.3f}) |
| sha256 of model.safetensors | `{sha256}` |
| sha256 of detector/model.safetensors | `{detector_sha256}` |

Rerunning the recipe command on the same software versions reproduces these weights (seeded, single process, CPU).
"""
