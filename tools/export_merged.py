"""Merge a trained LoRA into its backbone and write a plain timm folder (no visionlora needed to load it).

    python tools/export_merged.py runs/default/<time>                       # -> runs/default/<time>/merged
    python tools/export_merged.py runs/detection_default/<time>             # a detector: config.json + weights
    python tools/export_merged.py runs/default/<time>/checkpoints/last.ckpt --out exported/digits --dtype fp16
    python tools/export_merged.py --adapter runs/default/<time>/adapter --base test_resnet \
        --pretrained-file local-dir:data/weights/resnet_digits --out exported/digits --onnx

A detection run (its checkpoint names a ``detector``) is written as a folder that
``visionlora.models.load_merged_detector`` rebuilds without LoRA code. Every export is checked against
the adapted model; exit codes: 0 written, 1 check failed (nothing written),
2 bad input (nothing written): a missing or mismatching source, an output that exists (without --force) or that
cannot be written, checked before any model is loaded.
"""

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from visionlora.export import (
    DTYPES,
    ExportError,
    VerificationError,
    detector_source_from_path,
    export_merged,
    export_merged_detector,
    is_detection_checkpoint,
    source_from_adapter,
    source_from_path,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", nargs="?", help="run directory or Lightning checkpoint (omit with --adapter)")
    parser.add_argument("--out", help="output folder (default: <run directory>/merged)")
    parser.add_argument("--adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--base", help="with --adapter: timm architecture of the base model")
    parser.add_argument("--pretrained-file", help="with --adapter: base weights file or local-dir:<folder>")
    parser.add_argument("--pretrained", action="store_true", help="with --adapter: base weights from the hub")
    parser.add_argument("--model-args", type=json.loads, default=None,
                        help='with --adapter: JSON, e.g. {"img_size": 24}')
    parser.add_argument("--num-classes", type=int, help="expected classes (checked against the checkpoint/adapter)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="precision of the written weights")
    parser.add_argument("--tolerance", type=float, help="max relative output difference (default per dtype)")
    parser.add_argument("--onnx", action="store_true", help="also write model.onnx (checked if onnxruntime is there)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        report = export(args)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except VerificationError as error:
        print(f"verification failed: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # an unreadable input, a write that failed: the staged output is gone
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report)
    return 0


def export(args: argparse.Namespace):
    """A detector's or a classifier's merged export, chosen by what the checkpoint holds."""
    out = output_folder(args)
    check_writable(out, args.force)  # before any model is loaded
    if args.source and not args.adapter and is_detection_checkpoint(args.source):
        if args.onnx:
            raise ExportError("--onnx exports classifiers only; a detector is written as config.json + weights")
        source = detector_source_from_path(args.source, args.num_classes)
        return export_merged_detector(source, out, args.dtype, args.tolerance, args.force)
    return export_merged(load_source(args), out, args.dtype, args.tolerance, args.onnx, args.force)


def output_folder(args: argparse.Namespace) -> Path:
    """``--out``, else ``merged/`` in the run directory (a checkpoint's run directory is two levels up)."""
    if args.adapter:
        if not args.base or not args.out:
            raise ExportError("--adapter needs --base and --out")
        return Path(args.out)
    if not args.source:
        raise ExportError("give a run directory or checkpoint, or --adapter with --base")
    path = Path(args.source)
    return Path(args.out) if args.out else (path if path.is_dir() else path.parent.parent) / "merged"


def check_writable(out: Path, force: bool) -> None:
    """Raise ExportError unless the export can be staged beside ``out`` (and ``out`` is free or ``force``)."""
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass --force to replace it")
    folder = out.parent
    while not folder.exists():  # the first folder that exists; the export makes the rest
        folder = folder.parent
    if not folder.is_dir():
        raise ExportError(f"--out {out}: cannot write there ({folder} is a file, not a folder)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.check.", dir=folder))
    except OSError as error:
        raise ExportError(f"--out {out}: cannot write there (no folder can be made in {folder}: "
                          f"{error.strerror or error})") from None


def load_source(args: argparse.Namespace):
    if args.adapter:
        return source_from_adapter(args.adapter, args.base, args.pretrained_file, args.pretrained,
                                   args.num_classes, args.model_args)
    return source_from_path(args.source, args.num_classes)


if __name__ == "__main__":
    sys.exit(main())
