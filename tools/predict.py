"""Run a trained classifier or detector on new images and write predictions, metrics and pictures to a folder.

    python tools/predict.py runs/default/<time> photos/ --out predictions/digits
    python tools/predict.py exported/digits photos/*.png --out predictions/digits --top-k 3
    python tools/predict.py --base test_resnet --pretrained-file local-dir:data/weights/resnet_digits \\
        --adapter runs/default/<time>/adapter photos/ --out predictions/digits
    python tools/predict.py runs/detection_default/<time> scenes/test/images --out predictions/shapes \\
        --annotations scenes/test/annotations.json

SOURCE is a run directory, a checkpoint, a merged export folder (classifier or detector), or --base with
--adapter. INPUT is image files, folders (recursive), glob patterns or text files with one path per line. The
evaluation transform comes from the source (the run's test transform, which the export's config.json states).
Exit codes: 0 written, 2 bad input (one line, nothing written).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from visionlora.predict import PredictError, Predictor, annotated_inputs, collect_inputs, predict_folder, task_options
from visionlora.predict.inputs import BAD_POLICIES
from visionlora.predict.run import DEFAULT_SCORE_THRESHOLD, DEFAULT_TOP_K


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("items", nargs="+", metavar="SOURCE INPUT", help="SOURCE (omit with --adapter), then INPUTs")
    parser.add_argument("--out", required=True, help="output folder (written whole, at the end)")
    parser.add_argument("--base", help="with --adapter: timm architecture of the base model, or local-dir:<folder>")
    parser.add_argument("--adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--pretrained-file", help="with --adapter: base weights file or local-dir:<folder>")
    parser.add_argument("--pretrained", action="store_true", help="with --adapter: base weights from the hub")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    parser.add_argument("--top-k", type=int, help=f"classifiers: labels per image (default {DEFAULT_TOP_K})")
    parser.add_argument("--score-threshold", type=float,
                        help=f"detectors: boxes below are not written or drawn (default {DEFAULT_SCORE_THRESHOLD})")
    parser.add_argument("--annotations", help="detectors: COCO json of the INPUT folder: its image ids, and mAP")
    parser.add_argument("--on-bad", choices=BAD_POLICIES, default="skip", help="unreadable images: skip or error")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        summary = run(args)
    except (PredictError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(describe(summary, Path(args.out)))
    return 0


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    if out.exists() and not args.force:
        raise PredictError(f"output folder {out} exists; pass --force to replace it")
    if args.batch_size < 1:
        raise PredictError(f"--batch-size must be >= 1, got {args.batch_size}")
    source, items = (None, args.items) if args.adapter else (args.items[0], args.items[1:])
    if not items:
        raise PredictError("no INPUT given: name image files, folders, patterns or list files after SOURCE")
    predictor = Predictor.from_source(source, args.base, args.adapter, args.pretrained_file, args.pretrained,
                                      args.device)
    options = task_options(predictor, args.top_k, args.score_threshold, args.annotations)
    records = None
    if args.annotations:
        inputs, records = annotated_inputs(args.annotations, items, args.on_bad)
    else:
        inputs = collect_inputs(items, args.on_bad, predictor.class_names)
    return predict_folder(predictor, inputs, out, batch_size=args.batch_size, records=records, force=args.force,
                          **options)


def describe(summary: dict, out: Path) -> str:
    lines = [f"{summary['images']} images from {summary['source']} in {summary['seconds']:.1f} s "
             f"({summary['images_per_second']:.1f} images/s); wrote {out}"]
    if summary["skipped_unreadable"]:
        lines.append(f"skipped {summary['skipped_unreadable']} unreadable image(s): see {out}/unreadable_images.txt")
    counts = summary.get("predicted_per_label") or summary.get("boxes_per_label") or {}
    what = "predicted" if "predicted_per_label" in summary else "boxes"
    lines.append(f"{what} per label: " + ", ".join(f"{label} {count}" for label, count in counts.items()))
    metrics = summary.get("metrics")
    if metrics and "accuracy" in metrics:
        lines.append(f"accuracy {100 * metrics['accuracy']:.2f}% ({metrics['correct']}/{metrics['images']}), "
                     f"macro-F1 {100 * metrics['macro_f1']:.2f}%")
    elif metrics:
        lines.append(f"mAP {100 * metrics['map']:.1f}%, mAP@50 {100 * metrics['map_50']:.1f}%, "
                     f"mAP@75 {100 * metrics['map_75']:.1f}% on {metrics['images']} images")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
