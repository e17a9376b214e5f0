"""tools/export_merged.py and tools/lora_summary.py: bad input is one line ``error: ...`` and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
from conftest import load_tool

from visionlora import LoraConfig, inject_lora, save_adapter

EXPORT = load_tool("export_merged")
SUMMARY = load_tool("lora_summary")


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("error: ")
    return line


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    save_adapter(inject_lora(model, LoraConfig(r=2, targets=["conv"])), folder)
    return folder


def _unwritable_targets(tmp_path: Path) -> list[Path]:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    targets = [a_file / "merged"]
    if Path("/proc").is_dir():
        targets.append(Path("/proc/visionlora_export"))
    return targets


def test_an_unwritable_export_target_is_one_line_before_any_work(adapter, tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(EXPORT, "source_from_adapter", no_work)
    for out in _unwritable_targets(tmp_path):
        assert EXPORT.main(["--adapter", str(adapter), "--base", "test_resnet", "--out", str(out)]) == 2
        line = _one_error_line(capsys)
        assert line.startswith(f"error: --out {out}: cannot write there")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "lora.yaml"
    path.write_text(text)
    return str(path)


def test_a_lora_config_typo_names_the_field_and_the_valid_ones(tmp_path, capsys):
    config = _write(tmp_path, "r: 4\nalpah: 8\ntargets: [conv]\n")
    assert SUMMARY.main(["test_resnet", "--config", config]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: {config}: unknown LoraConfig field 'alpah'; valid fields: r, alpha, targets, ")
    assert line.endswith(", form, freeze_A, A_seed")


@pytest.mark.parametrize(("text", "says"), [
    ("r: 0\n", "LoraConfig.r must be a positive integer, got 0"),
    ("- r\n", "a mapping of LoraConfig fields"),
    ("r: [4\n", "not valid YAML"),
])
def test_a_bad_lora_config_is_one_line(tmp_path, capsys, text, says):
    config = _write(tmp_path, text)
    assert SUMMARY.main(["test_resnet", "--config", config]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: {config}: ") and says in line


def test_a_missing_lora_config_and_bad_flags_are_one_line(tmp_path, capsys):
    assert SUMMARY.main(["test_resnet", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert _one_error_line(capsys) == f"error: {tmp_path / 'nope.yaml'}: no such file"
    assert SUMMARY.main(["test_resnet", "--r", "0"]) == 2
    assert _one_error_line(capsys) == "error: LoraConfig.r must be a positive integer, got 0"
    assert SUMMARY.main(["test_resnet", "--targets", "attn-qv"]) == 2  # a ConvNet has no qkv
    assert _one_error_line(capsys).startswith("error: LoraConfig.targets: preset 'attn-qv' matches no ")
    assert SUMMARY.main(["no_such_model"]) == 2
    assert "no_such_model" in _one_error_line(capsys)


def test_lora_summary_still_prints_its_table(capsys):
    assert SUMMARY.main(["test_resnet", "--targets", "conv", "--r", "2", "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "merged vs unmerged" in out and "conv1.0" in out
