"""Resume by name: ``--ckpt_path last`` finds the newest loadable checkpoint, and a killed run that is resumed ends
where an uninterrupted one does (weights, test accuracy and metrics.csv)."""

import csv
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

import visionlora.cli.classification as classification_cli
from visionlora.cli import main as train_main
from visionlora.cli.base import resolve_run_dir

ROOT = Path(__file__).resolve().parents[2]
# Stochastic depth draws from torch's global generator in every training step.
TINY_VIT = '{"img_size": 24, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2, "drop_path_rate": 0.2}'
# 2 shots x 5 classes in batches of 4: 3 steps an epoch; a checkpoint after every epoch (validation every epoch).
# The LoRA form is fixed: form="auto" picks each layer's form by timing it, so two runs on a loaded machine could
# compute the same ΔW in different float orders, and the test compares tensors bit for bit.
TINY = ["--config", str(ROOT / "configs" / "default.yaml"), "--model.backbone", "vit_tiny_patch16_224",
        "--model.lora.form", "weight",
        "--model.pretrained_file", "null", "--model.model_args", TINY_VIT, "--data.dataset", "digits",
        "--data.shots", "2", "--data.batch_size", "4", "--data.image_size", "24", "--trainer.max_epochs", "4",
        "--trainer.check_val_every_n_epoch", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--run_name", "t"]
STEPS_PER_EPOCH = 3


class Crash(RuntimeError):
    pass


class CrashAt(L.Callback):
    """Stands in for a kill: raises before the optimiser step of ``batch`` in ``epoch``."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise Crash(f"killed in epoch {self.epoch} at batch {self.batch}")


def _checkpoint(path: Path, epoch: int, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": epoch, "global_step": step, "state_dict": {"w": torch.full((2,), float(step))}}, path)
    return path


class NotPlainData:
    pass


def test_last_is_the_newest_loadable_checkpoint_by_its_recorded_step(tmp_path):
    checkpoints = tmp_path / "t" / "20240101-000000-000000" / "checkpoints"
    _checkpoint(checkpoints / "last.ckpt", 3, 8)  # written before the kill ...
    newest = _checkpoint(checkpoints / "epoch=4-step=10.ckpt", 4, 10)  # ... which came before last.ckpt again
    truncated = checkpoints / "epoch=5-step=12.ckpt"
    truncated.write_bytes(_checkpoint(tmp_path / "whole.ckpt", 5, 12).read_bytes()[:200])
    unsafe = checkpoints / "epoch=6-step=14.ckpt"
    unsafe.write_bytes(pickle.dumps({"epoch": 6, "global_step": 14, "extra": NotPlainData()}))
    with pytest.warns(UserWarning) as caught:
        run_dir, resume_from = resolve_run_dir(tmp_path, "t", "last")
    assert resume_from == str(newest) and run_dir == checkpoints.parent
    messages = "\n".join(str(w.message) for w in caught)
    assert str(truncated) in messages and str(unsafe) in messages


def test_last_without_a_loadable_checkpoint_is_a_clear_error(tmp_path):
    checkpoints = tmp_path / "t" / "20240101-000000-000000" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="last.ckpt"), pytest.raises(FileNotFoundError, match="no loadable"):
        resolve_run_dir(tmp_path, "t", "last")


def _run_dir(runs_dir: Path) -> Path:
    (run_dir,) = sorted((runs_dir / "t").iterdir())
    return run_dir


def _metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def test_killed_and_resumed_run_ends_as_the_uninterrupted_one(tmp_path, monkeypatch):
    whole = train_main([*TINY, "--runs_dir", str(tmp_path / "a")])

    build_cli = classification_cli.build_cli

    def build_with_crash(*args, **kwargs):
        cli = build_cli(*args, **kwargs)
        cli.trainer.callbacks.append(CrashAt(epoch=2, batch=1))
        return cli

    monkeypatch.setattr(classification_cli, "build_cli", build_with_crash)
    with pytest.raises(Crash):
        train_main([*TINY, "--runs_dir", str(tmp_path / "b")])
    monkeypatch.undo()
    killed = _metrics(_run_dir(tmp_path / "b"))
    assert max(int(row["step"]) for row in killed) == 2 * STEPS_PER_EPOCH  # the step redone after the resume
    resumed = train_main([*TINY, "--runs_dir", str(tmp_path / "b"), "--ckpt_path", "last"])

    run_a, run_b = _run_dir(tmp_path / "a"), _run_dir(tmp_path / "b")
    adapter_a, adapter_b = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (run_a, run_b))
    assert adapter_a.keys() == adapter_b.keys() and any("lora_B" in k for k in adapter_a)
    for name, value in adapter_a.items():
        assert torch.equal(value, adapter_b[name]), name
    assert resumed["test acc"] == whole["test acc"] and resumed["epochs"] == whole["epochs"] == 4
    # metrics.csv kept the rows of the first part, without the redone step twice: the very rows of run A.
    rows_a, rows_b = _metrics(run_a), _metrics(run_b)
    assert {int(row["epoch"]) for row in rows_b if row["train/loss"]} == {0, 1, 2, 3}
    assert len([row for row in rows_b if row["train/loss"]]) == 4 * STEPS_PER_EPOCH
    assert rows_b == rows_a
