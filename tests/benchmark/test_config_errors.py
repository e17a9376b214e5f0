"""Bad benchmark settings are one line and exit code 2 before any work; the runs need only all_runs.zip.

Item 17 (benchmark parts) of the issue: a missing Omniglot root was a traceback, a root with only all_runs.zip was
refused, ``--runs 25`` crashed in summary.md, ``--shots 5`` was ignored on the one-shot runs, and ``lora-attn-r2``
on a ResNet failed only when its cell ran.
"""

from __future__ import annotations

import pytest

import visionlora.benchmark.sweep as sweep_module
from visionlora.data import FewShotDataModule

from .conftest import OMNIGLOT_CONFIG, RESNET_DIGITS, character_png


@pytest.fixture
def no_cell(monkeypatch):
    """Fails the test if any cell runs."""
    def run_cell(*args, **kwargs):
        raise AssertionError("a cell ran")

    monkeypatch.setattr(sweep_module, "run_cell", run_cell)


def _refused(tool, capsys, out, args: list[str]) -> str:
    capsys.readouterr()
    assert tool.main([*args, "--out", str(out), "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert not out.exists()
    return lines[0]


def test_a_missing_omniglot_root_is_named(tool, tmp_path, capsys, no_cell):
    line = _refused(tool, capsys, tmp_path / "out", ["--config", OMNIGLOT_CONFIG, "--root", str(tmp_path / "nope")])
    assert str(tmp_path / "nope") in line and "all_runs.zip" in line and "images_background" not in line


def test_a_root_without_the_runs_is_named(tool, tmp_path, capsys, no_cell):
    (tmp_path / "empty").mkdir()
    line = _refused(tool, capsys, tmp_path / "out", ["--config", OMNIGLOT_CONFIG, "--root", str(tmp_path / "empty")])
    assert "all_runs.zip" in line and "images_background" not in line


def test_a_root_holding_only_all_runs_zip_runs_the_runs(tool, tmp_path, runs_root):
    out = tmp_path / "out"
    args = ["--config", OMNIGLOT_CONFIG, "--root", str(runs_root), "--methods", "ncm", "raw-nn", "--runs", "1", "2"]
    assert tool.main([*args, "--out", str(out), "--no-progress"]) == 0
    rows = (out / "results.csv").read_text().splitlines()[1:]
    assert len(rows) == 4 and all(",omniglot,omniglot,test_resnet," in f",{row}" for row in rows)
    assert "| ncm |" in (out / "summary.md").read_text()


@pytest.mark.parametrize("runs", [["25"], ["0"], ["1", "1"]])
def test_runs_must_be_official_run_numbers(tool, tmp_path, capsys, runs_root, runs, no_cell):
    line = _refused(tool, capsys, tmp_path / "out", ["--config", OMNIGLOT_CONFIG, "--root", str(runs_root),
                                                     "--runs", *runs])
    assert "runs" in line and "1..20" in line


def test_the_one_shot_runs_refuse_other_shots(tool, tmp_path, capsys, runs_root, no_cell, monkeypatch):
    line = _refused(tool, capsys, tmp_path / "out", ["--config", OMNIGLOT_CONFIG, "--root", str(runs_root),
                                                     "--shots", "5"])
    assert "shots" in line and "[5]" in line and "omniglot" in line
    out = tmp_path / "ok"
    monkeypatch.undo()
    assert tool.main(["--config", OMNIGLOT_CONFIG, "--root", str(runs_root), "--shots", "1", "--methods", "ncm",
                      "--runs", "3", "--out", str(out), "--no-progress"]) == 0  # [1] is what they are


@pytest.mark.parametrize("args, field", [
    (["--config", OMNIGLOT_CONFIG, "--seeds", "1"], "seeds"),
    (["--config", OMNIGLOT_CONFIG, "--episodes", "3"], "episodes"),
    (["--runs", "1"], "runs"),
    (["--episodes", "3"], "episodes"),
])
def test_fields_the_protocol_does_not_use_are_refused(tool, tmp_path, capsys, runs_root, args, field, no_cell):
    root = ["--root", str(runs_root)] if OMNIGLOT_CONFIG in args else []
    line = _refused(tool, capsys, tmp_path / "out", [*args, *root])
    assert field in line and "not used" in line


def test_attention_only_lora_on_a_resnet_is_refused_before_the_first_cell(tool, tmp_path, capsys, no_cell):
    line = _refused(tool, capsys, tmp_path / "out", ["--methods", "ncm", "lora-attn-r2", "--shots", "1", "--seeds",
                                                     "0", "--pretrained-file", RESNET_DIGITS])
    assert "lora-attn-r2" in line and "test_resnet" in line and "attention" in line


def test_runs_preprocessing_is_the_omniglot_data_modules(tmp_path):
    """The runs need no data module (its class list reads the background archives), but the same preprocessing."""
    from visionlora.benchmark.protocols import runs_preprocessing

    for split in ("images_background_small1", "images_background_small2"):
        (tmp_path / split / "Alpha" / "character01").mkdir(parents=True)
        (tmp_path / split / "Alpha" / "character01" / "0001_01.png").write_bytes(character_png(0))
    backbone = {"input_size": (3, 56, 56), "mean": (0.1, 0.1, 0.1), "std": (0.3, 0.3, 0.3), "crop_pct": 0.9,
                "interpolation": "bicubic", "crop_mode": "center"}
    data = FewShotDataModule(dataset="omniglot", root=str(tmp_path), shots=None)
    data.set_data_config(backbone)
    assert runs_preprocessing(backbone) == data.preprocessing
