"""Which LoRA rank does each layer need? Singular values and effective ranks of a trained adapter's ΔW.

    python tools/rank_report.py runs/default/20261129-124017-773362
    python tools/rank_report.py path/to/adapter --out reports/ --energies 0.9 0.99

Takes a run directory (with ``adapter/``, or a Lightning callback's ``adapters/last/``) or an adapter directory.
Reads the adapter files only: ΔW = scale·B·A needs no base model. Prints the per-layer table and writes
``rank_report.json`` and ``rank_spectra.png`` to the directory given (or ``--out``). Exit code 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from visionlora.lora.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from visionlora.lora.rank import rank_report_from_adapter
from visionlora.reporting import plot_rank_spectra


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="run directory or adapter directory")
    parser.add_argument("--out", type=Path, help="where to write rank_report.json and rank_spectra.png")
    parser.add_argument("--energies", type=float, nargs="+", default=[0.9, 0.99],
                        help="energy fractions for the effective rank; the first sets the suggested rank")
    return parser.parse_args(argv)


def find_adapter(directory: Path) -> Path:
    """The adapter directory in ``directory``: itself, ``adapter/`` or ``adapters/last/``."""
    if not directory.is_dir():
        raise FileNotFoundError(f"no such directory: {directory}")
    for candidate in (directory, directory / "adapter", directory / "adapters" / "last"):
        if (candidate / CONFIG_NAME).exists() or (candidate / WEIGHTS_NAME).exists():
            return candidate
    raise FileNotFoundError(f"no adapter in {directory}: expected {CONFIG_NAME} and {WEIGHTS_NAME} there or in "
                            f"{directory / 'adapter'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = rank_report_from_adapter(find_adapter(args.directory), args.energies)
    except (FileNotFoundError, ValueError) as err:
        print(f"rank_report: error: {err}", file=sys.stderr)
        return 2
    out = args.out or args.directory
    out.mkdir(parents=True, exist_ok=True)
    print(report)
    json_file = report.write_json(out / "rank_report.json")
    print(f"wrote {json_file} and {plot_rank_spectra(report, out / 'rank_spectra.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
