"""The classification task and tools/train.py's code path: run directory, small checkpoints, resume, DDP, configs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentError

from visionlora import LoraConfig
from visionlora.cli import main as train_main
from visionlora.tasks import LoraClassifier

ROOT = Path(__file__).resolve().parents[1]
VIT_DIGITS = "local-dir:" + str(ROOT / "data" / "weights" / "vit_digits")
TINY_VIT = '{"img_size": 24, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}'
FAST = ["--model.backbone", "vit_tiny_patch16_224", "--model.pretrained_file", "null", "--model.model_args",
        TINY_VIT, "--data.dataset", "digits", "--data.shots", "2", "--data.image_size", "24",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1"]


def _run(tmp_path: Path, *extra: str) -> dict:
    return train_main(["--config", str(ROOT / "configs" / "default.yaml"), *FAST, "--runs_dir", str(tmp_path),
                       "--run_name", "t", *extra])


def _run_dir(tmp_path: Path) -> Path:
    (run_dir,) = sorted((tmp_path / "t").iterdir())
    return run_dir


def test_train_writes_run_directory_with_small_checkpoint(tmp_path):
    row = _run(tmp_path, "--trainer.max_epochs", "2", "--model.pretrained_file", VIT_DIGITS, "--model.model_args", "{}")
    run_dir = _run_dir(tmp_path)
    for name in ["config.yaml", "metrics.csv", "training_curves.png", "confusion_matrix.png", "results.json",
                 "fewshot_selection.csv", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "checkpoints/last.ckpt"]:
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "results.json").read_text())["test acc"] == pytest.approx(row["test acc"])
    assert 0.0 <= row["test acc"] <= 1.0 and row["epochs"] == 2
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    saved = checkpoint["state_dict"]
    assert all("lora_" in k or k.startswith("model.head.") for k in saved)
    assert sum(v.numel() for v in saved.values()) == row["trainable"]
    assert len((run_dir / "fewshot_selection.csv").read_text().strip().splitlines()) == 1 + 2 * 5


def test_checkpoint_of_a_random_backbone_keeps_every_tensor(tmp_path):
    """No pretrained weights to rebuild the frozen base from: the checkpoint must hold it, or it is lost."""
    _run(tmp_path, "--trainer.max_epochs", "1", "--run_test", "false")
    saved = torch.load(_run_dir(tmp_path) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    model = LoraClassifier("vit_tiny_patch16_224", 5, model_args=json.loads(TINY_VIT),
                           lora=LoraConfig(targets=["conv"]))
    assert set(saved) == set(model.state_dict())


def test_resume_from_last_checkpoint_completes_training(tmp_path):
    _run(tmp_path, "--trainer.max_epochs", "1", "--run_test", "false")  # as if killed after the first epoch
    first = torch.load(_run_dir(tmp_path) / "checkpoints" / "last.ckpt", weights_only=True)
    row = _run(tmp_path, "--trainer.max_epochs", "3", "--ckpt_path", "last", "--run_test", "false")
    assert len(list((tmp_path / "t").iterdir())) == 1  # resumed in the same run directory
    final = torch.load(_run_dir(tmp_path) / "checkpoints" / "last.ckpt", weights_only=True)
    assert row["epochs"] == 3 and final["global_step"] == 3 * first["global_step"] > 0
    key = next(k for k in final["state_dict"] if "lora_B" in k)
    assert not torch.equal(final["state_dict"][key], first["state_dict"][key])


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no loadable checkpoint .*to resume"):
        _run(tmp_path, "--ckpt_path", "last")


def test_parameter_groups_lora_plus_and_methods():
    args = dict(backbone="vit_tiny_patch16_224", num_classes=3, model_args=json.loads(TINY_VIT))
    model = LoraClassifier(**args, lora=LoraConfig(r=2, targets=["vit-all"]), lr=1e-3, loraplus_lr_ratio=16,
                           head_lr=5e-3, lora_weight_decay=0.1)
    groups = {g["name"]: g for g in model.parameter_groups()}
    assert set(groups) == {"lora_A", "lora_B", "head"}
    assert groups["lora_B"]["lr"] == pytest.approx(0.016) and groups["lora_A"]["lr"] == pytest.approx(1e-3)
    assert groups["lora_A"]["weight_decay"] == 0.1 and groups["head"]["lr"] == 5e-3
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == model.trainable_parameter_count()
    linear = LoraClassifier(**args, method="linear")
    assert linear.trainable_parameter_count() == 32 * 3 + 3
    full = LoraClassifier(**args, method="full")
    assert full.trainable_parameter_count() == sum(p.numel() for p in full.parameters())
    with pytest.raises(ValueError, match="method"):
        LoraClassifier(**args, method="bogus")


def test_unknown_config_key_fails_before_training(tmp_path):
    # main() raises (command_line turns it into one line, tests/cli/test_setup_errors.py); nothing is written.
    with pytest.raises(ArgumentError, match="'rank' is not accepted"):
        _run(tmp_path, "--model.lora.rank", "4")
    assert not (tmp_path / "t").exists()


def test_two_process_ddp_keeps_lora_weights_identical(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_train_script.py"), str(tmp_path)], check=True,
                   env=env, timeout=300, capture_output=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["world_size"] == 2
    assert rank0["lora"].keys() == rank1["lora"].keys() and len(rank0["lora"]) > 0
    for name, value in rank0["lora"].items():
        assert torch.equal(value, rank1["lora"][name]), name
    assert any("lora_B" in n and value.abs().sum() > 0 for n, value in rank0["lora"].items())
    assert rank0["metrics"]["val/loss"] == pytest.approx(rank1["metrics"]["val/loss"])


def _tiny_backbone_for(config: Path) -> list[str]:
    text = config.read_text()
    if "vit" in text.split("backbone:")[1].split("\n")[0]:
        return ["--model.backbone", "vit_tiny_patch16_224", "--model.model_args", TINY_VIT]
    family = "test_convnext" if "convnext" in text else "test_resnet"
    return ["--model.backbone", family, "--model.model_args", "{}"]


# configs/lora holds LoraConfig fragments; detection configs (any with a `detector:`, e.g. the detection
# pretraining one) and benchmark configs have their own tests.
TRAINING_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml")
                          if p.parent.name not in ("lora", "detection", "benchmark")
                          and "detector:" not in p.read_text())


@pytest.mark.parametrize("config", TRAINING_CONFIGS, ids=[str(p.relative_to(ROOT)) for p in TRAINING_CONFIGS])
def test_every_shipped_config_parses_and_builds(config, tmp_path):
    """Each YAML under configs/ builds its model, data and trainer (tiny backbone swapped in, no training)."""
    from visionlora.cli import VisionLoraCLI
    from visionlora.data import FewShotDataModule

    args = ["--config", str(config), *_tiny_backbone_for(config), "--model.pretrained", "false",
            "--model.pretrained_file", "null", "--data.dataset", "digits", "--data.root", "null",
            "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.precision", "32-true", "--runs_dir", str(tmp_path)]
    cli = VisionLoraCLI(LoraClassifier, FewShotDataModule, run=False, args=args)
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes
    assert cli.model.trainable_parameter_count() > 0
    if cli.model.hparams.method == "lora":
        assert cli.model.trainable_parameter_count() < sum(p.numel() for p in cli.model.parameters())
