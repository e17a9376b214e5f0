"""Run directories: each run gets its own, made exclusively."""

from __future__ import annotations

import json
from datetime import datetime

from visionlora.cli import base, main

from .conftest import fast_args, run_dirs

FROZEN = datetime(2024, 1, 2, 3, 4, 5, 678901)


class _FrozenClock(datetime):
    @classmethod
    def now(cls, tz=None):
        return FROZEN


def test_colliding_timestamps_get_separate_run_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "datetime", _FrozenClock)
    first, _ = base.resolve_run_dir(tmp_path, "t", None)
    second, _ = base.resolve_run_dir(tmp_path, "t", None)
    assert first != second and first.is_dir() and second.is_dir()
    assert first.name == "20240102-030405-678901" and second.name == "20240102-030405-678901-1"


def test_two_runs_in_the_same_microsecond_keep_both_results(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "datetime", _FrozenClock)
    rows = [main(fast_args(tmp_path, "--seed_everything", str(seed))) for seed in (0, 1)]
    dirs = run_dirs(tmp_path)
    assert len(dirs) == 2
    for run_dir, row in zip(dirs, rows, strict=True):
        assert (run_dir / "metrics.csv").is_file()
        assert json.loads((run_dir / "results.json").read_text())["trainable"] == row["trainable"]
        assert "seed_everything: " in (run_dir / "config.yaml").read_text()
    seeds = [(d / "config.yaml").read_text().split("seed_everything: ")[1].split("\n")[0] for d in dirs]
    assert seeds == ["0", "1"]
