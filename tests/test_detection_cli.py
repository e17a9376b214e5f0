"""tools/train.py's detection path: config dispatch, every shipped detection YAML builds, an end-to-end run."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from visionlora.cli import main as train_main
from visionlora.cli import task_of
from visionlora.cli.detection import DetectionCLI
from visionlora.data import CocoDetectionDataModule, generate_scenes
from visionlora.tasks import LoraDetector

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "configs" / "detection" / "default.yaml"
BUNDLED = "local-dir:" + str(ROOT / "data" / "weights" / "resnet_shapes")
DETECTION_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml")
                           if task_of(["--config", str(p)]) == "detection")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """A tiny COCO-format folder of 64 px synthetic scenes (the six novel shape classes)."""
    root = tmp_path_factory.mktemp("scenes")
    for split, count in {"train": 16, "val": 4, "test": 4}.items():
        generate_scenes(root, count, image_size=64, seed=0, split=split)
    return root


def tiny(scenes: Path) -> list[str]:
    """Overrides that shrink any detection config to a seconds-long run on ``scenes``."""
    return ["--data.dataset", "coco", "--data.root", str(scenes), "--data.num_workers", "0", "--data.image_size",
            "64", "--data.batch_size", "4", "--data.eval_batch_size", "4", "--model.min_size", "64",
            "--model.max_size", "64", "--model.fpn_channels", "64", *QUIET]


def test_dispatch_reads_the_model_section_of_the_config(tmp_path):
    assert task_of(["--config", str(DEFAULT)]) == "detection"
    assert task_of([f"--config={DEFAULT}"]) == "detection"
    assert task_of(["--model.detector", "retinanet"]) == "detection"
    assert not task_of(["--config", str(ROOT / "configs" / "default.yaml")]) == "detection"
    assert not task_of([]) == "detection"
    nested = tmp_path / "nested.yaml"
    nested.write_text(yaml.safe_dump({"model": {"class_path": "x", "init_args": {"detector": "fcos"}}}))
    assert task_of(["--config", str(nested)]) == "detection"
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        task_of(["--config", str(tmp_path / "missing.yaml")])


def test_shipped_detection_configs_are_found():
    names = {str(p.relative_to(ROOT)) for p in DETECTION_CONFIGS}
    assert {"configs/detection/default.yaml", "configs/detection/resnet50_fcos_lora.yaml",
            "configs/detection/convnext_tiny_fasterrcnn_lora.yaml", "configs/pretrain/resnet_shapes.yaml"} <= names


@pytest.mark.parametrize("config", DETECTION_CONFIGS, ids=[str(p.relative_to(ROOT)) for p in DETECTION_CONFIGS])
def test_every_detection_config_parses_and_builds(config, scenes, tmp_path):
    """Each detection YAML builds its detector, data and trainer (tiny backbone of the same family, no training)."""
    family = "test_convnext" if "convnext" in config.read_text() else "test_resnet"
    args = ["--config", str(config), "--model.backbone", family, "--model.pretrained", "false",
            "--model.pretrained_file", "null", "--model.model_args", "{}", *tiny(scenes), "--runs_dir", str(tmp_path)]
    cli = DetectionCLI(LoraDetector, CocoDetectionDataModule, run=False, args=args)
    wanted = yaml.safe_load(config.read_text())["model"]
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes == 6
    assert cli.model.hparams.detector == wanted["detector"]
    total = sum(p.numel() for p in cli.model.parameters())
    trainable = cli.model.trainable_parameter_count()
    if wanted.get("method", "lora") == "lora":
        lora = sum(p.numel() for n, p in cli.model.named_parameters() if "lora_" in n)
        assert 0 < lora < trainable < total
    else:
        assert trainable > 0


def test_checkpoint_keeps_every_tensor_only_for_a_random_backbone():
    """Trimmed to trained tensors when the frozen backbone can be rebuilt from its weights; whole otherwise."""
    small = dict(fpn_channels=32, min_size=64, max_size=64)
    random_init = LoraDetector("test_resnet", 3, **small)
    checkpoint = {"state_dict": random_init.state_dict()}
    random_init.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == set(random_init.state_dict())
    pretrained = LoraDetector("test_resnet", 3, pretrained_file=BUNDLED, **small)
    checkpoint = {"state_dict": pretrained.state_dict()}
    pretrained.on_save_checkpoint(checkpoint)
    kept = checkpoint["state_dict"]
    assert sum(v.numel() for v in kept.values()) == pretrained.trainable_parameter_count()
    body = [k for k in kept if k.startswith("model.backbone.body.")]
    assert body and all("lora_" in k for k in body)


def test_detection_run_writes_run_directory_and_map(scenes, tmp_path):
    row = train_main(["--config", str(DEFAULT), *tiny(scenes),
                      "--data.shots", "2", "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1",
                      "--runs_dir", str(tmp_path), "--run_name", "t"])
    (run_dir,) = sorted((tmp_path / "t").iterdir())
    for name in ["config.yaml", "metrics.csv", "training_curves.png", "results.json", "fewshot_selection.json",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/README.md",
                 "checkpoints/last.ckpt"]:
        assert (run_dir / name).is_file(), name
    assert "LoRA of the whole detector" in (run_dir / "adapter" / "README.md").read_text()  # the default: adapt all
    results = json.loads((run_dir / "results.json").read_text())
    for key in ("test mAP", "mAP@50", "mAP@75"):
        assert 0.0 <= results[key] <= 1.0 and results[key] == pytest.approx(row[key])
    assert results["method"] == "lora" and results["shots"] == 2 and results["epochs"] == 2
    assert set(results["test AP per class"]) <= {"circle", "square", "triangle", "cross", "ring", "stripes"}
    assert not math.isnan(results["mAP@50"]) and results["mAP@50"] >= results["mAP@75"]
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert sum(v.numel() for v in saved.values()) == row["trainable"]
    with open(run_dir / "metrics.csv", newline="") as handle:
        columns = next(csv.reader(handle))
    assert {"val/map", "val/map_50", "train/loss"} <= set(columns)
    selection = json.loads((run_dir / "fewshot_selection.json").read_text())
    assert selection["shots"] == 2 and all(n <= 2 for n in selection["counts"].values())
