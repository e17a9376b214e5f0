"""Plots of a finished run, written as PNG files: training curves, confusion matrix, LoRA rank spectra."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # headless: runs write PNG files, nothing is shown
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from visionlora.files import atomic_write  # noqa: E402

from .tables import read_metrics_csv  # noqa: E402

if TYPE_CHECKING:
    from visionlora.lora.rank import RankReport


def plot_training_curves(metrics_csv: str | Path, out_png: str | Path,
                         scores: tuple[str, ...] = ("train/acc", "val/acc"), score_label: str = "accuracy",
                         loss_label: str = "cross-entropy") -> Path:
    """Loss (left) and a 0..1 score (right; accuracy, or mAP for detection) against the optimiser step."""
    series = read_metrics_csv(metrics_csv)
    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    keys = [("train/loss", loss_axis), ("val/loss", loss_axis)] + [(key, acc_axis) for key in scores]
    for key, axis in keys:
        if key in series:
            steps, values = zip(*series[key], strict=True)
            axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
    loss_axis.set(xlabel="step", ylabel=loss_label, title="loss")
    acc_axis.set(xlabel="step", ylabel=score_label, title=score_label, ylim=(0, 1.02))
    for axis in (loss_axis, acc_axis):
        axis.grid(alpha=0.3)
        if axis.has_data():
            axis.legend()
    return save_figure(figure, out_png)


def plot_confusion_matrix(confusion: np.ndarray, class_names: list[str], out_png: str | Path) -> Path:
    """Row-normalised confusion matrix (rows: true class) with counts in the cells."""
    confusion = np.asarray(confusion)
    totals = confusion.sum(axis=1, keepdims=True).clip(min=1)
    size = max(4.0, 0.45 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(confusion / totals, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(class_names))
    axis.set_xticks(ticks, class_names, rotation=45, ha="right")
    axis.set_yticks(ticks, class_names)
    axis.set(xlabel="predicted", ylabel="true", title="test confusion matrix")
    if len(class_names) <= 30:
        for (row, col), count in np.ndenumerate(confusion):
            colour = "white" if confusion[row, col] / totals[row, 0] > 0.5 else "black"
            axis.text(col, row, str(int(count)), ha="center", va="center", fontsize=8, color=colour)
    return save_figure(figure, out_png)


def save_figure(figure, out_png: str | Path) -> Path:
    """Write ``figure`` as a PNG atomically (temporary file, then rename) and close it."""
    figure.tight_layout()
    try:
        return atomic_write(out_png, lambda temporary: figure.savefig(temporary, dpi=120, format="png"))
    finally:
        plt.close(figure)


def plot_rank_spectra(report: RankReport, out_png: str | Path) -> Path:
    """Each LoRA update's normalised singular values (left, log scale) and cumulative energy (right) against k.

    One line per update, coloured by its position in the model (a colorbar, not a legend, so 50+ layers stay
    legible); dashed lines mark the report's energy thresholds. Updates with ΔW = 0 have no spectrum and are skipped.
    """
    rows = [row for row in report.rows if any(row.singular_values)]
    colours = plt.get_cmap("viridis")
    figure, (sigma_axis, energy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for index, row in enumerate(rows):
        k = np.arange(1, len(row.singular_values) + 1)
        normalised = np.asarray(row.normalised)
        colour = colours(index / max(len(rows) - 1, 1))
        sigma_axis.plot(k, np.where(normalised > 0, normalised, np.nan), color=colour, alpha=0.7, linewidth=1)
        energy_axis.plot(np.r_[0, k], np.r_[0, np.cumsum(normalised**2)], color=colour, alpha=0.7, linewidth=1)
    for energy in report.energies:
        energy_axis.axhline(energy, color="grey", linestyle="--", linewidth=0.8)
        energy_axis.text(0, energy, f"{100 * energy:g}%", va="bottom", fontsize=8, color="grey")
    sigma_axis.set(yscale="log", xlabel="k", ylabel=r"$\sigma_k\,/\,\|\Delta W\|_F$", title="singular values of ΔW")
    energy_axis.set(xlabel="k (rank kept)", ylabel="energy kept", title="cumulative energy", ylim=(0, 1.02))
    for axis in (sigma_axis, energy_axis):
        axis.grid(alpha=0.3)
        axis.xaxis.get_major_locator().set_params(integer=True)
    mappable = plt.cm.ScalarMappable(cmap=colours, norm=plt.Normalize(0, max(len(rows) - 1, 1)))
    figure.colorbar(mappable, ax=energy_axis, label="update index (model order)")
    return save_figure(figure, out_png)
