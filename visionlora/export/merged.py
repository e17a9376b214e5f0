"""Merged export: fold LoRA into the weights (W ← W + scale·B·A, Hu et al. 2021, arXiv:2106.09685, section 4.1)
and write a plain timm ``local-dir`` folder that loads with no visionlora code, checked at every export.

The folder is written to a temporary sibling, loaded back through timm alone, compared with the adapted (unmerged)
model on real or random images, and only then renamed into place: a failed check or a crash leaves no output. Its
``config.json`` carries the run's evaluation preprocessing (``input_size``, ``interpolation``, ``mean``, ``std``,
``crop_pct``, ``crop_mode``), checked to read back unchanged, so ``timm.data.create_transform(
**timm.data.resolve_data_config(model=m))`` preprocesses test images exactly as the run's evaluation did.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from visionlora.files import staged_folder
from visionlora.lora import unload_lora
from visionlora.models import save_backbone

from .sources import ExportError, ExportSource

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Largest accepted max|exported - adapted| / max|adapted| over the check batch. fp32 only reorders float sums
# (merging changes the order of additions); fp16 keeps ~11 bits and bf16 ~8 bits per weight and activation.
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 8e-2}
REPORT_NAME = "export_report.json"
ONNX_NAME = "model.onnx"
ONNX_TOLERANCE = 1e-4


class VerificationError(RuntimeError):
    """The exported model does not reproduce the adapted model within the tolerance; nothing was written."""


@dataclass
class ExportReport:
    """What was written and how closely it reproduces the adapted model."""

    output: str
    source: str
    architecture: str
    num_classes: int
    dtype: str
    inputs: str
    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    load_with_timm: tuple[str, ...] = ()
    onnx_max_rel_diff: float | None = None
    onnx_checked: bool = False

    def __str__(self) -> str:
        lines = [f"exported {self.architecture} ({self.num_classes} classes, {self.dtype}) to {self.output}",
                 f"check on {self.inputs}: max |diff| {self.max_abs_diff:.3g}, relative {self.max_rel_diff:.3g} "
                 f"(tolerance {self.tolerance:g})"]
        if self.onnx_checked:
            lines.append(f"ONNX vs PyTorch (onnxruntime): relative {self.onnx_max_rel_diff:.3g}")
        lines += ["load it without visionlora, either way:", *(f"  {line}" for line in self.load_with_timm)]
        return "\n".join(lines)


def export_merged(source: ExportSource, output: str | Path, dtype: str = "fp32", tolerance: float | None = None,
                  onnx: bool = False, force: bool = False, batch_size: int = 8) -> ExportReport:
    """Merge ``source.model``'s LoRA into its weights and write a plain timm folder at ``output``.

    Args:
        dtype: Weight precision written: ``fp32``, ``fp16`` or ``bf16``.
        tolerance: Largest accepted relative difference (default per dtype, see ``TOLERANCES``).
        onnx: Also write ``model.onnx`` (fp32 graph of the merged weights), checked with onnxruntime if installed.
        force: Replace an existing ``output``; without it an existing output is an error.
        batch_size: Random inputs used when the source has no real images.

    Raises:
        ExportError: Bad arguments or an existing output without ``force``.
        VerificationError: The written model differs from the adapted one by more than the tolerance.
    """
    output, tolerance = Path(output), checked_tolerance(dtype, tolerance)
    with staged_export(output, force) as staging:
        return _write_and_check(source, staging, output, dtype, tolerance, onnx, batch_size)


def checked_tolerance(dtype: str, tolerance: float | None) -> float:
    """The accepted relative difference for ``dtype`` (its default from :data:`TOLERANCES` unless given)."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return TOLERANCES[dtype] if tolerance is None else tolerance


@contextmanager
def staged_export(output: Path, force: bool) -> Iterator[Path]:
    """:func:`visionlora.files.staged_folder` for an export: an existing ``output`` is an :class:`ExportError`
    (before any work) unless ``force``, and then it is replaced only once the new folder passed its check."""
    if output.exists() and not force:
        raise ExportError(f"{output} exists; pass force=True (--force) to replace it")
    with staged_folder(output, replace=force) as staging:
        yield staging


def merged_copy(model: nn.Module, dtype: str = "fp32") -> nn.Module:
    """A plain timm model with every LoRA update folded in; ``model`` itself stays adapted and unmerged."""
    plain = unload_lora(copy.deepcopy(model)).eval()
    for param in plain.parameters():
        param.requires_grad_(False)
    return plain.to(DTYPES[dtype])


