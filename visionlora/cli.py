"""The ``tools/train.py`` and ``tools/pretrain.py`` command lines: LightningCLI over LoraClassifier + FewShotDataModule.

A config whose ``model:`` section has a ``detector:`` key runs few-shot detection instead (LoraDetector +
CocoDetectionDataModule, see ``visionlora.cli_detection``).

Every field of the YAML configs under ``configs/`` can be overridden on the command line (``--model.lora.r 16``),
``--print_config`` shows the resolved config, and each run writes a run directory
``<runs_dir>/<run_name>/<timestamp>/`` with the resolved config, metrics CSV, checkpoints, the adapter, a
training-curve PNG, a confusion-matrix PNG and ``results.json``.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path

import timm
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from visionlora.data import FewShotDataModule
from visionlora.lora import lora_state, save_adapter
from visionlora.reporting import format_table, plot_confusion_matrix, plot_training_curves
from visionlora.tasks import LoraClassifier


class VisionLoraCLI(LightningCLI):
    """LightningCLI with run-directory handling, ``num_classes`` linked from the data, and resume by name."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_argument("--run_name", type=str, default="default", help="runs go to <runs_dir>/<run_name>/<time>")
        parser.add_argument("--runs_dir", type=str, default="runs", help="parent folder of all run directories")
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="resume: a checkpoint file, or 'last' for the newest checkpoint of this run_name")
        parser.add_argument("--run_test", type=bool, default=True, help="evaluate on the test split after fitting")
        parser.add_argument("--export_dir", type=str | None, default=None,
                            help="pretraining: also write the fitted backbone here as a timm local-dir folder")

    def before_instantiate_classes(self) -> None:
        config = self.config
        self.run_dir, self.resume_from = resolve_run_dir(Path(config.runs_dir), config.run_name, config.ckpt_path)
        config.trainer.default_root_dir = str(self.run_dir)
        config.data.run_dir = str(self.run_dir)


def resolve_run_dir(runs_dir: Path, run_name: str, ckpt_path: str | None) -> tuple[Path, str | None]:
    """A new timestamped run directory, or the directory of the checkpoint being resumed."""
    if ckpt_path == "last":
        candidates = sorted((runs_dir / run_name).glob("*/checkpoints/last.ckpt"))
        if not candidates:
            raise FileNotFoundError(f"--ckpt_path last: no {runs_dir / run_name}/*/checkpoints/last.ckpt to resume")
        return candidates[-1].parent.parent, str(candidates[-1])
    if ckpt_path:
        path = Path(ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"--ckpt_path: no checkpoint file {path}")
        if path.parent.name == "checkpoints":
            return path.parent.parent, str(path)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return runs_dir / run_name / stamp, ckpt_path


def main(args: list[str] | None = None) -> dict:
    """Parse, fit, test and write the run directory; returns the results row.

    Detection configs (see :func:`is_detection_config`) go to :func:`visionlora.cli_detection.main`.
    """
    if is_detection_config(sys.argv[1:] if args is None else args):
        from visionlora.cli_detection import main as detection_main  # torchvision detectors, only when asked for

        return detection_main(args)
    cli = build_cli(VisionLoraCLI, LoraClassifier, FewShotDataModule, args)
    cli.datamodule.set_data_config(timm.data.resolve_model_data_config(cli.model.model))
    return write_run_outputs(cli, *fit_and_test(cli))


def build_cli(cli_class: type[VisionLoraCLI], model_class, data_class, args: list[str] | None) -> VisionLoraCLI:
    """Parse the arguments into a CLI whose trainer keeps the last checkpoint and logs CSV into the run directory."""
    cli = cli_class(model_class, data_class, run=False, seed_everything_default=0, args=args,
                    save_config_kwargs={"overwrite": True},
                    trainer_defaults={"logger": False, "callbacks": [ModelCheckpoint(save_last=True)]})
    cli.trainer.logger = CSVLogger(save_dir=str(cli.run_dir), name="", version="")
    return cli


def fit_and_test(cli: VisionLoraCLI) -> tuple[dict, float]:
    """Fit (resuming when asked), then test unless ``--run_test false``: the test metrics and the fit seconds."""
    started = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.resume_from)
    seconds = time.perf_counter() - started
    results = {}
    if cli.config.run_test:
        results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=None, verbose=False)[0]
    return results, seconds


def is_detection_config(args: list[str]) -> bool:
    """Whether the ``--config`` YAMLs (or a ``--model.detector`` override) describe a detection model.

    A detection model's section names its ``detector`` (fcos, retinanet, faster_rcnn); a classifier has none.
    """
    if any(arg == "--model.detector" or arg.startswith("--model.detector=") for arg in args):
        return True
    for index, arg in enumerate(args):
        path = args[index + 1] if arg == "--config" and index + 1 < len(args) else None
        path = arg.removeprefix("--config=") if arg.startswith("--config=") else path
        if path is None:
            continue
        if not Path(path).is_file():
            raise FileNotFoundError(f"--config: no such file {path}")
        model = (yaml.safe_load(Path(path).read_text()) or {}).get("model") or {}
        if isinstance(model, dict) and "detector" in (model.get("init_args") or model):
            return True
    return False


def write_run_outputs(cli: VisionLoraCLI, results: dict, seconds: float) -> dict:
    """Adapter, plots, results.json and the printed table (rank 0 only)."""
    model, data, trainer, run_dir = cli.model, cli.datamodule, cli.trainer, cli.run_dir
    if not trainer.is_global_zero:
        return {}
    if lora_state(model.model) is not None:
        save_adapter(model.model, run_dir / "adapter")
    metrics_csv = run_dir / "metrics.csv"
    if metrics_csv.is_file():
        plot_training_curves(metrics_csv, run_dir / "training_curves.png")
    test_results = getattr(model, "test_results", None)
    if test_results is not None and len(data.class_names) <= 50:
        plot_confusion_matrix(test_results["confusion"].numpy(), data.class_names, run_dir / "confusion_matrix.png")
    total = sum(p.numel() for p in model.parameters())
    trainable = model.trainable_parameter_count()
    row = {
        "method": model.hparams.method,
        "backbone": model.hparams.backbone,
        "shots": getattr(data, "shots", None),
        "trainable": trainable,
        "trainable %": 100.0 * trainable / total,
        "test acc": results.get("test/acc", float("nan")),
        "test macro-F1": results.get("test/f1", float("nan")),
        "epochs": trainer.current_epoch,
        "fit seconds": round(seconds, 1),
    }
    if cli.config.export_dir:
        from visionlora.pretrain import export_pretrained  # only pretraining runs need it

        export_pretrained(cli, row, Path(cli.config.export_dir))
    (run_dir / "results.json").write_text(json.dumps(row, indent=2))
    print(f"\nrun directory: {run_dir}\n{format_table([row])}")
    return row
