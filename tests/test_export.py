"""tools/export_merged.py, visionlora.export: merged folders plain timm loads, checked, atomic, refusing bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_tool
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from visionlora.cli import main as train_main
from visionlora.export import (
    ExportError,
    VerificationError,
    compare_outputs,
    export_merged,
    source_from_adapter,
    source_from_path,
)
from visionlora.lora import lora_layers

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = '{"img_size": 24, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}'
COMMON = ["--config", str(ROOT / "configs" / "default.yaml"), "--data.shots", "2", "--trainer.max_epochs", "3",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--run_test", "false"]
FAMILIES = {
    # the bundled pretrained ConvNet (local-dir weights), LoRA in every conv
    "resnet": [],
    # a ViT from scratch, LoRA in fused qkv, proj and the MLP
    "vit": ["--model.backbone", "vit_tiny_patch16_224", "--model.pretrained_file", "null", "--model.model_args",
            TINY_VIT, "--data.image_size", "24", "--model.lora.targets", "[vit-all]"],
}


TOOL = load_tool("export_merged")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def run_dir(request, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp(f"runs_{request.param}")
    train_main([*COMMON, *FAMILIES[request.param], "--runs_dir", str(runs), "--run_name", "t"])
    (path,) = sorted((runs / "t").iterdir())
    return path


def _adapted_outputs(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    source = source_from_path(run_dir)
    with torch.no_grad():
        return source.sample_images, source.model(source.sample_images)


def test_fp32_export_loads_in_a_process_without_visionlora(run_dir, tmp_path):
    images, expected = _adapted_outputs(run_dir)
    assert TOOL.main([str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    save_file({"images": images.contiguous(), "expected": expected.contiguous()}, str(tmp_path / "check.safetensors"))
    script = f"""
import sys, json, timm, torch
from safetensors.torch import load_file
folder = {str(tmp_path / "merged")!r}
data = load_file({str(tmp_path / "check.safetensors")!r})
config = json.load(open(folder + "/config.json"))
args = {{k: v for k, v in config["model_args"].items() if k != "num_classes"}}
by_dir = timm.create_model("local-dir:" + folder, pretrained=True).eval()
n = config["num_classes"]
by_file = timm.create_model(config["architecture"], pretrained=True, num_classes=n,
                            pretrained_cfg_overlay=dict(file=folder + "/model.safetensors", num_classes=n),
                            **args).eval()
plain_keys = set(timm.create_model(config["architecture"], num_classes=config["num_classes"], **args).state_dict())
with torch.no_grad():
    scale = data["expected"].abs().max().item()
    diffs = [(m(data["images"]) - data["expected"]).abs().max().item() / scale for m in (by_dir, by_file)]
