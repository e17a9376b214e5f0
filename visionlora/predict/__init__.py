"""Use what you trained: a classifier or detector from a run, a checkpoint, a merged export or base + adapter,
run on new images (``Predictor``), or over files and folders into a folder of outputs (``tools/predict.py``)."""

from .inputs import Inputs, collect_inputs
from .model import PredictError, Predictor
from .results import ClassPrediction, DetectionPrediction
from .run import predict_folder

__all__ = ["ClassPrediction", "DetectionPrediction", "Inputs", "PredictError", "Predictor", "collect_inputs",
           "predict_folder"]
