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

from visionlora.predict import PredictError, Predictor, collect_inputs, predict_folder
from visionlora.predict.inputs import BAD_POLICIES

DEFAULT_TOP_K = 3
DEFAULT_SCORE_THRESHOLD = 0.3


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
    options = check_options(args, predictor)
    records = None
    if args.annotations:
        inputs, records = annotated_inputs(args.annotations, items, args.on_bad)
    else:
        inputs = collect_inputs(items, args.on_bad, predictor.class_names)
    return predict_folder(predictor, inputs, out, batch_size=args.batch_size, records=records, force=args.force,
                          **options)


def check_options(args: argparse.Namespace, predictor: Predictor) -> dict:
    """The options of the source's task; those of the other task are an error naming them."""
    if predictor.task == "detection":
        if args.top_k is not None:
            raise PredictError(f"--top-k is for classifiers; {predictor.description} is a detector")
        threshold = DEFAULT_SCORE_THRESHOLD if args.score_threshold is None else args.score_threshold
        return {"score_threshold": threshold}
    wrong = [flag for flag, value in (("--annotations", args.annotations), ("--score-threshold", args.score_threshold))
             if value is not None]
    if wrong:
        raise PredictError(f"{', '.join(wrong)} are for detectors; {predictor.description} is a classifier")
    top_k = min(DEFAULT_TOP_K, predictor.num_classes) if args.top_k is None else args.top_k
    if not 1 <= top_k <= predictor.num_classes:
        raise PredictError(f"--top-k must be in [1, {predictor.num_classes}] (the model's classes), got {top_k}")
    return {"top_k": top_k}


def annotated_inputs(annotations: str, items: list[str], on_bad: str):
    """The images a COCO file lists, in its INPUT folder, with their records (boxes and image ids)."""
    from visionlora.data.detection.coco import load_coco
    from visionlora.predict import Inputs

    if len(items) != 1 or not Path(items[0]).is_dir():
        raise PredictError("with --annotations, INPUT is the one folder its file_name entries are relative to")
    records = load_coco(annotations, items[0], on_bad="drop" if on_bad == "skip" else "error").records
    inputs = collect_inputs([str(record.path) for record in records], on_bad)
    readable = set(inputs.paths)
    kept = [record for record in records if record.path in readable]
    return Inputs([record.path for record in kept], inputs.bad), kept


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
