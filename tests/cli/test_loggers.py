"""``--trainer.logger``: the user's loggers get the metrics, and the run directory keeps its own metrics.csv."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from visionlora.cli import main

from .conftest import fast_args, run_dirs

CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"


def _logged_keys(metrics_csv: Path) -> set[str]:
    with metrics_csv.open() as handle:
        return {key for row in csv.DictReader(handle) for key, value in row.items() if value}


def _check_run_dir(runs_dir: Path) -> Path:
    (run_dir,) = run_dirs(runs_dir)
    assert {"train/loss", "train/acc"} <= _logged_keys(run_dir / "metrics.csv")
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()  # still in the run directory, where resume looks
    return run_dir


def test_a_logger_given_on_the_command_line_takes_effect(tmp_path):
    mine = tmp_path / "my_logs"
    main(fast_args(tmp_path / "runs", "--trainer.logger", CSV_LOGGER, "--trainer.logger.save_dir", str(mine),
                   "--trainer.logger.name", "exp"))
    run_dir = _check_run_dir(tmp_path / "runs")
    assert {"train/loss", "train/acc"} <= _logged_keys(mine / "exp" / "version_0" / "metrics.csv")
    assert str(mine) in (run_dir / "config.yaml").read_text()


@pytest.mark.parametrize("count", [1, 2])
def test_a_list_of_loggers_all_take_effect(tmp_path, count):
    loggers = [{"class_path": CSV_LOGGER, "init_args": {"save_dir": str(tmp_path / f"logs{i}"), "name": ""}}
               for i in range(count)]
    main(fast_args(tmp_path / "runs", "--trainer.logger", json.dumps(loggers)))
    _check_run_dir(tmp_path / "runs")
    for i in range(count):
        assert {"train/loss", "train/acc"} <= _logged_keys(tmp_path / f"logs{i}" / "version_0" / "metrics.csv")
