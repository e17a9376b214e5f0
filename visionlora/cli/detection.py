"""The detection side of ``tools/train.py`` and ``tools/pretrain.py``: LightningCLI over LoraDetector +
CocoDetectionDataModule.

``visionlora.cli.main`` comes here when the parsed config's ``model:`` section describes a detector (it has a
``detector:`` key). The run directory matches the classifier's (see :mod:`visionlora.cli.base`), with a
training-curve PNG of loss and validation mAP and ``fewshot_selection.json``; the results table gives COCO mAP
(IoU 0.50:0.95), mAP@50 and mAP@75 on the test split, and ``results.json`` also the AP per class.
"""

from __future__ import annotations

from pathlib import Path

from visionlora.data import CocoDetectionDataModule
from visionlora.export.pretrained import export_pretrained_detector
from visionlora.files import write_text_atomic
from visionlora.lora import lora_state, save_adapter
from visionlora.models import detector_config
from visionlora.tasks import LoraDetector

from .base import VisionLoraCLI, build_cli, finish_run, fit_and_test, parameter_share, plot_run_curves, pretrain_command

ADAPTER_README = """This adapter holds the LoRA of {scope} (PEFT layout, paths relative to it).
{rest}
For a standalone detector, merge and export the run: python tools/export_merged.py {run_dir}
"""
# What the adapter covers, per LoraDetector.adapt, and where the rest of the trained tensors are.
ADAPTER_SCOPES = {
    "backbone": ("the timm backbone", "The FPN and the detection head train fully and live in checkpoints/last.ckpt."),
    "backbone+fpn": ("the backbone and FPN (module `backbone`)",
                     "The detection head trains fully and lives in checkpoints/last.ckpt."),
    "all": ("the whole detector", "The new class predictor trains fully and lives in checkpoints/last.ckpt."),
}


class DetectionCLI(VisionLoraCLI):
    """:class:`~visionlora.cli.base.VisionLoraCLI` (run directories, ``num_classes`` link, resume) for detection."""


def main(args: list[str] | dict | None = None) -> dict:
    """Parse, fit, test and write the run directory of a detection config; returns the results row."""
    return run(build(args))


def build(args: list[str] | dict | None) -> DetectionCLI:
    """Parse and build the detector, data and trainer: a bad config raises here, before anything trains."""
    return build_cli(DetectionCLI, LoraDetector, CocoDetectionDataModule, args)


def run(cli: DetectionCLI) -> dict:
    """Fit, test and write the run directory of a built CLI; returns the results row."""
    return write_detection_outputs(cli, *fit_and_test(cli))


def write_detection_outputs(cli: DetectionCLI, results: dict, seconds: float) -> dict:
    """Adapter, training curves, results.json and the printed table (rank 0 only)."""
    model, data, trainer, run_dir = cli.model, cli.datamodule, cli.trainer, cli.run_dir
    if not trainer.is_global_zero:
        return {}
    save_backbone_adapter(model, run_dir)
    plot_run_curves(run_dir, scores=("val/map", "val/map_50"), score_label="mAP", loss_label="detection loss")
    row = results_row(model, data, trainer.current_epoch, results, seconds)
    if cli.config.export_dir:
        export_pretrained_detector(
            model.model, Path(cli.config.export_dir), config=detector_config(model.hparams),
            class_names=data.class_names, image_size=data.image_size, sample_images=data.sample_batch(4),
            dataset=data.dataset, train_images=len(data.split_records("train")), seed=cli.config.seed_everything,
            command=pretrain_command(), epochs=row["epochs"], fit_seconds=row["fit seconds"],
            test_map=row["test mAP"], test_map_50=row["mAP@50"],
        )  # fmt: skip
    return finish_run(run_dir, row, {"test AP per class": per_class_ap(model, data.class_names)})


def results_row(model: LoraDetector, data: CocoDetectionDataModule, epochs: int, results: dict,
                seconds: float) -> dict:
    """The printed and saved summary: method, backbone, shots, trainable parameters and test mAP."""
    trainable, share = parameter_share(model)
    nan = float("nan")
    return {
        "method": model.hparams.method,
        "backbone": model.hparams.backbone,
        "detector": model.hparams.detector,
        "shots": data.shots,
        "trainable": trainable,
        "trainable %": share,
        "test mAP": results.get("test/map", nan),
        "mAP@50": results.get("test/map_50", nan),
        "mAP@75": results.get("test/map_75", nan),
        "epochs": epochs,
        "fit seconds": round(seconds, 1),
    }


def per_class_ap(model: LoraDetector, class_names: list[str]) -> dict[str, float]:
    """Test AP (IoU 0.50:0.95) per class name, from the last test epoch (empty without one)."""
    found = getattr(model, "test_results", None)
    if found is None:
        return {}
    return {class_names[label - 1]: float(ap) for label, ap in zip(found["classes"].tolist(), found["map_per_class"],
                                                                   strict=True) if 1 <= label <= len(class_names)}


def save_backbone_adapter(model: LoraDetector, run_dir: Path) -> None:
    """``adapter/``: the LoRA of the module it was injected into (``adapt``: backbone, backbone+FPN or all), plus a
    README."""
    roots = [m for m in model.model.modules() if lora_state(m) is not None]
    if not roots:
        return
    save_adapter(roots[0], run_dir / "adapter")
    scope, rest = ADAPTER_SCOPES[model.hparams.adapt]
    write_text_atomic(run_dir / "adapter" / "README.md", ADAPTER_README.format(scope=scope, rest=rest, run_dir=run_dir))
