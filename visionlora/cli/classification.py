"""The classification side of ``tools/train.py`` and ``tools/pretrain.py``: LightningCLI over LoraClassifier +
FewShotDataModule.

Besides the common run outputs (see :mod:`visionlora.cli.base`) a run writes ``confusion_matrix.png`` and
``fewshot_selection.csv``; the results table gives test accuracy and macro-F1.
"""

from __future__ import annotations

from pathlib import Path

import timm

from visionlora.data import FewShotDataModule
from visionlora.export.pretrained import export_pretrained_backbone
from visionlora.lora import lora_state, save_adapter
from visionlora.reporting import plot_confusion_matrix
from visionlora.tasks import LoraClassifier

from .base import (
    VisionLoraCLI,
    build_cli,
    discard_run_dir,
    finish_run,
    fit_and_test,
    parameter_share,
    plot_run_curves,
    pretrain_command,
)

# A confusion matrix of more classes than this is not readable.
MAX_CONFUSION_CLASSES = 50


def main(args: list[str] | dict | None = None) -> dict:
    """Parse, fit, test and write the run directory of a classification config; returns the results row."""
    return run(build(args))


def build(args: list[str] | dict | None) -> VisionLoraCLI:
    """Parse and build the model, data and trainer: a bad config raises here, before anything trains.

    The data's setup (reading the image lists, drawing the shots) runs here too, so that more shots than a class
    has is such an error; Lightning's own call in ``fit`` then finds it done.
    """
    cli = build_cli(VisionLoraCLI, LoraClassifier, FewShotDataModule, args)
    try:
        cli.datamodule.set_data_config(timm.data.resolve_model_data_config(cli.model.model))
        cli.datamodule.setup("fit")
    except BaseException:
        discard_run_dir(cli)
        raise
    return cli


def run(cli: VisionLoraCLI) -> dict:
    """Fit, test and write the run directory of a built CLI; returns the results row."""
    return write_run_outputs(cli, *fit_and_test(cli))


def write_run_outputs(cli: VisionLoraCLI, results: dict, seconds: float) -> dict:
    """Adapter, plots, results.json and the printed table (rank 0 only)."""
    model, data, trainer, run_dir = cli.model, cli.datamodule, cli.trainer, cli.run_dir
    if not trainer.is_global_zero:
        return {}
    if lora_state(model.model) is not None:
        save_adapter(model.model, run_dir / "adapter")
    plot_run_curves(run_dir)
    test_results = getattr(model, "test_results", None)
    if test_results is not None and len(data.class_names) <= MAX_CONFUSION_CLASSES:
        plot_confusion_matrix(test_results["confusion"].numpy(), data.class_names, run_dir / "confusion_matrix.png")
    trainable, share = parameter_share(model)
    row = {
        "method": model.hparams.method,
        "backbone": model.hparams.backbone,
        "shots": getattr(data, "shots", None),
        "trainable": trainable,
        "trainable %": share,
        "test acc": results.get("test/acc", float("nan")),
        "test macro-F1": results.get("test/f1", float("nan")),
        "epochs": trainer.current_epoch,
        "fit seconds": round(seconds, 1),
    }
    if cli.config.export_dir:
        model.bake_cosine_head()  # a plain timm linear head with the cosine head's predictions
        export_pretrained_backbone(
            model.model, Path(cli.config.export_dir), architecture=model.hparams.backbone,
            model_args=model.model_args, class_names=data.class_names, preprocessing=data.preprocessing,
            dataset=getattr(data, "dataset", "?"), seed=cli.config.seed_everything, command=pretrain_command(),
            epochs=row["epochs"], test_accuracy=row["test acc"],
        )  # fmt: skip
    return finish_run(run_dir, row)
