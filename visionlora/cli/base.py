"""What every task's command line shares: the LightningCLI subclass, run directories, fit-and-test, run outputs.

Each run writes a run directory ``<runs_dir>/<run_name>/<timestamp>/`` with the resolved config, the metrics CSV,
checkpoints, the adapter, a training-curve PNG and ``results.json``; the task modules add their own files. A run
that fails before its first training step (while building the model, data or trainer, or in the data's setup)
removes the directory it created; a later failure keeps it, checkpoints included, for ``--ckpt_path last``.
Checkpoints are written to a temporary file beside their target and renamed into place.
"""

from __future__ import annotations

import difflib
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import timm
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from visionlora.files import atomic_write, write_json_atomic
from visionlora.models.backbone import resolve_backbone
from visionlora.models.families import architecture_lora_targets
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
        check_backbone(config.model.backbone)
        fill_lora_targets(config.model, self.given)
        self.run_dir, self.resume_from = shared_run_dir(Path(config.runs_dir), config.run_name, config.ckpt_path)
        # Empty and chosen here: made just now for this run (a resumed run's directory holds its checkpoints; other
        # DDP ranks use rank 0's), so ours to remove if the run fails before training.
        self.created_run_dir = not _is_spawned_rank() and not any(self.run_dir.iterdir())
        config.trainer.default_root_dir = str(self.run_dir)
        config.data.run_dir = str(self.run_dir)

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        self._parsed_args = (parser, args)

    def given(self) -> Namespace:
        """Only what the configs and flags set, without the defaults (parsed again, so only when asked for)."""
        parser, args = self._parsed_args
        if isinstance(args, dict):
            return parser.parse_object(args, defaults=False)
        return parser.parse_args(args, defaults=False)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except BaseException:
            discard_run_dir(self)
            raise


def shared_run_dir(runs_dir: Path, run_name: str, ckpt_path: str | None) -> tuple[Path, str | None]:
    """:func:`resolve_run_dir` on rank 0; every other DDP rank takes rank 0's choice.

    The directory is chosen before the trainer exists, so there is no process group yet to broadcast it. Lightning's
    DDP launcher starts ranks 1.. later, from ``trainer.fit``, as copies of this command line with ``LOCAL_RANK`` set
    and rank 0's environment copied: so rank 0 leaves its choice in ``VISIONLORA_RUN_DIR`` and those ranks read it
    instead of choosing (and creating) directories of their own. A launcher that starts every process itself
    (torchrun, SLURM) is not covered: there each rank would choose its own directory.
    """
    if _is_spawned_rank():
        run_dir, resume_from = json.loads(os.environ[RUN_DIR_ENV])
        return Path(run_dir), resume_from
    run_dir, resume_from = resolve_run_dir(runs_dir, run_name, ckpt_path)
    os.environ[RUN_DIR_ENV] = json.dumps([str(run_dir), resume_from])
    return run_dir, resume_from


def _is_spawned_rank() -> bool:
    """A DDP process Lightning started from rank 0's command line (rank 0 left its run directory for it)."""
    return int(os.environ.get("LOCAL_RANK") or 0) > 0 and RUN_DIR_ENV in os.environ


