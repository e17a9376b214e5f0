"""Benchmark results: one CSV row per finished cell (appended at once, so a rerun skips what is done), summarised
as mean ± 95% confidence interval (Student's t over seeds, episodes or runs) in a Markdown table.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path

from scipy import stats

FIELDS = ("protocol", "dataset", "backbone", "method", "ways", "shots", "trial", "accuracy", "trainable_params",
          "total_params", "seconds")
KEY_FIELDS = ("protocol", "dataset", "backbone", "method", "ways", "shots", "trial")


class ResultsLog:
    """Appends cells to ``path`` (CSV, created with a header) and knows which cells are already done."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows = read_rows(self.path) if self.path.is_file() else []
        self._done = {row_key(row) for row in self.rows}

    def done(self, key: dict) -> bool:
        return row_key(key) in self._done

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
        self.rows.append({field: str(row[field]) for field in FIELDS})
        self._done.add(row_key(row))


def read_rows(path: Path) -> list[dict]:
    """The complete rows of a results CSV (a line cut short by a kill mid-write is ignored)."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or tuple(reader.fieldnames) != FIELDS:
            raise ValueError(f"{path}: not a few-shot benchmark results file (header {reader.fieldnames})")
        return [row for row in reader if all(row.get(field) not in (None, "") for field in FIELDS)]


def row_key(row: dict) -> tuple[str, ...]:
    return tuple(str(row[field]) for field in KEY_FIELDS)


def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its Student-t confidence interval (NaN half-width for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    t = stats.t.ppf(0.5 + confidence / 2, df=len(values) - 1)
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per (protocol, dataset, backbone, method, ways, shots): accuracy mean/CI, params, seconds, n."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[f] for f in KEY_FIELDS[:-1])].append(row)
    summary = []
    for key, members in groups.items():
        mean, half = mean_ci([float(r["accuracy"]) for r in members])
        summary.append(dict(zip(KEY_FIELDS[:-1], key, strict=True)) | {
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
