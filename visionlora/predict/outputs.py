"""What a prediction run writes: predictions.csv or COCO-format predictions.json, metrics when the truth is known,
a contact sheet of classified images and drawings of the detected boxes.

Metrics use the torchmetrics classes training reports with (micro accuracy and macro-F1; COCO mAP), so a run's
own test images give back the run's test numbers.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.font_manager
import numpy as np
import torch
from PIL import Image
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.detection import MeanAveragePrecision
from torchvision.utils import draw_bounding_boxes

from visionlora.reporting import plot_confusion_matrix, plt, save_figure

from .results import ClassPrediction, DetectionPrediction

# torchvision's built-in bitmap font is a few pixels high; matplotlib ships a TrueType one.
LABEL_FONT = matplotlib.font_manager.findfont("DejaVu Sans")

CONTACT_SHEET_IMAGES = 48
# Drawings of small images are enlarged (nearest neighbour) to about this longer side, so labels stay legible.
DRAWING_SIDE = 512
# Per-class confusion plots stop being readable beyond this many classes.
MAX_CONFUSION_CLASSES = 50


def write_classifications(folder: Path, paths: list[Path], predictions: list[ClassPrediction]) -> None:
    """``predictions.csv``: ``path,label,probability`` then ``topK_label,topK_probability`` for K = 2..k."""
    k = len(predictions[0].labels)
    header = ["path", "label", "probability"] + [f"top{i}_{f}" for i in range(2, k + 1)
                                                 for f in ("label", "probability")]
    with open(folder / "predictions.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for path, found in zip(paths, predictions, strict=True):
            pairs = [v for label, p in zip(found.labels, found.probabilities, strict=True) for v in (label, f"{p:.6f}")]
            writer.writerow([str(path), *pairs])


def classification_metrics(predictions: list[ClassPrediction], truth: list[str], class_names: list[str],
                           folder: Path) -> dict:
    """Accuracy, macro-F1 and per-class accuracy against ``truth`` (label names); the confusion matrix PNG too."""
    index = {name: i for i, name in enumerate(class_names)}
    target = torch.tensor([index[name] for name in truth])
    predicted = torch.tensor([found.indices[0] for found in predictions])
    classes = len(class_names)
    per_class = MulticlassAccuracy(classes, average=None)(predicted, target)
    confusion = torch.zeros(classes, classes, dtype=torch.int64)
    confusion.index_put_((target, predicted), torch.ones_like(target), accumulate=True)
    if classes <= MAX_CONFUSION_CLASSES:
        plot_confusion_matrix(confusion.numpy(), class_names, folder / "confusion_matrix.png")
    present = confusion.sum(dim=1) > 0
    return {"images": len(truth), "correct": int((predicted == target).sum()),
            "accuracy": float(MulticlassAccuracy(classes, average="micro")(predicted, target)),
            "macro_f1": float(MulticlassF1Score(classes, average="macro")(predicted, target)),
            "per_class_accuracy": {name: float(acc) for name, acc, seen in
                                   zip(class_names, per_class, present, strict=True) if seen}}


def write_contact_sheet(folder: Path, images: list[np.ndarray], predictions: list[ClassPrediction],
                        truth: list[str] | None) -> Path:
    """The first images in a grid, each titled with its predicted label and probability (wrong ones in red)."""
    shown = min(len(images), CONTACT_SHEET_IMAGES)
    columns = min(8, shown)
    rows = -(-shown // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.8 * rows), squeeze=False)
    for position, axis in enumerate(axes.flat):
        axis.axis("off")
        if position >= shown:
            continue
        found = predictions[position]
        wrong = truth is not None and truth[position] != found.label
        axis.imshow(images[position])
        title = f"{found.label} {found.probability:.2f}" + (f"\n(true {truth[position]})" if wrong else "")
        axis.set_title(title, fontsize=7, color="red" if wrong else "black")
    return save_figure(figure, folder / "contact_sheet.png")


def write_detections(folder: Path, predictions: list[DetectionPrediction], image_ids: list[int]) -> None:
    """``predictions.json`` in COCO's results format (``pycocotools.coco.COCO.loadRes`` reads it)."""
    results = [row for found, image_id in zip(predictions, image_ids, strict=True)
               for row in found.coco_results(image_id)]
    (folder / "predictions.json").write_text(json.dumps(results))


def detection_metrics(predictions: list[DetectionPrediction], records: list, class_names: list[str]) -> dict:
    """COCO mAP (IoU .50:.95), mAP@50, mAP@75 and AP per class against ``records`` (boxes xyxy, labels 1..C)."""
    metric = MeanAveragePrecision(box_format="xyxy", class_metrics=True)
    metric.update([{"boxes": p.boxes, "scores": p.scores, "labels": torch.tensor(p.labels, dtype=torch.int64)}
                   for p in predictions],
                  [{"boxes": torch.as_tensor(r.boxes, dtype=torch.float32).reshape(-1, 4),
                    "labels": torch.as_tensor(r.labels, dtype=torch.int64)} for r in records])
    found = metric.compute()
    classes, per_class = found["classes"].reshape(-1), found["map_per_class"].reshape(-1)
    return {"images": len(records), "map": float(found["map"]), "map_50": float(found["map_50"]),
            "map_75": float(found["map_75"]),
            "ap_per_class": {class_names[c - 1]: float(v) for c, v in zip(classes.tolist(), per_class, strict=True)
                             if 1 <= c <= len(class_names)}}


def draw_detections(folder: Path, paths: list[Path], images: list[np.ndarray],
                    predictions: list[DetectionPrediction]) -> None:
    """``images/<name>.png``: each image with its boxes, label names and scores drawn."""
    (folder / "images").mkdir(exist_ok=True)
    for path, image, found in zip(paths, images, predictions, strict=True):
        scale = max(1, DRAWING_SIDE // max(image.shape[:2]))
        canvas = torch.from_numpy(np.ascontiguousarray(image.repeat(scale, 0).repeat(scale, 1).transpose(2, 0, 1)))
        labels = [f"{name} {score:.2f}" for name, score in zip(found.names, found.scores.tolist(), strict=True)]
        if len(labels):
            canvas = draw_bounding_boxes(canvas, found.boxes * scale, labels=labels, colors="red", width=2,
                                         font=LABEL_FONT, font_size=14)
        Image.fromarray(canvas.permute(1, 2, 0).numpy()).save(folder / "images" / f"{path.stem}.png")
