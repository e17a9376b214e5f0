"""Fixtures for the benchmark tests: a generated all_runs.zip (20 tiny one-shot runs) and the tool's main."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
OMNIGLOT = ROOT.parent / "shared" / "datasets" / "omniglot"
RESNET_DIGITS = "local-dir:" + str(ROOT / "data" / "weights" / "resnet_digits")
OMNIGLOT_CONFIG = str(ROOT / "configs" / "benchmark" / "omniglot_one_shot.yaml")


def character_png(index: int, shift: int = 0) -> bytes:
    """A 105x105 Omniglot-like PNG (black ink on white): character ``index`` is a bar at its own place and size."""
    image = np.full((105, 105), 255, dtype=np.uint8)
    top, left = 5 + 4 * (index % 5) + shift, 5 + 4 * (index // 5) + shift
    image[top : top + 10 + 2 * (index % 3), left : left + 40 + 3 * (index % 4)] = 0
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_runs(root: Path, shift: int = 1) -> Path:
    """``root/all_runs.zip`` in the official layout: 20 runs, test item i is character (i * 7) % 20 moved ``shift``
    px (characters differ in place and size: the centred render, which drops the place, confuses some)."""
    root.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(root / "all_runs.zip", "w") as handle:
        for run in range(1, 21):
            answers = []
            for k in range(1, 21):
                handle.writestr(f"run{run:02d}/training/class{k:02d}.png", character_png(k - 1))
                target = (k * 7) % 20
                handle.writestr(f"run{run:02d}/test/item{k:02d}.png", character_png(target, shift=shift))
                answers.append(f"run{run:02d}/test/item{k:02d}.png run{run:02d}/training/class{target + 1:02d}.png")
            handle.writestr(f"run{run:02d}/class_labels.txt", "\n".join(answers) + "\n")
    return root


@pytest.fixture
def runs_root(tmp_path) -> Path:
    """A folder holding only a generated all_runs.zip (no background archives)."""
    return write_runs(tmp_path / "omniglot")


@pytest.fixture
def tool():
    return load_tool("fewshot_benchmark")