def resolve_run_dir(runs_dir: Path, run_name: str, ckpt_path: str | None) -> tuple[Path, str | None]:
    """A new timestamped run directory (created, see :func:`create_run_dir`), or the directory of the checkpoint
    being resumed.

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
    return create_run_dir(runs_dir / run_name, datetime.now().strftime("%Y%m%d-%H%M%S-%f")), ckpt_path


def check_backbone(name: str) -> None:
    """Raise ValueError for a ``model.backbone`` timm does not know (timm's own error is a RuntimeError deep in
    the model's construction)."""
    if not name.startswith(("hf-hub:", "hf_hub:", "local-dir:")) and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise ValueError(f"model.backbone: {name!r} is not a timm architecture{hint}")


def fill_lora_targets(model: Namespace, given: Callable[[], Namespace]) -> None:
    """A ``model.lora`` section that leaves ``targets`` out gets the backbone family's (``attn`` or ``conv``).

    LoraConfig's own default, ``attn``, adapts nothing in a ConvNet. ``given`` returns what the command line set.
    """
    lora = model.get("lora")
    if model.get("method") != "lora" or not isinstance(lora, Namespace) or given().get("model.lora.targets"):
        return
    architecture, model_args = resolve_backbone(model.backbone, model.get("pretrained_file"), model.get("model_args"))
    lora.targets = architecture_lora_targets(architecture, model_args)


def create_run_dir(parent: Path, stamp: str) -> Path:
    """Create ``parent/stamp`` exclusively; when another run holds that name, ``stamp-1``, ``stamp-2``, ...

    Two runs started in the same microsecond (or on clocks that agree) never share a directory.
    """
    parent.mkdir(parents=True, exist_ok=True)
    path, attempt = parent / stamp, 0
    while True:
        try:
            path.mkdir(exist_ok=False)
            return path
        except FileExistsError:
            attempt += 1
            path = parent / f"{stamp}-{attempt}"


def build_cli(cli_class: type[VisionLoraCLI], model_class, data_class, args: list[str] | dict | None
              ) -> VisionLoraCLI:
    """Parse the arguments into a CLI whose trainer keeps the last checkpoint and logs CSV into the run directory,
    beside any ``--trainer.logger``.

    Resuming, ``metrics.csv`` keeps its rows from before the checkpoint and the global random state comes back from
    it (see :mod:`.resume`).

    ``args``: a command line (a list), or a config already parsed into a dict (see :func:`visionlora.cli.main`).
    """
    # exit_on_error=False: a key or value the parser refuses raises (one line from command_line), not usage + exit.
    cli = cli_class(model_class, data_class, run=False, seed_everything_default=0, args=args,
                    parser_kwargs={"exit_on_error": False}, save_config_kwargs={"overwrite": True},
                    trainer_defaults={"logger": False,
                                      "callbacks": [ModelCheckpoint(save_last=True), GlobalRandomState()]})
    # The run directory's metrics.csv (the plots read it) joins the user's --trainer.logger, first: Lightning puts
    # checkpoints and config.yaml in the first logger's folder, and resume looks for them in the run directory.
    own = ResumableCSVLogger(cli.run_dir, keep_before_step=_resumed_step(cli.resume_from))
    cli.trainer.loggers = [own, *cli.trainer.loggers]
    strategy = cli.trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default: not a writer the user chose
        strategy.checkpoint_io = AtomicCheckpointIO()
    return cli


def _resumed_step(resume_from: str | None) -> int | None:
    """The ``global_step`` of the checkpoint being resumed; None when not resuming (or Lightning will say why not)."""
    if resume_from is None:
        return None
    try:
        return checkpoint_progress(Path(resume_from))[0]
    except Exception:  # not loadable with weights_only: trainer.fit loads it its own way, or fails naming it
        return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint files, written to a temporary file beside the target and renamed into place.

    Lightning's own writer stages the file in $TMPDIR (an fsspec transaction): a killed run leaves it there, and
    where $TMPDIR is another file system the final move is a copy that a kill leaves half-written at the target.
    Here a failure removes the temporary file and a kill leaves it beside the checkpoint, in the run directory.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):  # remote targets: Lightning's fsspec writer
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_write(path, lambda temporary: torch.save(checkpoint, temporary))


def fit_and_test(cli: VisionLoraCLI) -> tuple[dict, float]:
    """Fit (resuming when asked), then test unless ``--run_test false``: the test metrics and the fit seconds."""
    started = time.perf_counter()
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.resume_from)
    except BaseException:
        if cli.trainer.global_step == 0:  # nothing trained: the run directory holds nothing worth keeping
            discard_run_dir(cli)
        raise
    seconds = time.perf_counter() - started
    results = {}
    if cli.config.run_test:
        results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=None, verbose=False)[0]
    return results, seconds


def discard_run_dir(cli: VisionLoraCLI) -> None:
    """Remove the run directory of a failed run if this run created it (and its run-name folder, if now empty)."""
    run_dir = getattr(cli, "run_dir", None)
    if run_dir is None or not getattr(cli, "created_run_dir", False):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    try:
        run_dir.parent.rmdir()
    except OSError:  # other runs of this name live there
        pass


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
