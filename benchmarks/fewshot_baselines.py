"""LoRA vs. linear probe, full fine-tuning, training from scratch and raw-pixel 1-NN on the default few-shot task.

    python benchmarks/fewshot_baselines.py                      # 1 and 5 shots x 5 seeds, configs/default.yaml
    python benchmarks/fewshot_baselines.py --shots 1 --seeds 0 1  # a quicker look

Every learned method runs through ``tools/train.py``'s code path (visionlora.cli.main) with the default config and
per-method overrides, so the numbers are what a user of the default job gets. Prints a mean ± std table and writes
``benchmarks/results/fewshot_baselines.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from visionlora.cli import main as train_main
from visionlora.data import FewShotDataModule
from visionlora.reporting import format_table, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"

# Overrides of configs/default.yaml per method (learning rates chosen per method, as a fair comparison needs).
METHODS: dict[str, list[str]] = {
    "lora": [],
    "linear probe": ["--model.method", "linear", "--model.head_lr", "0.01"],
    "full fine-tune": ["--model.method", "full", "--model.lr", "0.0005"],
    "from scratch": ["--model.method", "full", "--model.pretrained_file", "null", "--model.lr", "0.002"],
}


def raw_pixel_1nn(shots: int, seed: int) -> float:
    """Nearest neighbour (Euclidean) on the raw 8x8 pixels of the same k-shot images: the no-learning baseline."""
    data = FewShotDataModule(dataset="digits", classes="novel", shots=shots, seed=seed)
    data.setup("fit")
    train, test = data.raw_split("train"), data.raw_split("test")
    train_x = torch.as_tensor(np.stack(train.images)[..., 0], dtype=torch.float32).flatten(1)
    test_x = torch.as_tensor(np.stack(test.images)[..., 0], dtype=torch.float32).flatten(1)
    nearest = torch.cdist(test_x, train_x).argmin(dim=1)
    train_y, test_y = torch.as_tensor(train.labels), torch.as_tensor(test.labels)
    return (train_y[nearest] == test_y).float().mean().item()


def run_cell(method: str, shots: int, seed: int, runs_dir: str) -> dict:
    if method == "raw-pixel 1-NN":
        return {"test acc": raw_pixel_1nn(shots, seed), "trainable": 0, "trainable %": 0.0}
    args = ["--config", str(DEFAULT_CONFIG), "--seed_everything", str(seed), "--data.seed", str(seed),
            "--data.shots", str(shots), "--runs_dir", runs_dir, "--run_name", f"{method}-{shots}-{seed}",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            *METHODS[method]]
    return train_main(args)


def summarise(cells: list[dict]) -> list[dict]:
    rows = []
    for (method, shots) in dict.fromkeys((c["method"], c["shots"]) for c in cells):
        accs = [100 * c["test acc"] for c in cells if c["method"] == method and c["shots"] == shots]
        trainable = [c for c in cells if c["method"] == method][0]
        rows.append({"shots": shots, "method": method, "test acc % (mean ± std)":
                     f"{statistics.mean(accs):.1f} ± {statistics.pstdev(accs):.1f}", "seeds": len(accs),
                     "trainable": trainable["trainable"], "trainable %": round(trainable["trainable %"], 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=[*METHODS, "raw-pixel 1-NN"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fewshot_baselines"))
    args = parser.parse_args()
    cells = []
    with tempfile.TemporaryDirectory() as runs_dir:
        for shots in args.shots:
            for method in args.methods:
                for seed in args.seeds:
                    result = run_cell(method, shots, seed, runs_dir)
                    cells.append({**result, "method": method, "shots": shots, "seed": seed})
                    print(f"[{len(cells)}] {method:>15} shots={shots} seed={seed} acc={100 * result['test acc']:.1f}")
    rows = summarise(cells)
    table = format_table(rows)
    print(table)
    out = Path(args.out)
    write_text_atomic(out.with_suffix(".json"), json.dumps({"cells": cells, "summary": rows}, indent=2, default=float))
    write_text_atomic(out.with_suffix(".md"), table + "\n")


if __name__ == "__main__":
    main()
