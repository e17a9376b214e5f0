"""Few-shot detection quality bar: LoRA vs. a frozen backbone, TFA's predictor-only fine-tuning and full fine-tuning.

    python benchmarks/fewshot_detection.py                      # 4 methods x seeds 0-2, configs/detection/default.yaml
    python benchmarks/fewshot_detection.py --seeds 0 --methods lora "frozen backbone"   # a quicker look
    python benchmarks/fewshot_detection.py --out benchmarks/results/fewshot_detection_colour -- --data.dataset synthetic

Every method runs through ``tools/train.py``'s code path (visionlora.cli.main) with the default detection config
(K = 10 annotated instances per novel class, night camera, FCOS started from the bundled base detector) and
per-method overrides, so the numbers are what a user of the default job gets; arguments after ``--`` go to every
run (the last example: the same task in colour, i.e. without the domain shift). The seed changes the K-instance
draw, the initialisation and the augmentation; validation and test sets stay fixed. Prints a mean ± std table and
writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
from pathlib import Path

from visionlora.cli import main as train_main
from visionlora.files import write_text_atomic
from visionlora.reporting import format_table

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "detection" / "default.yaml"

# Overrides of configs/detection/default.yaml per method. "frozen backbone": the backbone is fixed and the FPN and
# head fine-tune; "predictor (TFA)": only the new class predictor trains (TFA's own recipe); "full": every weight
# trains, the backbone at a third of the head's rate.
METHODS: dict[str, list[str]] = {
    "lora": [],
    "frozen backbone": ["--model.method", "frozen"],
    "predictor (TFA)": ["--model.method", "predictor"],
    "full fine-tune": ["--model.method", "full", "--model.backbone_lr", "0.001"],
}
METRICS = ("mAP@50", "test mAP", "mAP@75")


def run_cell(method: str, seed: int, runs_dir: str, extra: list[str]) -> dict:
    args = ["--config", str(DEFAULT_CONFIG), "--seed_everything", str(seed), "--data.seed", str(seed),
            "--runs_dir", runs_dir, "--run_name", f"{re.sub(r'[^a-z]+', '_', method)}-{seed}",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            *METHODS[method], *extra]
    return train_main(args)


def summarise(cells: list[dict]) -> list[dict]:
    """One row per method: mean ± population std over seeds of each metric, trainable parameters, fit time."""
    rows = []
    for method in dict.fromkeys(c["method"] for c in cells):
        mine = [c for c in cells if c["method"] == method]
        row = {"method": method, "seeds": len(mine)}
        for metric in METRICS:
            values = [100 * c[metric] for c in mine]
            row[f"{metric} % (mean ± std)"] = f"{statistics.mean(values):.1f} ± {statistics.pstdev(values):.1f}"
        row |= {"trainable": mine[0]["trainable"], "trainable %": round(mine[0]["trainable %"], 1),
                "fit seconds (mean)": round(statistics.mean(c["fit seconds"] for c in mine), 1)}
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fewshot_detection"))
    parser.add_argument("overrides", nargs="*", help="extra tools/train.py arguments for every run (after --)")
    args = parser.parse_args()
    cells = []
    with tempfile.TemporaryDirectory() as runs_dir:
        for seed in args.seeds:
            for method in args.methods:
                result = run_cell(method, seed, runs_dir, args.overrides)
                cells.append({**result, "method": method, "seed": seed})
                print(f"[{len(cells)}] {method:>15} seed={seed} mAP@50={100 * result['mAP@50']:.1f} "
                      f"mAP={100 * result['test mAP']:.1f} ({result['fit seconds']:.0f} s)")
    rows = summarise(cells)
    table = format_table(rows)
    print(table)
    out = Path(args.out)
    config = {"config": str(DEFAULT_CONFIG.relative_to(ROOT)), "overrides": args.overrides, "methods": METHODS}
    summary = {**config, "cells": cells, "summary": rows}
    write_text_atomic(out.with_suffix(".json"), json.dumps(summary, indent=2, default=float))
    write_text_atomic(out.with_suffix(".md"), table + "\n")


if __name__ == "__main__":
    main()
