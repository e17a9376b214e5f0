"""Helpers for the command-line tests: the default config with a tiny ViT, run in-process in seconds."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
TINY_VIT = '{"img_size": 24, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}'
# configs/default.yaml with a 2-block ViT from scratch on 2 shots: one epoch takes about a second.
FAST = ["--config", str(DEFAULT_CONFIG), "--model.backbone", "vit_tiny_patch16_224", "--model.pretrained_file",
        "null", "--model.model_args", TINY_VIT, "--data.shots", "2", "--data.image_size", "24",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.max_epochs", "1", "--run_test", "false"]


def fast_args(runs_dir: Path, *extra: str) -> list[str]:
    """A one-epoch run of the tiny ViT under ``runs_dir/t``, then ``extra`` flags."""
    return [*FAST, "--runs_dir", str(runs_dir), "--run_name", "t", *extra]


def run_dirs(runs_dir: Path) -> list[Path]:
    """The run directories of run name ``t``, oldest first."""
    folder = runs_dir / "t"
    return sorted(folder.iterdir()) if folder.is_dir() else []
