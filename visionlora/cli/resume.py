"""Resuming a run where it stopped: which checkpoint ``--ckpt_path last`` means, a ``metrics.csv`` that keeps the
rows of the part before the resume, and the global random state an exact continuation needs.

A run killed after the checkpoint of epoch k and resumed from it ends with the same weights and metrics as a run
that was never stopped: Lightning restores the weights, the optimiser, the schedule and the loops; the data module
restores its shuffle and augmentation streams (``FewShotDataModule.state_dict``); :class:`GlobalRandomState`
restores torch's, numpy's and Python's global generators.
"""

from __future__ import annotations

import csv
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from visionlora.files import atomic_write


def newest_checkpoint(run_root: Path) -> Path | None:
    """The checkpoint ``--ckpt_path last`` resumes for the run name whose folder is ``run_root``.

    The newest run directory (timestamps sort by name) that holds a loadable checkpoint, and in it the checkpoint
    with the highest ``global_step`` (then ``epoch``) recorded inside it: a kill between ``epoch=E-step=S.ckpt``
    and ``last.ckpt`` leaves the newer state in the former. Unreadable or truncated files are skipped with a
    warning. None when there is no loadable checkpoint.
    """
    run_dirs = sorted((p for p in run_root.iterdir() if p.is_dir()), reverse=True) if run_root.is_dir() else []
    for run_dir in run_dirs:
        found = []
        for path in sorted((run_dir / "checkpoints").glob("*.ckpt")):
            try:
                found.append((checkpoint_progress(path), path))
            except Exception as error:  # truncated zip, not a checkpoint, unsafe pickle, missing keys: skip it
                first_line = next(iter(str(error).splitlines()), "")
                warnings.warn(f"--ckpt_path last: skipping {path}, not a loadable checkpoint "
                              f"({type(error).__name__}: {first_line})", UserWarning, stacklevel=2)
        if found:
            return max(found)[1]  # on a tie last.ckpt wins by name; both then hold the same state
    return None


def checkpoint_progress(path: Path) -> tuple[int, int]:
    """``(global_step, epoch)`` recorded in a Lightning checkpoint.

    Read with ``torch.load(weights_only=True)`` only (no code from the file runs), memory-mapped so that a large
    checkpoint costs little to inspect. Raises what loading raises, or KeyError for a file without the two fields.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(checkpoint["global_step"]), int(checkpoint["epoch"])


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger writing ``<save_dir>/metrics.csv``, which keeps earlier rows when a run resumes.

    Lightning's own logger deletes an existing ``metrics.csv``; this one keeps its rows logged before
    ``keep_before_step`` (the resumed checkpoint's ``global_step``: rows at later steps are logged again after the
    resume) and appends to them. Rows are written as they are logged, so a killed run loses none.
    """

    def __init__(self, save_dir: str | Path, keep_before_step: int | None = None) -> None:
        super().__init__(save_dir=str(save_dir), name="", version="", flush_logs_every_n_steps=1)
        self.keep_before_step = keep_before_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumedWriter(self.log_dir, self.keep_before_step)
        return self._experiment


class _ResumedWriter(ExperimentWriter):
    def __init__(self, log_dir: str, keep_before_step: int | None) -> None:
        self.keep_before_step = keep_before_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if self.keep_before_step is None or not path.is_file():
            super()._check_log_dir_exists()
            return
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            rows = [row for row in reader if int(float(row["step"])) < self.keep_before_step]
            self.metrics_keys = list(reader.fieldnames or [])

        def write(temporary: str) -> None:
            with open(temporary, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(path, write)


class GlobalRandomState(Callback):
    """Saves torch's (CPU and initialised CUDA), numpy's and Python's global random state with each checkpoint and
    restores it when the resumed run starts training.

    Restored in ``on_train_start``, the last hook before the first batch, so nothing run at setup draws from the
    restored streams. Stored as tensors and plain Python values, so the checkpoint loads with
    ``torch.load(weights_only=True)``. Under DDP the checkpoint holds rank 0's state and every rank gets it back.
    """

    def __init__(self) -> None:
        self._restored: dict | None = None

    def state_dict(self) -> dict:
        numpy_state = np.random.get_state(legacy=False)
        numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
        state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict

    def on_train_start(self, trainer, pl_module) -> None:
        state, self._restored = self._restored, None
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        numpy_state = dict(state["numpy"], state=dict(state["numpy"]["state"]))
        numpy_state["state"]["key"] = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
        np.random.set_state(numpy_state)
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
