"""Rank report: singular values of ΔW, effective ranks, suggested ranks, and tools/rank_report.py."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from conftest import create_model, load_tool, randomize_lora
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from visionlora.lora import LoraConfig, LoraConv2d, LoraLinear, inject_lora, lora_layers, save_adapter
from visionlora.lora.linear import LoraFusedQKV
from visionlora.lora.rank import (
    effective_rank,
    lowrank_singular_values,
    rank_report,
    rank_report_from_adapter,
    suggest_rank,
)
from visionlora.reporting import plot_rank_spectra


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))).Q


def _adapted(name: str, **config) -> nn.Module:
    model = create_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inject_lora(model, LoraConfig(**{"r": 4, "alpha": 8.0, **config}))
    randomize_lora(model)
    return model


def _dense_spectra(model: nn.Module) -> dict[str, torch.Tensor]:
    """svdvals of each update's dense ΔW (a qkv slice: its rows; a conv: out × in/groups·kh·kw), float64."""
    spectra = {}
    for path, layer in lora_layers(model).items():
        delta = layer.delta_weight().detach().double()
        delta = delta.reshape(delta.shape[0], -1)
        if isinstance(layer, LoraFusedQKV):
            for pair, name in zip(layer.factors(), layer.lora_slices.slices, strict=True):
                spectra[f"{path}@{name}"] = torch.linalg.svdvals(delta[pair.rows])
        else:
            spectra[path] = torch.linalg.svdvals(delta)
    return spectra


def test_known_spectrum_gives_its_singular_values_and_effective_ranks():
    layer = LoraLinear(nn.Linear(12, 10), rank=4, scale=2.0)
    with torch.no_grad():  # B·A = U·diag(4, 2, 1, 0.5)·Vᵀ with orthonormal U (10×4) and V (12×4)
        layer.lora_B.copy_(_orthonormal(10, 4, 0) * torch.tensor([4.0, 2.0, 1.0, 0.5]))
        layer.lora_A.copy_(_orthonormal(12, 4, 1).T)
    model = nn.Sequential(layer)
    row = rank_report(model).rows[0]
    assert (row.path, row.kind, row.rank, row.shape, row.scale) == ("0", "linear", 4, (10, 12), 2.0)
    assert row.singular_values == pytest.approx([8.0, 4.0, 2.0, 1.0], rel=1e-6)  # scale · (4, 2, 1, 0.5)
    # Energies 64, 16, 4, 1 of 85: cumulative 0.753, 0.941, 0.988, 1.
    assert row.effective_ranks == {0.9: 2, 0.99: 4}
    assert row.suggested_rank == 2
    assert row.normalised == pytest.approx([8 / math.sqrt(85), 4 / math.sqrt(85), 2 / math.sqrt(85), 1 / math.sqrt(85)])
    other = rank_report(model, energies=(0.75, 0.95)).rows[0]
    assert other.effective_ranks == {0.75: 1, 0.95: 3}
    assert other.suggested_rank == 1
    report = rank_report(model)
    assert report.summary() == {"layers": 1, "lower_rank": 1, "saturated": 0, "zero": 0, "lora_params": 88,
                                "suggested_params": 44, "params_saved": 44}  # 4·(10 + 12) → 2·(10 + 12)
    assert "1 of 1 updates could use a lower rank, saving 44 of 88 LoRA parameters (50.0%)" in str(report)


@pytest.mark.parametrize("shape", [(30, 5, 40), (3, 5, 7), (9, 9, 9)])
def test_qr_core_equals_dense_svd(shape):
    m, k, n = shape
    generator = torch.Generator().manual_seed(0)
    b, a = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator)
    dense = torch.linalg.svdvals(b.double() @ a.double())
    core = lowrank_singular_values(b, a)
    assert core.dtype == torch.float64 and core.shape == (min(m, n, k),)
    torch.testing.assert_close(core, dense[: min(m, n, k)], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name, targets, rows, example", [
    ("test_vit", ["vit-all"], 36, ("blocks.0.attn.qkv@v", "qkv", (64, 64))),  # a q/k/v slice is its own row
    ("test_resnet", ["conv"], 15, ("layer1.0.conv2", "conv", (32, 32 * 3 * 3))),  # out × in·kh·kw
])
def test_report_equals_dense_svd_of_delta_weight(name, targets, rows, example):
    model = _adapted(name, targets=targets)
    report = rank_report(model)
    dense = _dense_spectra(model)
    assert [r.path for r in report.rows] == list(dense) and len(report.rows) == rows
    for row in report.rows:
        expected = dense[row.path]
        assert len(row.singular_values) == min(row.rank, *row.shape)
        torch.testing.assert_close(torch.tensor(row.singular_values, dtype=torch.float64),
                                   expected[: len(row.singular_values)], rtol=1e-5, atol=1e-6 * expected[0])
        rest = expected[len(row.singular_values) :]
        assert rest.numel() == 0 or rest.max() < 1e-5 * expected[0]  # rank ≤ r: the dense rest is round-off
    assert example in [(r.path, r.kind, r.shape) for r in report.rows]


