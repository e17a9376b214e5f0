"""Export a pretraining run's backbone as a bundled weights folder with a model card.

The bundled backbones exist so that the offline default task fine-tunes a *pretrained* model: LoRA on a randomly
initialised backbone proves nothing. They are trained on data disjoint from the few-shot target classes.
"""

from __future__ import annotations

import hashlib
import shlex
import sys
from pathlib import Path

from visionlora.models import save_backbone


def export_pretrained(cli, row: dict, export_dir: Path) -> Path:
    """Write ``export_dir`` (timm local-dir: config.json + model.safetensors) and its MODEL_CARD.md."""
    model, data = cli.model, cli.datamodule
    prep = data.preprocessing
    size = prep["image_size"]
    data_config = {"input_size": (3, size, size), "mean": prep["mean"], "std": prep["std"],
                   "crop_pct": prep["crop_pct"], "interpolation": prep["interpolation"]}
    save_backbone(model.model, export_dir, data_config=data_config, label_names=data.class_names)
    digest = hashlib.sha256((export_dir / "model.safetensors").read_bytes()).hexdigest()
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
