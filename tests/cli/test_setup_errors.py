"""A bad config is one line ``error: ...`` and exit code 2 before anything runs; a failure in training keeps its
traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from visionlora.cli import command_line
from visionlora.tasks import LoraClassifier

from .conftest import ROOT, fast_args, run_dirs

OMNIGLOT_PRETRAIN = str(ROOT / "configs" / "pretrain" / "resnet_omniglot.yaml")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert err.rstrip().endswith(line)
    return line


@pytest.mark.parametrize(("flags", "says"), [
    (["--model.lora.r", "0"], "error: LoraConfig.r must be a positive integer, got 0"),
    (["--model.lora.targets", "[nosuch]"], "'nosuch'"),
    (["--model.lora.dropout", "1.5"], "error: LoraConfig.dropout must be in [0, 1), got 1.5"),
    (["--model.method", "bogus"], "error: method must be one of ('lora', 'full', 'linear'), got 'bogus'"),
    (["--model.pretrained_file", "no/such/weights.safetensors"], "no/such/weights.safetensors"),
    (["--data.shots", "1000"], "error: sample_k_shot: fewer than k=1000 images in class '5'"),
    (["--model.backbone", "vit_tiny_patch16"], "error: model.backbone: 'vit_tiny_patch16' is not a timm architecture; "
                                               "similar: "),
], ids=["r", "targets", "dropout", "method", "weights", "shots", "backbone"])
def test_a_bad_value_is_one_line_and_exit_code_2(tmp_path, capsys, flags, says):
    assert command_line(fast_args(tmp_path, *flags)) == 2
    assert says in _error_line(capsys)
    assert run_dirs(tmp_path) == []


def test_a_missing_data_root_is_one_line_and_nothing_is_written(tmp_path, capsys):
    export = tmp_path / "exported"
    argv = ["--config", OMNIGLOT_PRETRAIN, "--runs_dir", str(tmp_path / "runs"), "--export_dir", str(export)]
    assert command_line(argv) == 2
    line = _error_line(capsys)
    assert line.startswith("error: FewShotDataModule: root is required for 'omniglot'")
    assert not (tmp_path / "runs" / "pretrain_resnet_omniglot").exists() and not export.exists()


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    assert command_line(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert _error_line(capsys) == f"error: --config: no such file {tmp_path / 'nope.yaml'}"


def test_an_error_inside_training_keeps_its_traceback(tmp_path, monkeypatch):
    def failing_step(self, batch, batch_idx):
        raise ValueError("a bug in a training step")

    monkeypatch.setattr(LoraClassifier, "training_step", failing_step)
    with pytest.raises(ValueError, match="a bug in a training step"):
        command_line(fast_args(tmp_path))


@pytest.mark.parametrize(("tool", "flags", "says"), [
    ("tools/train.py", ["--model.lora.r", "0"], "error: LoraConfig.r must be a positive integer, got 0"),
    ("tools/pretrain.py", ["--config", OMNIGLOT_PRETRAIN], "error: FewShotDataModule: root is required"),
])
def test_the_tools_exit_2_with_one_line(tmp_path, tool, flags, says):
    done = subprocess.run([sys.executable, tool, *flags, "--runs_dir", str(tmp_path)], cwd=ROOT, text=True,
                          capture_output=True, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(says)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("flags", "says"), [
    (["--model.bogus", "3"], "error: unrecognized arguments: --model.bogus 3"),
    (["--trainer.max_epochs", "many"], "error: --trainer.max_epochs: expected int, got many"),
    (["--model.lora.r", "zero"], "error: --model.lora.r: expected int, got zero"),
    (["--model.lora.rank", "3"], "error: --model.lora.rank: no such option (--help lists every option)"),
], ids=["unknown key", "bad type", "bad nested type", "unknown nested key"])
def test_an_unknown_key_or_a_wrong_type_is_one_line_without_the_usage(tmp_path, capsys, flags, says):
    assert command_line(fast_args(tmp_path, *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(says) and "\n" not in err, err[:2000]
    assert run_dirs(tmp_path) == []
