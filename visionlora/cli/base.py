"""What every task's command line shares: the LightningCLI subclass, run directories, fit-and-test, run outputs.

Each run writes a run directory ``<runs_dir>/<run_name>/<timestamp>/`` with the resolved config, the metrics CSV,
checkpoints, the adapter, a training-curve PNG and ``results.json``; the task modules add their own files.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from visionlora.files import write_json_atomic
from visionlora.reporting import format_table, plot_training_curves

from .resume import GlobalRandomState, ResumableCSVLogger, checkpoint_progress, newest_checkpoint

# The top-level options VisionLoraCLI adds to LightningCLI's (trainer, model, data, seed_everything, ...).
RUN_OPTIONS = ("run_name", "runs_dir", "ckpt_path", "run_test", "export_dir")
# Rank 0's run directory (and checkpoint to resume), handed to the DDP processes Lightning starts; see shared_run_dir.
RUN_DIR_ENV = "VISIONLORA_RUN_DIR"


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
        self.run_dir, self.resume_from = shared_run_dir(Path(config.runs_dir), config.run_name, config.ckpt_path)
        config.trainer.default_root_dir = str(self.run_dir)
        config.data.run_dir = str(self.run_dir)


def shared_run_dir(runs_dir: Path, run_name: str, ckpt_path: str | None) -> tuple[Path, str | None]:
    """:func:`resolve_run_dir` on rank 0; every other DDP rank takes rank 0's choice.

    The directory is chosen before the trainer exists, so there is no process group yet to broadcast it. Lightning's
    DDP launcher starts ranks 1.. later, from ``trainer.fit``, as copies of this command line with ``LOCAL_RANK`` set
    and rank 0's environment copied: so rank 0 leaves its choice in ``VISIONLORA_RUN_DIR`` and those ranks read it
    instead of choosing (and creating) directories of their own. A launcher that starts every process itself
    (torchrun, SLURM) is not covered: there each rank would choose its own directory.
    """
    if int(os.environ.get("LOCAL_RANK") or 0) > 0 and RUN_DIR_ENV in os.environ:
        run_dir, resume_from = json.loads(os.environ[RUN_DIR_ENV])
        return Path(run_dir), resume_from
    run_dir, resume_from = resolve_run_dir(runs_dir, run_name, ckpt_path)
    os.environ[RUN_DIR_ENV] = json.dumps([str(run_dir), resume_from])
    return run_dir, resume_from


def resolve_run_dir(runs_dir: Path, run_name: str, ckpt_path: str | None) -> tuple[Path, str | None]:
    """A new timestamped run directory, or the directory of the checkpoint being resumed.

    ``ckpt_path="last"``: the newest loadable checkpoint of ``run_name`` (see :func:`.resume.newest_checkpoint`).
    """
    if ckpt_path == "last":
        newest = newest_checkpoint(runs_dir / run_name)
        if newest is None:
            raise FileNotFoundError(f"--ckpt_path last: no loadable checkpoint {runs_dir / run_name}/*/checkpoints/"
                                    "*.ckpt to resume")
        return newest.parent.parent, str(newest)
    if ckpt_path:
        path = Path(ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"--ckpt_path: no checkpoint file {path}")
        if path.parent.name == "checkpoints":
            return path.parent.parent, str(path)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return runs_dir / run_name / stamp, ckpt_path


def build_cli(cli_class: type[VisionLoraCLI], model_class, data_class, args: list[str] | dict | None
              ) -> VisionLoraCLI:
    """Parse the arguments into a CLI whose trainer keeps the last checkpoint and logs CSV into the run directory.

    Resuming, ``metrics.csv`` keeps its rows from before the checkpoint and the global random state comes back from
    it (see :mod:`.resume`).

    ``args``: a command line (a list), or a config already parsed into a dict (see :func:`visionlora.cli.main`).
    """
    cli = cli_class(model_class, data_class, run=False, seed_everything_default=0, args=args,
                    save_config_kwargs={"overwrite": True},
                    trainer_defaults={"logger": False,
                                      "callbacks": [ModelCheckpoint(save_last=True), GlobalRandomState()]})
    cli.trainer.logger = ResumableCSVLogger(cli.run_dir, keep_before_step=_resumed_step(cli.resume_from))
    return cli


def _resumed_step(resume_from: str | None) -> int | None:
    """The ``global_step`` of the checkpoint being resumed; None when not resuming (or Lightning will say why not)."""
    if resume_from is None:
        return None
    try:
        return checkpoint_progress(Path(resume_from))[0]
    except Exception:  # not loadable with weights_only: trainer.fit loads it its own way, or fails naming it
        return None


def fit_and_test(cli: VisionLoraCLI) -> tuple[dict, float]:
    """Fit (resuming when asked), then test unless ``--run_test false``: the test metrics and the fit seconds."""
    started = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.resume_from)
    seconds = time.perf_counter() - started
    results = {}
    if cli.config.run_test:
        results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=None, verbose=False)[0]
    return results, seconds


def plot_run_curves(run_dir: Path, **labels) -> None:
    """``training_curves.png`` from the run's ``metrics.csv``, when it has one (``labels``: the plot's scores)."""
    metrics_csv = run_dir / "metrics.csv"
    if metrics_csv.is_file():
        plot_training_curves(metrics_csv, run_dir / "training_curves.png", **labels)


def finish_run(run_dir: Path, row: dict, extra: dict | None = None) -> dict:
    """Write ``results.json`` (the row plus ``extra``) and print the results table; returns the row."""
    write_json_atomic(run_dir / "results.json", row | (extra or {}))
    print(f"\nrun directory: {run_dir}\n{format_table([row])}")
    return row


def pretrain_command() -> str:
    """The command that made a bundled backbone, as its model card records it."""
    return "python tools/pretrain.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def parameter_share(module) -> tuple[int, float]:
    """Trainable parameters of a task module and their share of all its parameters, in %."""
    total = sum(p.numel() for p in module.parameters())
    trainable = module.trainable_parameter_count()
    return trainable, 100.0 * trainable / total
