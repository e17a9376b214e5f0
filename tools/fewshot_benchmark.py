"""Compare few-shot methods and LoRA ranks: k-shot sweeps, N-way K-shot episodes and the Omniglot one-shot runs.

    python tools/fewshot_benchmark.py                                   # configs/benchmark/default.yaml (digits)
    python tools/fewshot_benchmark.py --config configs/benchmark/omniglot_one_shot.yaml --root DIR
    python tools/fewshot_benchmark.py --config configs/benchmark/default.yaml --methods ncm lora-r4 --seeds 0 1

Each finished cell is appended to <out>/results.csv; rerunning the same command skips finished cells (Ctrl-C
safe); a folder holding cells of other settings is refused. At the end <out>/summary.md holds the mean ± 95% CI
table, with accuracy_vs_shots.png and accuracy_vs_params.png beside it. Exit code 2 on a bad config, before any
cell runs; 130 after Ctrl-C, with a summary that says "k of n cells" at its top.
"""

import argparse
import logging
import sys
from pathlib import Path

import yaml

from visionlora.benchmark import SweepConfig, execute_sweep, prepare_sweep

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "benchmark" / "default.yaml"
INTERRUPTED = 130  # the shell's status for a process ended by SIGINT (128 + 2)
OVERRIDES = {"methods": str, "shots": int, "seeds": int, "runs": int}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="benchmark YAML (configs/benchmark/)")
    for name, kind in OVERRIDES.items():
        parser.add_argument(f"--{name}", type=kind, nargs="+", help=f"override the config's {name}")
    for name in ("root", "backbone", "pretrained_file", "out", "name", "render"):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, help=f"override the config's {name}")
    for name in ("steps", "episodes"):
        parser.add_argument(f"--{name}", type=int, help=f"override the config's {name}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    return parser.parse_args(argv)


def load_config(args: argparse.Namespace) -> SweepConfig:
    if not args.config.is_file():
        raise ValueError(f"no benchmark config at {args.config}")
    values = yaml.safe_load(args.config.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{args.config}: expected a mapping of fields")
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "no_progress") and v is not None}
    return SweepConfig.from_dict(values | overrides, source=str(args.config))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("timm").setLevel(logging.WARNING)  # one "loaded weights" line per cell is noise here
    try:
        config = load_config(args)
        plan = prepare_sweep(config)  # every check, before the first cell
    except (ValueError, TypeError, FileNotFoundError, yaml.YAMLError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted before the first cell: nothing written", file=sys.stderr)
        return INTERRUPTED
    outcome = execute_sweep(plan, progress=not args.no_progress)
    print(f"\nresults: {config.output_dir}/results.csv, summary.md and plots")
    if outcome.interrupted:
        print(f"interrupted: the summary holds {outcome.finished} of {outcome.total} cells", file=sys.stderr)
        return INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
