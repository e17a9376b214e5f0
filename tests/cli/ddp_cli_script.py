"""Run by tests/cli/test_ddp_cli.py: tools/train.py's code path (``visionlora.cli.main``), 2-process DDP on CPU (gloo).

Lightning's launcher starts rank 1 as a copy of this command line, so everything comes from ``sys.argv``:
``ddp_cli_script.py OUT``. Runs go to ``OUT/runs``; each rank writes ``OUT/rank<R>.json`` with its run directory and
the number of test images its (synchronised) test metrics counted.
"""

import json
import sys
from pathlib import Path

import visionlora.cli.classification as classification_cli
from visionlora.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY_VIT = '{"img_size": 24, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}'


def run(out: Path) -> None:
    write_run_outputs = classification_cli.write_run_outputs

    def record(cli, results, seconds):
        row = write_run_outputs(cli, results, seconds)
        report = {"run_dir": str(cli.run_dir), "world_size": cli.trainer.world_size,
                  "test_images": int(cli.model.test_results["confusion"].sum())}
        (out / f"rank{cli.trainer.global_rank}.json").write_text(json.dumps(report))
        return row

    classification_cli.write_run_outputs = record
    main(["--config", str(ROOT / "configs" / "default.yaml"), "--model.backbone", "vit_tiny_patch16_224",
          "--model.pretrained_file", "null", "--model.model_args", TINY_VIT, "--data.dataset", "digits",
          "--data.shots", "2", "--data.image_size", "24", "--trainer.max_epochs", "1",
          "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
          "--runs_dir", str(out / "runs"), "--run_name", "t"])


if __name__ == "__main__":
    run(Path(sys.argv[1]))
