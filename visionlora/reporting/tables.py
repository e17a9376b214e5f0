"""Tables of a finished run: Lightning's metrics CSV read back as series, and a results table for the terminal."""

from __future__ import annotations

import csv
import math
from pathlib import Path


def read_metrics_csv(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Lightning's CSVLogger file as {metric: [(step, value), ...]} with empty cells skipped."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                series.setdefault(key, []).append((step, float(value)))
    return series


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain-text table: one dict per row, floats to 4 significant places."""
    columns = columns or list(rows[0])
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)