print(json.dumps({{"diffs": diffs, "imported": "visionlora" in sys.modules, "labels": config.get("label_names"),
                  "same_keys": plain_keys == set(by_dir.state_dict())}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["imported"] is False
    assert result["same_keys"] is True
    assert max(result["diffs"]) <= 1e-5  # relative: another process may pick other float kernels
    assert result["labels"] == ["5", "6", "7", "8", "9"]


def test_export_is_not_the_base_model(run_dir, tmp_path):
    """The trained LoRA update is really in the written weights: they differ from the base weights."""
    source = source_from_path(run_dir)
    layers = lora_layers(source.model)
    assert layers and any(layer.delta_weight().abs().max() > 0 for layer in layers.values())
    export_merged(source, tmp_path / "merged")
    path, layer = next((p, la) for p, la in layers.items() if la.delta_weight().abs().max() > 0)
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as handle:
        written = handle.get_tensor(f"{path}.weight")
    assert torch.allclose(written, layer.base_layer.weight + layer.delta_weight(), atol=1e-6)
    assert not torch.allclose(written, layer.base_layer.weight, atol=1e-6)


@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_exports_within_tolerance(run_dir, tmp_path, dtype, torch_dtype):
    report = export_merged(source_from_path(run_dir), tmp_path / dtype, dtype=dtype)
    with safe_open(str(tmp_path / dtype / "model.safetensors"), "pt") as handle:
        dtypes = {handle.get_tensor(k).dtype for k in handle.keys()}
    assert dtypes - {torch.int64} == {torch_dtype}  # BatchNorm's num_batches_tracked stays an integer
    assert 0 < report.max_rel_diff <= report.tolerance
    assert json.loads((tmp_path / dtype / "export_report.json").read_text())["max_rel_diff"] == report.max_rel_diff


def test_onnx_export_matches_pytorch(run_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    report = export_merged(source_from_path(run_dir), tmp_path / "merged", onnx=True)
    assert (tmp_path / "merged" / "model.onnx").stat().st_size > 1000
    assert report.onnx_checked and report.onnx_max_rel_diff <= 1e-4


def test_adapter_route_equals_run_route(run_dir):
    """Base weights + adapter folder rebuild the run's model exactly (when the base weights are files, not random)."""
    hparams = _hparams(run_dir)
    source = source_from_adapter(run_dir / "adapter", hparams["backbone"], pretrained_file=hparams["pretrained_file"],
                                 model_args=hparams["model_args"])
    reference = source_from_path(run_dir)
    assert source.num_classes == reference.num_classes == 5
    assert source.architecture == reference.architecture
    abs_diff, _ = compare_outputs(reference.model, source.model, reference.sample_images)
    if hparams["pretrained_file"]:
        assert abs_diff == 0.0
    else:  # a randomly initialised base cannot be rebuilt from an adapter: outputs must differ
        assert abs_diff > 1e-3


def test_failed_check_writes_nothing(run_dir, tmp_path):
    with pytest.raises(VerificationError, match="tolerance"):
        export_merged(source_from_path(run_dir), tmp_path / "merged", dtype="fp16", tolerance=0.0)
    assert list(tmp_path.iterdir()) == []
    assert TOOL.main([str(run_dir), "--out", str(tmp_path / "merged"), "--dtype", "bf16", "--tolerance", "0"]) == 1
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(run_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert TOOL.main([str(run_dir), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert TOOL.main([str(run_dir), "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "export_report.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@pytest.mark.parametrize("case", ["missing run", "not a checkpoint", "wrong num_classes", "wrong architecture",
                                  "adapter head size", "missing adapter"])
def test_bad_input_is_a_one_line_error_and_exit_code_2(run_dir, tmp_path, capsys, case):
    out = tmp_path / "out"
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    argv = {
        "missing run": [str(tmp_path / "nope")],
        "not a checkpoint": [str(tmp_path / "notes.ckpt")],
        "wrong num_classes": [str(run_dir), "--num-classes", "7"],
        "wrong architecture": ["--adapter", str(run_dir / "adapter"), "--base", "test_efficientnet",
                               "--num-classes", "5"],
        "adapter head size": ["--adapter", str(run_dir / "adapter"), "--base", _base(run_dir), "--num-classes", "7",
                              "--model-args", json.dumps(_hparams(run_dir)["model_args"] or {})],
        "missing adapter": ["--adapter", str(tmp_path / "nope"), "--base", "test_resnet"],
    }[case]
    assert TOOL.main([*argv, "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and len(error.splitlines()) == 1
    expected = {"missing run": "nope", "not a checkpoint": "notes.ckpt", "wrong num_classes": "num_classes=5",
                "wrong architecture": "does not fit test_efficientnet", "adapter head size": "7",
                "missing adapter": "adapter_model.safetensors"}[case]
    assert expected in error
    assert not out.exists()


def test_export_refuses_unknown_dtype(run_dir, tmp_path):
    with pytest.raises(ExportError, match="dtype"):
        export_merged(source_from_path(run_dir), tmp_path / "x", dtype="int8")


def _hparams(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]


def _base(run_dir: Path) -> str:
    return _hparams(run_dir)["backbone"]


# Item 5 of the issue: what a client gets from the exported config.json with timm alone is what the run measured.
PHOTO_CLASSES = ("rings", "stripes", "blobs")
PHOTO_SIZES = ((56, 40), (40, 64), (48, 48), (72, 36), (36, 60), (64, 52))  # (width, height), mostly not square


def _photo(kind: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A textured RGB picture of one class (rings, stripes or soft blobs), in a random colour, with noise."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    if kind == "rings":
        pattern = np.sin(np.hypot(x - cx, y - cy) / rng.uniform(1.5, 3.0))
    elif kind == "stripes":
        angle = rng.uniform(0, np.pi)
        pattern = np.sin((x * np.cos(angle) + y * np.sin(angle)) / rng.uniform(1.0, 2.5))
    else:
        pattern = sum(np.exp(-((x - rng.uniform(0, width)) ** 2 + (y - rng.uniform(0, height)) ** 2) / 40.0)
                      for _ in range(4)) * 2 - 1
    colour = rng.uniform(60, 255, 3)
    pixels = 127.5 + 0.5 * pattern[..., None] * colour + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _photo_folder(root: Path, train_per_class: int = 3, test_per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for kind in PHOTO_CLASSES:
        for part, count in (("train", train_per_class), ("test", test_per_class)):
            for i in range(count):
                (root / part / kind).mkdir(parents=True, exist_ok=True)
                _photo(kind, PHOTO_SIZES[i % len(PHOTO_SIZES)], rng).save(root / part / kind / f"{i:02d}.png")
    return root


def test_timm_alone_on_the_exported_config_reproduces_the_run_test_accuracy(tmp_path):
    """A client loading the export with timm and its own transform from config.json counts the run's test hits.

    Also, image for image, the run's test batches and the export check's sample images are exactly what that
    transform makes of the files (PIL bicubic resize, centre crop of the non-square pictures).
    """
    root = _photo_folder(tmp_path / "photos")
    runs = tmp_path / "runs"
    row = train_main(["--config", str(ROOT / "configs" / "default.yaml"), "--data.dataset", "imagefolder",
                      "--data.root", str(root), "--data.shots", "2", "--data.val_fraction", "0",
                      "--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false",
                      "--trainer.enable_model_summary", "false", "--runs_dir", str(runs), "--run_name", "photos"])
    (run_dir,) = sorted((runs / "photos").iterdir())
    assert TOOL.main([str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    script = f"""
import json, sys
from pathlib import Path
import timm, torch
from PIL import Image
from safetensors.torch import save_file
folder, test_root = {str(tmp_path / "merged")!r}, Path({str(root / "test")!r})
model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
names = json.load(open(folder + "/config.json"))["label_names"]
files = [(label, path) for label, name in enumerate(names) for path in sorted((test_root / name).iterdir())]
inputs = torch.stack([transform(Image.open(path).convert("RGB")) for _, path in files])
with torch.no_grad():
    predicted = model(inputs).argmax(1)
correct = int((predicted == torch.tensor([label for label, _ in files])).sum())
save_file({{"inputs": inputs}}, {str(tmp_path / "client.safetensors")!r})
print(json.dumps({{"correct": correct, "n": len(files), "imported": "visionlora" in sys.modules}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, check=True)
    client = json.loads(done.stdout.strip().splitlines()[-1])
    assert client["imported"] is False and client["n"] == 18
    assert client["correct"] == round(row["test acc"] * client["n"])
    assert abs(row["test acc"] * client["n"] - client["correct"]) < 1e-6
    with safe_open(str(tmp_path / "client.safetensors"), "pt") as handle:
        inputs = handle.get_tensor("inputs")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())["pretrained_cfg"]
    assert (config["crop_pct"], config["crop_mode"], config["interpolation"]) == (1.0, "center", "bicubic")
    source = source_from_path(run_dir)
    run_batches = torch.cat([x for x, _ in _run_datamodule(run_dir, source.model).test_dataloader()])
    torch.testing.assert_close(run_batches, inputs, atol=0.0, rtol=0.0)
    in_turn = [label * 6 + rank for rank in range(2) for label in range(3)]  # sample_batch: the classes in turn
    torch.testing.assert_close(source.sample_images, inputs[in_turn], atol=0.0, rtol=0.0)


def _run_datamodule(run_dir: Path, model: torch.nn.Module):
    """The run's data module, rebuilt from its checkpoint, with the backbone's preprocessing as in training."""
    import timm

    from visionlora.data import FewShotDataModule

    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["datamodule_hyper_parameters"]
    data = FewShotDataModule(**{k: v for k, v in saved.items() if not k.startswith("_")} | {"run_dir": None})
    data.set_data_config(timm.data.resolve_model_data_config(model))
    data.setup()
    return data
