"""Resume never mixes settings: every setting that changes a cell's result is stored in its row and compared.

Item 2 of the benchmark issue: rerunning into the same ``--out`` with another weights file or ``--steps`` printed
"0 cells to run" and published the old numbers under a header naming the new settings.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .conftest import RESNET_DIGITS, ROOT

NCM = ["--methods", "ncm", "--shots", "1", "--seeds", "0", "--no-progress"]


def _rows(out: Path) -> list[dict]:
    with (out / "results.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_each_row_records_the_settings_of_its_cell(tool, tmp_path):
    assert tool.main([*NCM, "--out", str(tmp_path / "out"), "--pretrained-file", RESNET_DIGITS]) == 0
    (row,) = _rows(tmp_path / "out")
    weights = ROOT / "data" / "weights" / "resnet_digits" / "model.safetensors"
    assert row["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert row["pretrained_file"] == RESNET_DIGITS and row["steps"] == "60" and row["batch_size"] == "16"
    assert (row["protocol"], row["dataset"], row["classes"], row["backbone"]) == ("kshot", "digits", "novel",
                                                                                  "test_resnet")
    assert '"image_size": 24' in row["preprocessing"] and '"lr": 0.003' in row["method_spec"]
    assert len(row["settings"]) == 16


def test_other_weights_into_the_same_out_are_refused_naming_old_and_new(tool, tmp_path, capsys):
    out = tmp_path / "out"
    assert tool.main([*NCM, "--out", str(out), "--pretrained-file", RESNET_DIGITS]) == 0
    before, summary = (out / "results.csv").read_bytes(), (out / "summary.md").read_bytes()
    capsys.readouterr()
    other = "local-dir:" + str(ROOT / "data" / "weights" / "resnet_omniglot")
    assert tool.main([*NCM, "--out", str(out), "--pretrained-file", other]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"pretrained_file {RESNET_DIGITS} -> {other}" in lines[0] and "weights_sha256" in lines[0]
    assert str(out / "results.csv") in lines[0] and "--out" in lines[0]
    assert (out / "results.csv").read_bytes() == before and (out / "summary.md").read_bytes() == summary
    assert tool.main([*NCM, "--out", str(tmp_path / "new"), "--pretrained-file", other]) == 0  # a new --out runs


def test_other_steps_into_the_same_out_are_refused(tool, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert tool.main([*NCM, "--out", out, "--pretrained-file", RESNET_DIGITS]) == 0
    capsys.readouterr()
    assert tool.main([*NCM, "--out", out, "--pretrained-file", RESNET_DIGITS, "--steps", "1"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "steps 60 -> 1" in line


def test_same_weights_path_with_changed_content_is_refused(tool, tmp_path, capsys):
    folder = tmp_path / "weights"
    shutil.copytree(ROOT / "data" / "weights" / "resnet_digits", folder)
    out = str(tmp_path / "out")
    assert tool.main([*NCM, "--out", out, "--pretrained-file", f"local-dir:{folder}"]) == 0
    state = load_file(folder / "model.safetensors")
    name = next(n for n, t in state.items() if t.is_floating_point() and not n.startswith("fc."))
    state[name] = state[name] + torch.full_like(state[name], 1e-3)
    save_file(state, folder / "model.safetensors")
    capsys.readouterr()
    assert tool.main([*NCM, "--out", out, "--pretrained-file", f"local-dir:{folder}"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "weights_sha256" in line and "pretrained_file" not in line


def test_the_summary_holds_only_the_cells_of_this_sweep(tool, tmp_path):
    out = str(tmp_path / "out")
    common = ["--shots", "1", "--seeds", "0", "--no-progress", "--out", out, "--pretrained-file", RESNET_DIGITS]
    assert tool.main(["--methods", "ncm", "raw-nn", *common]) == 0
    assert tool.main(["--methods", "ncm", *common]) == 0
    table = (tmp_path / "out" / "summary.md").read_text()
    assert "| ncm |" in table and "raw-nn" not in table
    assert len(_rows(tmp_path / "out")) == 2  # the raw-nn cell stays in results.csv for a later sweep


def test_a_results_file_without_settings_columns_is_refused(tool, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_text(
        "protocol,dataset,backbone,method,ways,shots,trial,accuracy,trainable_params,total_params,seconds\n"
        "kshot,digits,test_resnet,ncm,5,1,0,0.5,485,373173,0.1\n")
    assert tool.main([*NCM, "--out", str(out), "--pretrained-file", RESNET_DIGITS]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert str(out / "results.csv") in line and "settings" in line and "--out" in line
