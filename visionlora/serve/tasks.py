"""The tasks a server answers: each one an adapter and its own head on one shared, frozen base backbone.

A task's source is a classification run trained with ``method: lora`` (its ``adapter/`` folder; label names and
the evaluation transform come from the run, as :meth:`visionlora.predict.Predictor.from_source` takes them) or an
adapter folder (the base weights then come from ``--base-weights`` or the adapter's own base). Every task must
name the same base: architecture, ``model_args`` and pretrained weights (a weights file is compared by its
sha256), so that one copy of the backbone in memory serves them all (:mod:`visionlora.lora.adapters`).

:func:`resolve_tasks` reads and checks the sources without building anything big; :func:`build_tasks` builds the
base once and loads every adapter into it under its task's name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import timm
import torch
from torch import nn

from visionlora.export import ExportError
from visionlora.export.sources import CHECKPOINT_DIR, find_checkpoint, read_checkpoint
from visionlora.files import file_sha256
from visionlora.lora import load_adapter
from visionlora.lora.adapter_files import CONFIG_NAME, PREFIX, WEIGHTS_NAME, read_adapter_config
from visionlora.lora.adapters import check_adapter_name
from visionlora.models import create_backbone
from visionlora.models.backbone import LOCAL_DIR, pretrained_weights_file, resolve_backbone

ADAPTER_DIR = "adapter"  # where a run directory keeps its adapter


class ServeError(ValueError):
    """A task or option the server cannot start with; the message names the task at fault."""


@dataclass(frozen=True)
class BaseSpec:
    """The backbone a task was trained on.

    Attributes:
        architecture: timm architecture name.
        model_args: Extra ``timm.create_model`` arguments (``img_size``, ...).
        pretrained: Weights from the hub (timm's default tag of ``architecture``).
        weights: A weights file or ``local-dir:<folder>``, absolute; None with ``pretrained`` (or no weights).
    """

    architecture: str
    model_args: dict = field(default_factory=dict)
    pretrained: bool = False
    weights: str | None = None

    def identity(self) -> tuple[str, str, str]:
        """What two tasks must share: architecture, model_args and a fingerprint of the weights."""
        if self.weights:
            fingerprint = f"sha256:{weights_sha256(pretrained_weights_file(self.weights, self.architecture))}"
        else:
            fingerprint = "hub" if self.pretrained else "none"
        return self.architecture, json.dumps(self.model_args, sort_keys=True), fingerprint

    def describe(self) -> str:
        args = f" {json.dumps(self.model_args, sort_keys=True)}" if self.model_args else ""
        weights = self.weights or ("hub weights" if self.pretrained else "no weights")
        return f"{self.architecture}{args} with {weights}"


@dataclass
class TaskSpec:
    """One task as resolved from its source, before anything is built.

    Attributes:
        name: The task's name in requests (also its adapter's name on the shared model).
        source: What was given on the command line.
        adapter_dir: The adapter folder.
        base: The backbone the adapter was trained on.
        num_classes: The size of the adapter's head.
        datamodule: A run's data module settings (label names, preprocessing); None for an adapter folder.
    """

    name: str
    source: Path
    adapter_dir: Path
    base: BaseSpec
    num_classes: int
    datamodule: dict | None = None


@dataclass
class ServedTask:
    """What answering a request of one task needs, besides the shared model."""

    name: str
    label_names: list[str]
    data_config: dict  # timm's data configuration of the evaluation transform

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def transform(self):
        """The evaluation transform (PIL image in, normalised tensor out), timm's own, as ``Predictor`` builds it."""
        return timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=self.data_config))


def parse_task(text: str) -> tuple[str, str]:
    """``NAME=SOURCE`` as given to ``--task``."""
    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise ServeError(f"--task {text!r}: give NAME=SOURCE (a run directory or an adapter folder)")
    try:
        check_adapter_name(name)
    except ValueError as error:
        raise ServeError(f"--task {text!r}: task {error}") from None
    return name, source


