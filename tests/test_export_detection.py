"""Detector export (tools/export_merged.py): merged folders load without LoRA, are checked, atomic, refuse bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_tool
from safetensors.torch import load_file, save_file

from visionlora.cli import main as train_main
from visionlora.data import generate_scenes
from visionlora.export import ExportError, detector_source_from_path, export_merged_detector, source_from_path
from visionlora.export.detection import raw_outputs
from visionlora.lora import lora_layers
from visionlora.models import load_merged_detector

ROOT = Path(__file__).resolve().parents[1]


TOOL = load_tool("export_merged")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A two-epoch LoRA FCOS run from the bundled base detector (the default config: LoRA in every conv) on a tiny
    COCO-format folder (64 px scenes)."""
    scenes = tmp_path_factory.mktemp("scenes")
    for split, count in {"train": 12, "test": 4}.items():
        generate_scenes(scenes, count, image_size=64, seed=0, split=split)
    runs = tmp_path_factory.mktemp("runs")
    train_main(["--config", str(ROOT / "configs" / "detection" / "default.yaml"), "--data.dataset", "coco",
                "--data.root", str(scenes), "--data.image_size", "64",
                "--data.shots", "2", "--data.batch_size", "4", "--model.min_size", "64", "--model.max_size", "64",
                "--model.fpn_channels", "64", "--model.lr", "0.01", "--trainer.max_epochs", "2",
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                "--run_test", "false", "--runs_dir", str(runs), "--run_name", "t"])
    (path,) = sorted((runs / "t").iterdir())
    return path


def test_export_round_trip_in_a_fresh_process(run_dir, tmp_path):
    source = detector_source_from_path(run_dir)
    assert lora_layers(source.model.backbone.body) and len(source.sample_images) == 4
    with torch.no_grad():
        expected = raw_outputs(source.model, source.sample_images)
    out = tmp_path / "merged"
    assert TOOL.main([str(run_dir), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["class_names"] == ["circle", "square", "triangle", "cross", "ring", "stripes"]
    assert config["image_size"] == 64 and config["create_detector"]["pretrained_file"] is None
    report = json.loads((out / "export_report.json").read_text())
    assert report["max_rel_diff"] <= 1e-4 and report["inputs"] == "4 real evaluation images"
    # LoRA changed the backbone: the merged conv weights differ from the bundled pretrained ones.
    merged = load_file(str(out / "model.safetensors"))
    base = load_file(str(ROOT / "data" / "weights" / "resnet_shapes" / "model.safetensors"))
    assert not torch.equal(merged["backbone.body.conv1.0.weight"], base["conv1.0.weight"])
    tensors = {f"image{i}": image.contiguous() for i, image in enumerate(source.sample_images)}
    tensors |= {f"expected{i}": t.contiguous() for i, t in enumerate(expected)}
    save_file(tensors, str(tmp_path / "check.safetensors"))
    script = f"""
import torch
from safetensors.torch import load_file
from visionlora.models import load_merged_detector
data = load_file({str(tmp_path / "check.safetensors")!r})
model = load_merged_detector({str(out)!r})
assert not any("lora" in name for name, _ in model.named_parameters())
assert not any(type(m).__module__.startswith("visionlora.lora") for m in model.modules())
images = [data[f"image{{i}}"] for i in range(4)]
with torch.no_grad():
    batch, _ = model.transform(images)
    maps = list(model.backbone(batch.tensors).values())
    outputs = maps + list(model.head(maps).values())
    worst = max(((o - data[f"expected{{i}}"]).abs().max() / data[f"expected{{i}}"].abs().max()).item()
                for i, o in enumerate(outputs))
    found = model(images)
print(worst, len(outputs), len(found))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    worst, count, images = result.stdout.split()
    assert float(worst) <= 1e-4 and int(count) == len(expected) and int(images) == 4


def test_half_precision_export_within_tolerance(run_dir, tmp_path):
    report = export_merged_detector(detector_source_from_path(run_dir), tmp_path / "fp16", dtype="fp16")
    assert 0 < report.max_rel_diff <= report.tolerance == 2e-2
    assert next(load_merged_detector(tmp_path / "fp16").parameters()).dtype == torch.float16
    # torchvision's NMS has no half-precision CPU kernel: on a CPU the fp16 weights run upcast.
    model = load_merged_detector(tmp_path / "fp16", dtype=torch.float32)
    with torch.no_grad():
        found = model([torch.rand(3, 64, 64)])
    assert set(found[0]) == {"boxes", "scores", "labels"}


def test_existing_output_needs_force(run_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert TOOL.main([str(run_dir), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert TOOL.main([str(run_dir), "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_refuses_wrong_num_classes_onnx_and_classifier_api(run_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert TOOL.main([str(run_dir), "--out", str(out), "--num-classes", "5"]) == 2
    assert "num_classes=6" in capsys.readouterr().err
    assert TOOL.main([str(run_dir), "--out", str(out), "--onnx"]) == 2
    assert "--onnx" in capsys.readouterr().err
    with pytest.raises(ExportError, match="detector"):
        source_from_path(run_dir)
    assert not out.exists()


def test_failed_verification_leaves_nothing(run_dir, tmp_path, capsys):
    out = tmp_path / "exports" / "merged"
    assert TOOL.main([str(run_dir), "--out", str(out), "--dtype", "bf16", "--tolerance", "0"]) == 1
    assert "tolerance" in capsys.readouterr().err
    assert not out.exists() and list((tmp_path / "exports").iterdir()) == []


def test_export_works_from_another_working_directory(run_dir, tmp_path, monkeypatch):
    """The run's relative paths (base_detector, data root) are resolved where the run was trained, not here."""
    monkeypatch.chdir(tmp_path)
    assert TOOL.main([str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    report = json.loads((tmp_path / "merged" / "export_report.json").read_text())
    assert report["inputs"] == "4 real evaluation images"


def test_export_carries_the_dataset_category_ids(run_dir, tmp_path):
    assert TOOL.main([str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["category_ids"] == [1, 2, 3, 4, 5, 6]  # the COCO ids of the scenes' categories, label order
