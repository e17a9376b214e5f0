"""Benchmark results: one CSV row per finished cell (appended at once, so a rerun skips what is done), summarised
as mean ± 95% confidence interval (Student's t over seeds, episodes or runs) in a Markdown table.

Each row holds the settings its cell was measured under (``SETTING_FIELDS``) and their hash (``settings``), which
is part of the cell's key: a cell measured under other settings is another cell.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
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

INTEGER_FIELDS = ("ways", "shots", "trial", "trainable_params", "total_params")

logger = logging.getLogger(__name__)


class ResultsLog:
    """Appends cells to ``path`` (CSV, created with a header) and knows which cells are already done.

    Opening checks the whole file (:func:`read_results`): a bad line is an error naming it. Only a last line
    without its newline, which a kill mid-write leaves, is dropped (with a warning) and cut off before the next
    row is appended, so no row is ever glued onto it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows, self._size = read_results(self.path) if self.path.is_file() else ([], 0)
        self._done = {row_key(row): row for row in self.rows}

    def done(self, key: dict) -> bool:
        return row_key(key) in self._done

    def get(self, key: dict) -> dict | None:
        """The stored row of the cell ``key`` names (its ``KEY_FIELDS``), or None."""
        return self._done.get(row_key(key))

    def append(self, row: dict) -> None:
        """Write one row, newline included, and flush it to disk before returning: an interrupt loses at most the
        running cell."""
        if self.done(row):
            raise ValueError(f"{self.path}: cell {dict(zip(KEY_FIELDS, row_key(row), strict=True))} is already in it")
        stored = {field: str(row[field]) for field in FIELDS}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as handle:
            self._drop_cut_line(handle)
            text = io.StringIO()
            writer = csv.writer(text, lineterminator="\n")
            if self._size == 0:
                writer.writerow(FIELDS)
            writer.writerow([stored[field] for field in FIELDS])
            handle.write(text.getvalue().encode())
            handle.flush()
            os.fsync(handle.fileno())
            self._size = handle.tell()
        self.rows.append(stored)
        self._done[row_key(row)] = stored

    def _drop_cut_line(self, handle) -> None:
        """Cut the file back to its last complete line (what was read), refusing if anything else changed it."""
        size = handle.seek(0, os.SEEK_END)
        if size == self._size:
            return
        with self.path.open("rb") as reader:
            reader.seek(self._size)
            extra = reader.read()
        if size < self._size or b"\n" in extra:
            raise ValueError(f"{self.path} changed while this sweep ran (another run writing into the same --out?)")
        handle.truncate(self._size)


def read_rows(path: Path) -> list[dict]:
    """The rows of a results CSV, checked (see :func:`read_results`)."""
    return read_results(path)[0]


def read_results(path: Path) -> tuple[list[dict], int]:
    """The rows of a results CSV and the size in bytes of its complete lines, every line checked.

    A last line without its newline (a kill mid-write) is dropped with a warning; everything else that is not a
    row this module wrote (bytes that are not UTF-8, a wrong field count or value, a settings hash that does not
    match, the same cell twice) raises.

    Raises:
        ValueError: ``"<path> line <n>: <what is wrong>"``, or naming the header if the file is no results file.
    """
    data = path.read_bytes()
    complete, newline, cut = data.rpartition(b"\n")
    lines = complete.split(b"\n") if newline else []
    if cut:
        logger.warning("%s line %d: dropped, it was cut short (no newline: a run killed while writing it); its cell "
                       "runs again", path, len(lines) + 1)
    if not lines:
        return [], 0
    header = _fields(path, 1, lines[0])
    if tuple(header) == UNSETTLED_FIELDS:
        raise ValueError(f"{path} was written before each cell's settings were recorded (it has no settings "
                         f"columns), so what its cells were measured under is unknown; pass a new --out (or delete "
                         f"the file to measure its cells again)")
    if tuple(header) != FIELDS:
        raise ValueError(f"{path}: not a few-shot benchmark results file (header {header})")
    rows, seen = [], {}
    for number, line in enumerate(lines[1:], start=2):
        row = _checked_row(path, number, _fields(path, number, line))
        first = seen.setdefault(row_key(row), number)
        if first != number:
            raise ValueError(f"{path} line {number}: a duplicate of line {first} (the same cell twice); delete one")
        rows.append(row)
    return rows, len(complete) + 1


def _fields(path: Path, number: int, line: bytes) -> list[str]:
    """One line's CSV fields, or an error naming the line."""
    try:
        text = line.decode("utf-8").removesuffix("\r")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} line {number}: not UTF-8 text (byte 0x{line[error.start]:02x} at column "
                         f"{error.start + 1}); not a results file of this benchmark, or a corrupt one") from None
    if "\x00" in text or not text:
        raise ValueError(f"{path} line {number}: unreadable ({'a NUL byte' if text else 'empty line'})")
    try:
        return next(csv.reader([text], strict=True))
    except csv.Error as error:
        raise ValueError(f"{path} line {number}: unreadable ({error})") from None


def _checked_row(path: Path, number: int, values: list[str]) -> dict:
    where = f"{path} line {number}"
    if len(values) != len(FIELDS):
        raise ValueError(f"{where}: has {len(values)} fields, expected {len(FIELDS)}")
    row = dict(zip(FIELDS, values, strict=True))
    empty = [field for field in FIELDS if field not in OPTIONAL_FIELDS and not row[field]]
    if empty:
        raise ValueError(f"{where}: {empty[0]} is empty")
    for field in INTEGER_FIELDS:
        if not row[field].isdigit():
            raise ValueError(f"{where}: {field} {row[field]!r} is not a whole number")
    if not 0.0 <= _number(row["accuracy"]) <= 1.0:
        raise ValueError(f"{where}: accuracy {row['accuracy']!r} is not a number in [0, 1]")
    if not 0.0 <= _number(row["seconds"]) < math.inf:
        raise ValueError(f"{where}: seconds {row['seconds']!r} is not a number >= 0")
    if row["settings"] != settings_hash(row):
        raise ValueError(f"{where}: its settings column does not match its settings (edited or corrupt)")
    return row


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan  # fails every range check


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
