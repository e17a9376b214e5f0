"""Benchmark results: one CSV row per finished cell (appended at once, so a rerun skips what is done), summarised
as mean ± 95% confidence interval (Student's t over seeds, episodes or runs) in a Markdown table.

Each row holds the settings its cell was measured under (``SETTING_FIELDS``) and their hash (``settings``), which
is part of the cell's key: a cell measured under other settings is another cell.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path

from scipy import stats

# Every setting a cell's result depends on (see visionlora.benchmark.settings); "settings" is their hash.
SETTING_FIELDS = ("protocol", "dataset", "classes", "root", "backbone", "pretrained", "model_args", "pretrained_file",
                  "weights_sha256", "preprocessing", "steps", "batch_size", "warmup_fraction", "queries", "method_spec")
# The columns of the files written before settings were recorded; still the first columns, in this order.
UNSETTLED_FIELDS = ("protocol", "dataset", "backbone", "method", "ways", "shots", "trial", "accuracy",
                    "trainable_params", "total_params", "seconds")
FIELDS = (*UNSETTLED_FIELDS, "settings", *(f for f in SETTING_FIELDS if f not in UNSETTLED_FIELDS))
KEY_FIELDS = ("settings", "method", "ways", "shots", "trial")
GROUP_FIELDS = ("settings", "protocol", "dataset", "backbone", "method", "ways", "shots")  # one summary entry each
OPTIONAL_FIELDS = ("classes", "root", "model_args", "pretrained_file", "weights_sha256", "queries")  # may be empty


class ResultsLog:
    """Appends cells to ``path`` (CSV, created with a header) and knows which cells are already done."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows = read_rows(self.path) if self.path.is_file() else []
        self._done = {row_key(row): row for row in self.rows}

    def done(self, key: dict) -> bool:
        return row_key(key) in self._done

    def get(self, key: dict) -> dict | None:
        """The stored row of the cell ``key`` names (its ``KEY_FIELDS``), or None."""
        return self._done.get(row_key(key))

    def append(self, row: dict) -> None:
        """Write one row and flush it to disk before returning: an interrupt loses at most the running cell."""
        new_file = not self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            if new_file:
                writer.writeheader()
            writer.writerow({field: row[field] for field in FIELDS})
            handle.flush()
            os.fsync(handle.fileno())
        stored = {field: str(row[field]) for field in FIELDS}
        self.rows.append(stored)
        self._done[row_key(row)] = stored


def read_rows(path: Path) -> list[dict]:
    """The complete rows of a results CSV (a line cut short by a kill mid-write is ignored)."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is not None and tuple(reader.fieldnames) == UNSETTLED_FIELDS:
            raise ValueError(f"{path} was written before each cell's settings were recorded (it has no settings "
                             f"columns), so what its cells were measured under is unknown; pass a new --out")
        if reader.fieldnames is None or tuple(reader.fieldnames) != FIELDS:
            raise ValueError(f"{path}: not a few-shot benchmark results file (header {reader.fieldnames})")
        required = [field for field in FIELDS if field not in OPTIONAL_FIELDS]
        return [row for row in reader if all(row.get(field) not in (None, "") for field in required)]


def row_key(row: dict) -> tuple[str, ...]:
    return tuple(str(row[field]) for field in KEY_FIELDS)


def settings_hash(settings: dict) -> str:
    """16 hex digits of the sha256 of the ``SETTING_FIELDS`` values (as stored: strings)."""
    text = json.dumps([str(settings[field]) for field in SETTING_FIELDS])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its Student-t confidence interval (NaN half-width for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    t = stats.t.ppf(0.5 + confidence / 2, df=len(values) - 1)
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per (settings, protocol, dataset, backbone, method, ways, shots): accuracy mean/CI, params, seconds,
    n. Rows of different settings never share an entry."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[f] for f in GROUP_FIELDS)].append(row)
    summary = []
    for key, members in groups.items():
        mean, half = mean_ci([float(r["accuracy"]) for r in members])
        summary.append(dict(zip(GROUP_FIELDS, key, strict=True)) | {
            "accuracy": mean, "ci95": half, "n": len(members),
            "trainable_params": int(statistics.median(int(r["trainable_params"]) for r in members)),
            "seconds": statistics.fmean(float(r["seconds"]) for r in members)})
    return sorted(summary, key=lambda s: (s["protocol"], s["dataset"], s["backbone"], int(s["ways"]),
                                          int(s["shots"]), s["method"]))


def markdown_table(summary: list[dict], error_rate: bool = False, order: list[str] | None = None) -> str:
    """Methods as rows (in ``order`` when given) and shot counts as columns, ``mean ± CI`` in %, plus parameters
    and seconds per cell."""
    found = list(dict.fromkeys(s["method"] for s in summary))
    methods = [m for m in order or [] if m in found] + [m for m in found if m not in (order or [])]
    shots = sorted({int(s["shots"]) for s in summary})
    cell = {(s["method"], int(s["shots"])): s for s in summary}
    label = "error %" if error_rate else "accuracy %"
    header = ["method", *[f"{k}-shot {label}" for k in shots], "trained params", "s / cell"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        entries = [cell.get((method, k)) for k in shots]
        values = [_format(e, error_rate) for e in entries]
        present = [e for e in entries if e is not None]
        params = f"{present[-1]['trainable_params']:,}"
        seconds = f"{statistics.fmean(e['seconds'] for e in present):.1f}"
        lines.append("| " + " | ".join([method, *values, params, seconds]) + " |")
    return "\n".join(lines)


def _format(entry: dict | None, error_rate: bool) -> str:
    if entry is None:
        return "—"
    value = 100 * (1 - entry["accuracy"]) if error_rate else 100 * entry["accuracy"]
    half = 100 * entry["ci95"]
    return f"{value:.1f}" if math.isnan(half) else f"{value:.1f} ± {half:.1f}"