def resolve_tasks(tasks: list[tuple[str, str]], base_weights: str | None = None) -> list[TaskSpec]:
    """Read every task's source and check that all share one base backbone.

    Args:
        tasks: ``(name, source)`` pairs; names must be unique.
        base_weights: For adapter-folder sources: the base's weights file or ``local-dir:<folder>``.

    Raises:
        ServeError: a duplicate name, a source that is neither a run nor an adapter folder, or a task whose base
            differs from the first task's (named).
    """
    if not tasks:
        raise ServeError("give at least one --task NAME=SOURCE")
    names = [name for name, _ in tasks]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ServeError(f"task {repeated[0]!r} is given more than once")
    specs = [resolve_task(name, Path(source), base_weights) for name, source in tasks]
    check_same_base(specs)
    return specs


def resolve_task(name: str, source: Path, base_weights: str | None = None) -> TaskSpec:
    """One task's adapter folder, base and head size, from a run directory or an adapter folder."""
    if not source.exists():
        raise ServeError(f"task {name!r}: {source} does not exist")
    if (source / WEIGHTS_NAME).is_file():
        return _from_adapter_folder(name, source, base_weights)
    if source.is_dir() and (source / CHECKPOINT_DIR).is_dir():
        return _from_run(name, source)
    raise ServeError(f"task {name!r}: {source} is neither a run directory (with {CHECKPOINT_DIR}/) nor an adapter "
                     f"folder (with {WEIGHTS_NAME})")


def check_same_base(specs: list[TaskSpec]) -> None:
    """Every task's base is the first task's, else a ServeError naming the first task that differs."""
    first = specs[0]
    for spec in specs[1:]:
        if spec.base.identity() != first.base.identity():
            raise ServeError(f"task {spec.name!r} was trained on {spec.base.describe()}, but task {first.name!r} on "
                             f"{first.base.describe()}: all tasks must share one base backbone (same architecture, "
                             f"model_args and weights)")


def build_tasks(specs: list[TaskSpec], device: str | torch.device = "cpu") -> tuple[nn.Module, list[ServedTask]]:
    """The shared base with every task's adapter (named after the task), in eval mode, and what each task needs.

    Raises:
        ServeError: an adapter that does not fit the base (named).
    """
    first = specs[0]
    base = first.base
    try:
        model = create_backbone(base.architecture, first.num_classes, base.pretrained, base.weights, base.model_args)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as error:
        raise ServeError(f"task {first.name!r}: cannot build its base {base.describe()}: {error}") from error
    served = []
    for spec in specs:
        try:
            load_adapter(model, spec.adapter_dir, name=spec.name)
        except (ValueError, KeyError, FileNotFoundError) as error:
            raise ServeError(f"task {spec.name!r}: adapter {spec.adapter_dir} does not fit the shared base: {error}"
                             ) from error
        served.append(ServedTask(spec.name, *_task_metadata(model, spec)))
    return model.to(device).eval(), served


@cache
def weights_sha256(path: Path) -> str:
    """:func:`visionlora.files.file_sha256`, once per file (every task of one base names the same weights)."""
    return file_sha256(path)


def _from_run(name: str, run_dir: Path) -> TaskSpec:
    try:
        saved = read_checkpoint(find_checkpoint(run_dir))
    except ExportError as error:
        raise ServeError(f"task {name!r}: {error}") from None
    hparams = saved["hyper_parameters"]
    if "detector" in hparams:
        raise ServeError(f"task {name!r}: {run_dir} is a detection run; the server answers classifiers only")
    if hparams.get("method") != "lora":
        raise ServeError(f"task {name!r}: {run_dir} was trained with method {hparams.get('method')!r}, which changes "
                         f"the base; only method 'lora' runs share one backbone")
    adapter_dir = run_dir / ADAPTER_DIR
    if not (adapter_dir / WEIGHTS_NAME).is_file():
        raise ServeError(f"task {name!r}: run directory {run_dir} has no {ADAPTER_DIR}/{WEIGHTS_NAME}")
    base = _base_spec(name, hparams["backbone"], dict(hparams.get("model_args") or {}),
                      bool(hparams.get("pretrained")), hparams.get("pretrained_file"))
    return TaskSpec(name, run_dir, adapter_dir, base, int(hparams["num_classes"]),
                    saved.get("datamodule_hyper_parameters"))


