"""What a prediction is: the top labels of an image, or its boxes with labels, scores and the dataset's ids."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ClassPrediction:
    """The ``k`` most probable labels of one image, most probable first.

    Attributes:
        labels: Label names.
        probabilities: Their softmax probabilities.
        indices: Their class indices.
    """

    labels: list[str]
    probabilities: list[float]
    indices: list[int]

    @property
    def label(self) -> str:
        return self.labels[0]

    @property
    def probability(self) -> float:
        return self.probabilities[0]


@dataclass
class DetectionPrediction:
    """The boxes found in one image, in the image's own pixels.

    Attributes:
        boxes: ``[N, 4]`` float ``x0, y0, x1, y1``.
        scores: ``[N]`` confidence.
        labels: ``N`` labels ``1..C``.
        names: ``N`` label names.
        category_ids: ``N`` category ids of the dataset the detector was trained on.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: list[int]
    names: list[str]
    category_ids: list[int]

    def above(self, threshold: float) -> DetectionPrediction:
        """The boxes scoring at least ``threshold``."""
        keep = (self.scores >= threshold).tolist()
        pick = [i for i, kept in enumerate(keep) if kept]
        return DetectionPrediction(self.boxes[keep], self.scores[keep], [self.labels[i] for i in pick],
                                   [self.names[i] for i in pick], [self.category_ids[i] for i in pick])

    def coco_results(self, image_id: int) -> list[dict]:
        """COCO's results format: one ``{image_id, category_id, bbox [x, y, w, h], score}`` per box."""
        xywh = torch.cat([self.boxes[:, :2], self.boxes[:, 2:] - self.boxes[:, :2]], dim=1)
        return [{"image_id": int(image_id), "category_id": int(category), "bbox": [round(float(v), 3) for v in box],
                 "score": round(float(score), 5)}
                for box, score, category in zip(xywh, self.scores, self.category_ids, strict=True)]
