"""ONNX export of a merged model, checked against PyTorch with onnxruntime when it is installed
(``pip install "visionlora[onnx]"``)."""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)
OPSET = 17


def export_onnx(model: nn.Module, images: torch.Tensor, path: Path) -> tuple[bool, float | None]:
    """Write ``model`` (fp32, eval) to ``path`` with a dynamic batch axis.

    Returns:
        ``(checked, max relative difference)``: ``checked`` is False (difference None) when onnxruntime is absent.
    """
    images = images.float()
    with warnings.catch_warnings():
        # The TorchScript-based exporter warns about traced Python conditionals; the check below is what counts.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (images,), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=OPSET,
                          dynamo=False)
    if importlib.util.find_spec("onnxruntime") is None:
        logger.warning("onnxruntime is not installed: %s written but not checked (pip install 'visionlora[onnx]')",
                       path)
        return False, None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    with torch.no_grad():
        expected = model(images).float()
    return True, (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-12)