def _write_and_check(source: ExportSource, folder: Path, output: Path, dtype: str, tolerance: float, onnx: bool,
                     batch_size: int) -> ExportReport:
    plain = merged_copy(source.model, dtype)
    _check_plain_keys(plain, source)
    save_backbone(plain, folder, data_config=source.data_config, label_names=source.label_names)
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    _check_written_preprocessing(loaded, source, output)
    images, inputs = _check_images(source, batch_size)
    abs_diff, rel_diff = compare_outputs(source.model, loaded.to(DTYPES[dtype]), images)
    report = ExportReport(str(output), source.description, source.architecture, source.num_classes, dtype, inputs,
                          abs_diff, rel_diff, tolerance, load_hints(folder, output))
    if not rel_diff <= tolerance:  # also catches NaN
        raise VerificationError(f"exported model differs from the adapted one: relative {rel_diff:.3g} > "
                                f"tolerance {tolerance:g} ({dtype}); nothing written to {output}")
    if onnx:
        from .onnx import export_onnx  # optional extra

        report.onnx_checked, report.onnx_max_rel_diff = export_onnx(loaded.float(), images, folder / ONNX_NAME)
        if report.onnx_checked and not report.onnx_max_rel_diff <= ONNX_TOLERANCE:
            raise VerificationError(f"ONNX output differs from PyTorch: relative {report.onnx_max_rel_diff:.3g} > "
                                    f"{ONNX_TOLERANCE:g}; nothing written to {output}")
    (folder / REPORT_NAME).write_text(json.dumps(asdict(report), indent=2))
    return report


@torch.no_grad()
def compare_outputs(reference: nn.Module, exported: nn.Module, images: torch.Tensor) -> tuple[float, float]:
    """Max absolute difference of the two models' outputs, and that divided by the reference's largest output."""
    expected = reference(images.float()).float()
    dtype = next(exported.parameters()).dtype
    actual = exported(images.to(dtype)).float()
    abs_diff = (actual - expected).abs().max().item()
    return abs_diff, abs_diff / max(expected.abs().max().item(), 1e-12)


def load_hints(folder: Path, output: Path) -> tuple[str, ...]:
    """The two plain-timm ways to load the written folder, with the constructor arguments timm recorded."""
    config = json.loads((folder / "config.json").read_text())
    extra = {k: v for k, v in config.get("model_args", {}).items() if k != "num_classes"}
    n = config["num_classes"]
    args = "".join(f", {k}={tuple(v) if isinstance(v, list) else v!r}" for k, v in extra.items())
    return (f'timm.create_model("local-dir:{output}", pretrained=True)',
            # num_classes goes into the overlay too: timm drops a checkpoint's head whose size differs from the
            # architecture's default pretrained config (1000 ImageNet classes).
            f'timm.create_model("{config["architecture"]}", pretrained=True, num_classes={n}, '
            f'pretrained_cfg_overlay=dict(file="{output / "model.safetensors"}", num_classes={n}){args})')


def _check_plain_keys(plain: nn.Module, source: ExportSource) -> None:
    """The merged state_dict must have exactly the keys of the plain timm architecture."""
    fresh = timm.create_model(source.architecture, pretrained=False, num_classes=source.num_classes,
                              **source.model_args)
    expected, actual = set(fresh.state_dict()), set(plain.state_dict())
    if expected != actual:
        extra, missing = sorted(actual - expected)[:3], sorted(expected - actual)[:3]
        raise ExportError(f"merged {source.architecture} state_dict differs from timm's: extra {extra}, "
                          f"missing {missing}")


def _check_written_preprocessing(loaded: nn.Module, source: ExportSource, output: Path) -> None:
    """timm must resolve from the written config.json the preprocessing the run evaluated with."""
    resolved = timm.data.resolve_data_config(model=loaded)
    differ = {key: (value, resolved.get(key)) for key, value in source.data_config.items()
              if _as_tuple(resolved.get(key)) != _as_tuple(value)}
    if differ:
        described = ", ".join(f"{key} {want!r} written as {got!r}" for key, (want, got) in differ.items())
        raise VerificationError(f"exported config.json does not give timm the run's preprocessing: {described}; "
                                f"nothing written to {output}")


def _as_tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _check_images(source: ExportSource, batch_size: int) -> tuple[torch.Tensor, str]:
    if source.sample_images is not None:
        return source.sample_images, f"{len(source.sample_images)} real test images"
    size = tuple(source.data_config.get("input_size", (3, 224, 224)))
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, *size, generator=generator), f"{batch_size} random inputs of {size}"
