"""A whole prediction run: images in batches with a progress bar, then every output written into one folder at once.

The folder is built beside its target and moved into place only when complete (``visionlora.files``), so a failed
or interrupted run leaves nothing; an existing folder is replaced only with ``force``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from visionlora.data.common import load_rgb
from visionlora.files import staged_folder

from .inputs import Inputs
from .model import PredictError, Predictor
from .outputs import (
    classification_metrics,
    detection_metrics,
    draw_detections,
    write_classifications,
    write_contact_sheet,
    write_detections,
)

DEFAULT_TOP_K = 3
DEFAULT_SCORE_THRESHOLD = 0.3


def task_options(predictor: Predictor, top_k: int | None, score_threshold: float | None,
                 annotations: str | None) -> dict:
    """The options of the source's task, with their defaults; one of the other task is an error naming it."""
    if predictor.task == "detection":
        if top_k is not None:
            raise PredictError(f"--top-k is for classifiers; {predictor.description} is a detector")
        return {"score_threshold": DEFAULT_SCORE_THRESHOLD if score_threshold is None else score_threshold}
    wrong = [flag for flag, value in (("--annotations", annotations), ("--score-threshold", score_threshold))
             if value is not None]
    if wrong:
        raise PredictError(f"{', '.join(wrong)} are for detectors; {predictor.description} is a classifier")
    top_k = min(DEFAULT_TOP_K, predictor.num_classes) if top_k is None else top_k
    if not 1 <= top_k <= predictor.num_classes:
        raise PredictError(f"--top-k must be in [1, {predictor.num_classes}] (the model's classes), got {top_k}")
    return {"top_k": top_k}


def predict_folder(predictor: Predictor, inputs: Inputs, out: Path, *, batch_size: int = 32, top_k: int = 1,
                   score_threshold: float = 0.3, records: list | None = None, force: bool = False) -> dict:
    """Predict every input and write ``out``; returns the summary (also written as ``summary.json``).

    Args:
        records: Detection: the annotation records of ``inputs`` (same order), for image ids and mAP.
    """
    if out.exists() and not force:
        raise PredictError(f"output folder {out} exists; pass --force to replace it")
    images, predictions, seconds = _run(predictor, inputs.paths, batch_size, top_k)
    with staged_folder(out, replace=force) as staging:
        summary = {"source": predictor.description, "task": predictor.task, "images": len(inputs.paths),
                   "skipped_unreadable": len(inputs.bad), "seconds": round(seconds, 3),
                   "images_per_second": round(len(inputs.paths) / max(seconds, 1e-9), 2)}
        if predictor.task == "classification":
            summary |= _classification_outputs(staging, predictor, inputs, images, predictions)
        else:
            summary |= _detection_outputs(staging, predictor, inputs, images, predictions, records, score_threshold)
        if inputs.bad:
            (staging / "unreadable_images.txt").write_text(
                "".join(f"{path}\t{reason}\n" for path, reason in sorted(inputs.bad.items())))
        (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _run(predictor: Predictor, paths: list[Path], batch_size: int, top_k: int
         ) -> tuple[list[np.ndarray], list, float]:
    """Every image read and predicted, batch by batch; the seconds spent predicting (reading excluded).

    Detections keep every box the detector returns (its own ``score_thresh`` applies, as in the run's test step),
    so mAP is computed as training computed it; the score threshold applies to what is written and drawn.
    """
    images, predictions, seconds = [], [], 0.0
    for start in tqdm(range(0, len(paths), batch_size), desc="predict", unit="batch", leave=False):
        batch = [load_rgb(path) for path in paths[start : start + batch_size]]
        started = time.perf_counter()
        predictions += predictor.predict(batch, top_k=top_k)
        seconds += time.perf_counter() - started
        images += batch
    return images, predictions, seconds


def _classification_outputs(folder: Path, predictor: Predictor, inputs: Inputs, images: list, predictions: list
                            ) -> dict:
    write_classifications(folder, inputs.paths, predictions)
    write_contact_sheet(folder, images, predictions, inputs.labels)
    summary = {"predicted_per_label": dict(Counter(found.label for found in predictions).most_common())}
    if inputs.labels is not None:
        summary["metrics"] = classification_metrics(predictions, inputs.labels, predictor.class_names, folder)
    return summary


def _detection_outputs(folder: Path, predictor: Predictor, inputs: Inputs, images: list, predictions: list,
                       records: list | None, score_threshold: float) -> dict:
    summary = {}
    if records is not None:
        summary["metrics"] = detection_metrics(predictions, records, predictor.class_names)
        image_ids = [record.image_id for record in records]
    else:
        image_ids = list(range(1, len(inputs.paths) + 1))
    kept = [found.above(score_threshold) for found in predictions]
    write_detections(folder, kept, image_ids)
    draw_detections(folder, _unique_names(inputs.paths), images, kept)
    summary["boxes_per_label"] = dict(Counter(name for found in kept for name in found.names).most_common())
    return summary


def _unique_names(paths: list[Path]) -> list[Path]:
    """The paths, renamed ``<index>_<name>`` when two share a file name (drawings go into one folder)."""
    stems = Counter(path.stem for path in paths)
    return [Path(f"{i:05d}_{path.stem}") if stems[path.stem] > 1 else path for i, path in enumerate(paths)]
