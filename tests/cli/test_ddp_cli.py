"""tools/train.py's code path under 2-process DDP (gloo on CPU): one run directory, each test image counted once."""

import json
import os
import subprocess
import sys
from pathlib import Path

from visionlora.data import FewShotDataModule

ROOT = Path(__file__).resolve().parents[2]


def test_ddp_run_has_one_run_directory_and_tests_each_image_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("ddp_cli_script.py")), str(tmp_path)],
                          env=env, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    (run_dir,) = (tmp_path / "runs" / "t").iterdir()  # no stray directory of rank 1
    assert {r["run_dir"] for r in reports} == {str(run_dir)}
    assert (run_dir / "results.json").is_file() and (run_dir / "fewshot_selection.csv").is_file()
    test_images = len(FewShotDataModule(dataset="digits").raw_split("test"))
    assert test_images % 2 == 1  # an odd split: DistributedSampler would pad it with a repeated image
    assert [r["test_images"] for r in reports] == [test_images, test_images]
