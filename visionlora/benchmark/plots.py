"""Benchmark pictures: accuracy vs shots per method with 95% CI bands, and accuracy vs trained parameters."""

from __future__ import annotations

import math
from pathlib import Path

from visionlora.reporting import plt, save_figure


def plot_accuracy_vs_shots(summary: list[dict], out_png: str | Path, title: str = "") -> Path:
    """One line per method over the shot counts, with a shaded 95% confidence band."""
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for method in dict.fromkeys(s["method"] for s in summary):
        points = sorted(((int(s["shots"]), s) for s in summary if s["method"] == method), key=lambda p: p[0])
        shots = [k for k, _ in points]
        mean = [100 * s["accuracy"] for _, s in points]
        half = [0.0 if math.isnan(s["ci95"]) else 100 * s["ci95"] for _, s in points]
        line, = axis.plot(shots, mean, marker="o", label=method)
        axis.fill_between(shots, [m - h for m, h in zip(mean, half, strict=True)],
                          [m + h for m, h in zip(mean, half, strict=True)], color=line.get_color(), alpha=0.07)
    axis.set_xscale("log", base=2)
    axis.set_xticks(sorted({int(s["shots"]) for s in summary}), labels=sorted({s["shots"] for s in summary}, key=int))
    axis.set(xlabel="training images per class (shots)", ylabel="test accuracy (%)", title=title)
    axis.set_ylim(top=min(100.5, axis.get_ylim()[1]))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, ncol=2)
    return save_figure(figure, out_png)


def plot_accuracy_vs_params(summary: list[dict], out_png: str | Path, title: str = "") -> Path:
    """Accuracy against trained parameters (log scale) per shot count: where extra rank stops paying (the knee)."""
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    learned = [s for s in summary if s["trainable_params"] > 0]
    for shots in sorted({int(s["shots"]) for s in learned}):
        points = sorted(((s["trainable_params"], s) for s in learned if int(s["shots"]) == shots), key=lambda p: p[0])
        axis.plot([p for p, _ in points], [100 * s["accuracy"] for _, s in points], marker="o", alpha=0.6,
                  label=f"{shots}-shot")
        for params, s in points:
            axis.annotate(s["method"], (params, 100 * s["accuracy"]), fontsize=6, alpha=0.8,
                          xytext=(2, 2), textcoords="offset points")
    axis.set_xscale("log")
    axis.set(xlabel="trained parameters (log scale)", ylabel="test accuracy (%)", title=title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return save_figure(figure, out_png)


def plot_error_with_references(summary: list[dict], references: dict[str, float], out_png: str | Path,
                               title: str = "") -> Path:
    """Error rate per method (bars with 95% CI) beside published reference error rates (dashed lines)."""
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    names = [s["method"] for s in summary]
    errors = [100 * (1 - s["accuracy"]) for s in summary]
    half = [0.0 if math.isnan(s["ci95"]) else 100 * s["ci95"] for s in summary]
    axis.bar(names, errors, yerr=half, capsize=3, color="tab:blue", alpha=0.75)
    for index, (name, error) in enumerate(references.items()):
        axis.axhline(error, linestyle="--", linewidth=1, color=f"C{index + 1}", label=f"{name}: {error}%")
    axis.set(ylabel="error (%)", title=title)
    axis.tick_params(axis="x", rotation=30)
    axis.grid(alpha=0.3, axis="y")
    if references:
        axis.legend(fontsize=7)
    return save_figure(figure, out_png)
