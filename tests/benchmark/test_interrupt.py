"""Ctrl-C: exit status 130 and a summary that says at its top how many of the sweep's cells it holds.

Item 4 of the benchmark issue: an interrupted sweep exited 0 and left a summary of 4 of 20 cells with nothing
marking it partial.
"""

from __future__ import annotations

import visionlora.benchmark.sweep as sweep_module

from .conftest import RESNET_DIGITS

ARGS = ["--methods", "ncm", "raw-nn", "--shots", "1", "2", "--seeds", "0", "--no-progress", "--pretrained-file",
        RESNET_DIGITS]


def _interrupt_on_third(monkeypatch) -> list[str]:
    calls, real = [], sweep_module.run_cell

    def run_cell(*args, **kwargs):
        calls.append(args[0].name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "run_cell", run_cell)
    return calls


def test_ctrl_c_exits_130_with_a_summary_marked_partial(tool, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _interrupt_on_third(monkeypatch)
    assert tool.main([*ARGS, "--out", str(out)]) == 130
    summary = (out / "summary.md").read_text().splitlines()
    assert "2 of 4 cells" in summary[0] and "partial" in summary[0].lower()
    assert "2 of 4 cells" in capsys.readouterr().out
    monkeypatch.undo()
    assert tool.main([*ARGS, "--out", str(out)]) == 0  # the same command finishes the sweep
    summary = (out / "summary.md").read_text()
    assert "partial" not in summary.lower() and "4 of 4 cells" not in summary.splitlines()[0]
    assert "| ncm |" in summary and "| raw-nn |" in summary


def test_ctrl_c_before_any_cell_finished_exits_130(tool, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_module, "run_cell", interrupt)
    assert tool.main([*ARGS, "--out", str(tmp_path / "out")]) == 130
    summary = (tmp_path / "out" / "summary.md").read_text().splitlines()
    assert "0 of 4 cells" in summary[0]
    assert not (tmp_path / "out" / "accuracy_vs_shots.png").exists()  # no plot of nothing


def test_the_summary_is_written_atomically(tool, tmp_path, monkeypatch):
    written = []
    real = sweep_module.write_text_atomic

    def spy(path, text):
        written.append(path)
        return real(path, text)

    monkeypatch.setattr(sweep_module, "write_text_atomic", spy)
    assert tool.main([*ARGS, "--out", str(tmp_path / "out")]) == 0
    assert written == [tmp_path / "out" / "summary.md"]