def _from_adapter_folder(name: str, folder: Path, base_weights: str | None) -> TaskSpec:
    config = _read_json(folder / CONFIG_NAME, name)
    own = _own_metadata(folder / WEIGHTS_NAME, name)
    saved_base = config.get("base_model_name_or_path")
    if base_weights is None and isinstance(saved_base, str) and saved_base.startswith(LOCAL_DIR):
        base_weights = saved_base
    if base_weights is not None:
        architecture = resolve_backbone(saved_base, base_weights, None)[0]
        spec = _base_spec(name, architecture, {}, False, base_weights)
    elif saved_base:
        spec = BaseSpec(saved_base, pretrained=True)  # the adapter names a hub model: its default weights
    else:
        raise ServeError(f"task {name!r}: adapter {folder} names no base model; pass --base-weights")
    head = (own or {}).get("head") or {}
    classes = head.get("num_classes") or _saved_head_classes(folder / WEIGHTS_NAME, config)
    if not classes:
        raise ServeError(f"task {name!r}: adapter {folder} holds no classifier head; the server needs one per task")
    return TaskSpec(name, folder, folder, spec, int(classes))


def _base_spec(name: str, architecture: str, model_args: dict, pretrained: bool, weights: str | None) -> BaseSpec:
    if not weights:
        if not pretrained:
            raise ServeError(f"task {name!r}: its base {architecture} has no pretrained weights, so the frozen "
                             f"backbone it was trained on cannot be rebuilt")
        return BaseSpec(architecture, model_args, pretrained=True)
    prefix = LOCAL_DIR if weights.startswith(LOCAL_DIR) else ""
    path = Path(weights.removeprefix(LOCAL_DIR)).resolve()
    if not path.exists():
        raise ServeError(f"task {name!r}: base weights {path} do not exist")
    architecture = resolve_backbone(architecture, f"{prefix}{path}", None)[0]
    return BaseSpec(architecture, model_args, weights=f"{prefix}{path}")


def _task_metadata(model: nn.Module, spec: TaskSpec) -> tuple[list[str], dict]:
    """Label names and the evaluation transform's data configuration of one task.

    A run's come from its data module, by the very resolution ``Predictor.from_source`` and the export use (so the
    served transform cannot differ); an adapter folder's are its saved label names (else class indices) and the
    base's own data configuration.
    """
    from visionlora.export.sources import PREPROCESSING_KEYS
    from visionlora.export.sources import classifier_run_data as run_data
    from visionlora.lora import adapter_info

    names, config = None, None
    if spec.datamodule:
        names, _, config = run_data(spec.datamodule, model, 0)
    if config is None:
        resolved = timm.data.resolve_model_data_config(model)
        config = {key: resolved[key] for key in PREPROCESSING_KEYS if key in resolved}
    names = names or adapter_info(model, spec.name).label_names or [str(i) for i in range(spec.num_classes)]
    return list(names), config


def _read_json(path: Path, name: str) -> dict:
    try:
        return read_adapter_config(path)
    except (FileNotFoundError, ValueError) as error:
        raise ServeError(f"task {name!r}: {error}") from None


def _own_metadata(path: Path, name: str) -> dict | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ServeError(f"task {name!r}: {path} is not a readable safetensors file ({error})") from None
    return json.loads(metadata["visionlora"]) if "visionlora" in metadata else None


def _saved_head_classes(path: Path, config: dict) -> int | None:
    """A PEFT adapter's head size: the rows of its first ``modules_to_save`` module's weight."""
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        for module in config.get("modules_to_save") or []:
            key = f"{PREFIX}{module}.weight"
            if key in handle.keys():
                return handle.get_slice(key).get_shape()[0]
    return None
