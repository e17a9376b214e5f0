"""A corrupt results.csv is an error naming the file and line, never averaged, glued onto or decoded blindly.

Item 3 of the benchmark issue: a duplicate row was silently averaged, a line cut by a kill mid-write had the next
row glued onto it (every later run then crashed), and random bytes raised an unnamed UnicodeDecodeError.
"""

from __future__ import annotations

import logging
import re

import pytest

from visionlora.benchmark import ResultsLog
from visionlora.benchmark.results import FIELDS, SETTING_FIELDS, settings_hash

from .conftest import RESNET_DIGITS

NCM = ["--methods", "ncm", "--shots", "1", "--seeds", "0", "1", "--no-progress", "--pretrained-file", RESNET_DIGITS]


def _row(trial: int = 0, **changes) -> dict:
    row = dict(protocol="kshot", dataset="digits", backbone="test_resnet", method="ncm", ways=5, shots=1,
               trial=trial, accuracy=0.5, trainable_params=485, total_params=1000, seconds=0.1)
    settings = {field: "" for field in SETTING_FIELDS} | {
        "protocol": "kshot", "dataset": "digits", "backbone": "test_resnet", "pretrained": "false",
        "preprocessing": "{}", "steps": "60", "batch_size": "16", "warmup_fraction": "0.1", "method_spec": "{}"}
    return row | settings | {"settings": settings_hash(settings)} | changes


@pytest.fixture
def results(tmp_path):
    """A results file of two rows (lines 2 and 3), written by ResultsLog."""
    log = ResultsLog(tmp_path / "results.csv")
    log.append(_row(0))
    log.append(_row(1))
    return log.path


def _lines(path) -> list[str]:
    return path.read_text().splitlines()


def test_rows_end_with_a_newline(results):
    text = results.read_bytes()
    assert text.endswith(b"\n") and text.count(b"\n") == 3 and b"\r" not in text
    assert _lines(results)[0] == ",".join(FIELDS)


def test_a_duplicate_row_is_an_error_naming_both_lines(results):
    with results.open("a") as handle:
        handle.write(_lines(results)[1] + "\n")
    with pytest.raises(ValueError, match=rf"^{results} line 4: .*duplicate of line 2"):
        ResultsLog(results)


def test_a_line_cut_by_a_kill_is_dropped_with_a_warning_and_never_glued(results, caplog):
    with results.open("a") as handle:
        handle.write(_lines(results)[1][:40])  # killed mid-write: no newline
    with caplog.at_level(logging.WARNING):
        log = ResultsLog(results)
    assert [r["trial"] for r in log.rows] == ["0", "1"]
    assert any(str(results) in r.getMessage() and "line 4" in r.getMessage() for r in caplog.records)
    log.append(_row(2))
    lines = _lines(results)
    assert len(lines) == 4 and lines[3] == ",".join(str(v) for v in (_row(2)[f] for f in FIELDS))
    assert [r["trial"] for r in ResultsLog(results).rows] == ["0", "1", "2"]


def test_random_bytes_are_an_error_naming_the_file_and_line(results):
    with results.open("ab") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01garbage\n")
    with pytest.raises(ValueError, match=rf"^{results} line 4: not UTF-8 text"):
        ResultsLog(results)


@pytest.mark.parametrize("line, problem", [
    ("kshot,digits,test_resnet,ncm,5,1,7,0.5", "has 8 fields, expected 24"),
    ("ACCURACY", "accuracy 'abc' is not a number in [0, 1]"),
    ("SETTINGS", "settings column does not match"),
    ("NUL", "unreadable"),
])
def test_a_bad_line_in_the_middle_is_an_error_naming_it(results, line, problem):
    good = _lines(results)
    if line == "ACCURACY":
        line = ",".join(str(v) for v in (_row(5, accuracy="abc")[f] for f in FIELDS))
    elif line == "SETTINGS":
        line = ",".join(str(v) for v in (_row(5, steps=61)[f] for f in FIELDS))
    elif line == "NUL":
        line = good[1].replace("ncm", "n\x00m")
    results.write_text("\n".join([good[0], line, *good[1:]]) + "\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(results))} line 2: .*{re.escape(problem)}"):
        ResultsLog(results)


def test_the_tool_refuses_a_duplicated_row_in_one_line(tool, tmp_path, capsys):
    out = tmp_path / "out"
    assert tool.main([*NCM, "--out", str(out)]) == 0
    lines = (out / "results.csv").read_text().splitlines()
    (out / "results.csv").write_text("\n".join([*lines, lines[1]]) + "\n")
    capsys.readouterr()
    assert tool.main([*NCM, "--out", str(out)]) == 2
    (message,) = capsys.readouterr().err.strip().splitlines()
    assert f"{out / 'results.csv'} line 4" in message and "duplicate of line 2" in message
