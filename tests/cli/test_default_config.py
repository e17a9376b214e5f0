"""What runs when a command line leaves things out: configs/default.yaml as the base, LoRA targets by family."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from visionlora import LoraConfig
from visionlora.cli import main
from visionlora.lora import lora_layers
from visionlora.tasks import LoraClassifier, LoraDetector

from .conftest import ROOT, run_dirs


def test_flags_without_a_config_override_the_default_config():
    """The README's DDP command without --config, or any single flag, must not train a random ViT instead."""
    done = subprocess.run([sys.executable, "tools/train.py", "--trainer.max_epochs", "5", "--model.lora.r", "3",
                           "--print_config"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    default = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    assert config["model"]["backbone"] == default["model"]["backbone"] == "test_resnet"
    assert config["model"]["pretrained_file"] == default["model"]["pretrained_file"]
    assert config["trainer"]["max_epochs"] == 5 and config["model"]["lora"]["r"] == 3
    assert config["model"]["lora"]["targets"] == default["model"]["lora"]["targets"]
    assert config["data"] == {**config["data"], **default["data"]}


@pytest.mark.parametrize(("backbone", "family", "adapted"), [("test_resnet", ["conv"], "conv1.0"),
                                                             ("test_vit", ["attn"], "blocks.0.attn.qkv")])
def test_classifier_without_lora_targets_follows_the_backbone_family(backbone, family, adapted):
    model = LoraClassifier(backbone, num_classes=3)
    assert model.hparams.lora["targets"] == family
    assert adapted in lora_layers(model.model)


def test_detector_without_lora_targets_follows_the_backbone_family():
    detector = LoraDetector("test_resnet", num_classes=2, min_size=64, max_size=64, fpn_channels=32)
    assert detector.hparams.lora["targets"] == ["conv"]


def _config(tmp_path, lora: dict, backbone: str = "test_resnet") -> str:
    text = yaml.safe_dump({"model": {"backbone": backbone, "model_args": {}, "lora": lora},
                           "data": {"dataset": "digits", "classes": "novel", "shots": 2, "image_size": 32},
                           "trainer": {"max_epochs": 1, "enable_progress_bar": False,
                                       "enable_model_summary": False},
                           "run_test": False, "runs_dir": str(tmp_path), "run_name": "t"})
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_a_lora_section_without_targets_gets_the_family_default(tmp_path):
    """``lora: {r: 2}`` on a ConvNet: LoraConfig's own default (``attn``) adapts nothing there."""
    row = main(["--config", _config(tmp_path, {"r": 2, "alpha": 4})])
    (run_dir,) = run_dirs(tmp_path)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["lora"]["targets"] == ["conv"]
    assert row["trainable"] > 0


def test_targets_given_anywhere_are_kept(tmp_path):
    """Given in the config, or as a flag over a config without them: never replaced by the family default."""
    config = _config(tmp_path, {"r": 2, "targets": ["conv-pointwise"]})
    main(["--config", config])
    main(["--config", _config(tmp_path, {"r": 2}), "--model.lora.targets", "[conv-pointwise]"])
    for run_dir in run_dirs(tmp_path):
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["lora"]["targets"] == ["conv-pointwise"]
    assert LoraConfig(targets=["conv-pointwise"]).targets == ["conv-pointwise"]