def test_grouped_convs_use_the_flattened_delta_weight():
    wide = LoraConv2d(nn.Conv2d(8, 32, 3, groups=2), rank=2, scale=1.5)  # groups·r = 4 < 32: QR core
    narrow = LoraConv2d(nn.Conv2d(8, 16, 1, groups=4), rank=1, scale=0.5)  # groups·r = 4 ≥ fan-in 2: dense
    model = nn.ModuleDict({"wide": wide, "narrow": narrow})
    randomize_lora(model, std=0.3)
    report = rank_report(model)
    dense = _dense_spectra(model)
    lengths = {r.path: len(r.singular_values) for r in report.rows}
    assert lengths == {"wide": 4, "narrow": 2}
    assert [r.shape for r in report.rows] == [(32, 36), (16, 2)]
    assert [r.params_per_rank for r in report.rows] == [32 + 2 * 36, 16 + 4 * 2]
    for row in report.rows:
        torch.testing.assert_close(torch.tensor(row.singular_values, dtype=torch.float64),
                                   dense[row.path][: len(row.singular_values)], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("init, rank", [("default", 4), ("pissa", 8)])
def test_zero_update_at_init_has_effective_rank_zero(init, rank, tmp_path):
    model = create_model("test_vit")
    inject_lora(model, LoraConfig(r=4, targets=["attn"], init=init))  # PiSSA: B·A − B0·A0 = 0, rank 2r
    report = rank_report(model)
    assert len(report.rows) == 24  # 6 blocks: q, k, v and proj
    for row in report.rows:
        assert row.rank == rank and row.singular_values == [0.0] * rank
        assert row.effective_ranks == {0.9: 0, 0.99: 0} and row.suggested_rank == 1
        assert row.normalised == [0.0] * rank
    json.dumps(report.to_dict(), allow_nan=False)  # no NaN anywhere
    assert report.summary()["zero"] == 24 and report.summary()["saturated"] == 0
    assert "24 have ΔW = 0" in str(report)
    assert plot_rank_spectra(report, tmp_path / "zero.png").read_bytes()[:4] == b"\x89PNG"


def _assert_rows_match(saved: list[dict], report) -> None:
    expected = report.to_dict()["rows"]
    assert [r["path"] for r in saved] == [r["path"] for r in expected]
    for got, want in zip(saved, expected, strict=True):
        assert (got["rank"], got["effective_ranks"], got["suggested_rank"]) == (
            want["rank"], want["effective_ranks"], want["suggested_rank"])
        assert got["singular_values"] == pytest.approx(want["singular_values"], rel=1e-9, abs=1e-12)


def test_cli_on_a_run_directory_matches_the_in_memory_report(tmp_path, capsys):
    model = _adapted("test_vit", targets=["attn-qv", r"blocks\.\d+\.mlp\.fc1"], rank_pattern={r"blocks\.0\..*": 8})
    run = tmp_path / "run"
    save_adapter(model, run / "adapter")
    assert load_tool("rank_report").main([str(run)]) == 0
    report = rank_report(model)
    saved = json.loads((run / "rank_report.json").read_text())
    assert len(saved["rows"]) == 18 and saved["rows"][0]["path"] == "blocks.0.attn.qkv@q"
    assert saved["rows"][0]["rank"] == 8 and saved["rows"][3]["rank"] == 4
    _assert_rows_match(saved["rows"], report)
    assert saved["summary"] == report.summary() and saved["energies"] == [0.9, 0.99]
    assert (run / "rank_spectra.png").read_bytes()[:4] == b"\x89PNG"
    assert "blocks.5.mlp.fc1" in capsys.readouterr().out


def test_cli_reads_a_peft_adapter_without_our_metadata(tmp_path):
    model = _adapted("test_resnet", targets=["conv"], rank_pattern={r"layer4\..*": 2}, use_rslora=True)
    save_adapter(model, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    save_file(tensors, str(weights), metadata={"format": "pt"})  # as PEFT writes it: no "visionlora" key
    out = str(tmp_path / "out")
    assert load_tool("rank_report").main([str(tmp_path / "adapter"), "--out", out, "--energies", "0.8"]) == 0
    saved = json.loads((tmp_path / "out" / "rank_report.json").read_text())
    _assert_rows_match(saved["rows"], rank_report(model, energies=(0.8,)))
    assert [r["rank"] for r in saved["rows"]][-3:] == [2, 2, 2]
    assert rank_report_from_adapter(tmp_path / "adapter").rows[0].scale == pytest.approx(8 / 4**0.5)


def test_cli_errors_name_the_path_and_exit_2(tmp_path, capsys):
    tool = load_tool("rank_report")
    missing = tmp_path / "nope"
    assert tool.main([str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert tool.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path) in err and "adapter_config.json" in err
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert tool.main([str(tmp_path)]) == 2
    assert str(tmp_path / "adapter" / "adapter_model.safetensors") in capsys.readouterr().err


@pytest.mark.parametrize("effective, rank, suggested", [
    (0, 8, 1), (1, 8, 1), (2, 8, 2), (3, 8, 4), (4, 8, 4), (5, 8, 8), (8, 8, 8), (9, 8, 8), (3, 6, 4), (5, 6, 6),
    (17, 64, 32),
])
def test_suggested_rank_rounds_up_to_a_power_of_two_capped_at_r(effective, rank, suggested):
    assert suggest_rank(effective, rank) == suggested


@pytest.mark.parametrize("values, energy, expected", [
    ([1, 1, 1, 1], 0.75, 3), ([1, 1, 1, 1], 0.9, 4), ([3, 1], 0.9, 1), ([3, 1], 0.95, 2), ([1, 3], 0.9, 1),
    ([2, 0, 0], 0.99, 1), ([0, 0], 0.9, 0), ([4, 2, 1, 0.5], 1.0, 4),
])
def test_effective_rank_on_handcrafted_spectra(values, energy, expected):
    assert effective_rank(values, energy) == expected


def test_energies_must_be_fractions():
    with pytest.raises(ValueError, match="energies"):
        rank_report(nn.Sequential(), energies=(0.9, 1.5))
