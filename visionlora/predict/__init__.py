"""Use what you trained: a classifier or detector from a run, a checkpoint, a merged export or base + adapter,
run on new images (``Predictor``), or over files and folders into a folder of outputs (``tools/predict.py``)."""

from .inputs import Inputs, annotated_inputs, collect_inputs
from .model import PredictError, Predictor
from .results import ClassPrediction, DetectionPrediction
from .run import predict_folder, task_options

__all__ = ["ClassPrediction", "DetectionPrediction", "Inputs", "PredictError", "Predictor", "annotated_inputs",
           "collect_inputs", "predict_folder", "task_options"]
