"""What a benchmark cell's result depends on, stored in its results row so a resume never mixes settings.

Every row of ``results.csv`` carries the settings it was measured under as readable columns (backbone, weights file
and its sha256, steps, batch, preprocessing, method spec, dataset, classes, root, protocol, queries) and a short
hash of them (``settings``), which is part of the cell's key. A results folder whose rows were measured under
other settings is refused, naming each differing setting with its old and new value, instead of resuming into it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from visionlora.files import file_sha256
from visionlora.models.backbone import pretrained_weights_file

from .cells import Backbone
from .methods import MethodSpec
from .results import SETTING_FIELDS, settings_hash

SWEEP_FIELDS = tuple(f for f in SETTING_FIELDS if f != "method_spec")  # the same for every method of a sweep


def sweep_settings(config, backbone: Backbone, preprocessing: dict) -> dict[str, str]:
    """The sweep-wide settings of a :class:`~visionlora.benchmark.sweep.SweepConfig` as CSV strings.

    ``root`` is resolved (one folder, whatever the working directory); ``weights_sha256`` is the sha256 of the
    weights file, or of the weights of a ``local-dir:`` folder (``model.safetensors``).
    """
    omniglot = config.protocol in ("omniglot", "omniglot-validation")
    return {
        "protocol": config.protocol,
        "dataset": "omniglot" if omniglot else config.dataset,
        "classes": "" if omniglot else config.classes,
        "root": str(Path(config.root).resolve()) if config.root else "",
        "backbone": backbone.name,
        "pretrained": json.dumps(backbone.pretrained),
        "model_args": _json(backbone.model_args) if backbone.model_args else "",
        "pretrained_file": backbone.pretrained_file or "",
        "weights_sha256": weights_sha256(backbone) if backbone.pretrained_file else "",
        "preprocessing": _json(preprocessing),
        "steps": str(config.steps),
        "batch_size": str(config.batch_size),
        "warmup_fraction": str(config.warmup_fraction),
        "queries": str(config.queries) if config.protocol == "episodic" else "",
    }


def method_settings(sweep: dict[str, str], spec: MethodSpec) -> dict[str, str]:
    """The sweep's settings plus the method's own (learning rates, rank, scope, ...) and their hash."""
    # Defaults added later (a linear head, the cross-entropy objective) are left out, so rows written before those
    # fields existed keep their hash.
    later_defaults = {"cosine_scale": None, "objective": "ce", "freeze_A": False}
    spec_fields = {k: v for k, v in dataclasses.asdict(spec).items()
                   if k != "name" and not (k in later_defaults and v == later_defaults[k])}
    settings = sweep | {"method_spec": _json(spec_fields)}
    return settings | {"settings": settings_hash(settings)}


def weights_sha256(backbone: Backbone) -> str:
    """sha256 of ``backbone.pretrained_file`` (for a ``local-dir:`` folder, of its weights file)."""
    return file_sha256(pretrained_weights_file(backbone.pretrained_file, backbone.name))


def check_same_settings(rows: list[dict], sweep: dict[str, str], methods: dict[str, dict[str, str]],
                        path: Path) -> None:
    """Raise unless every row of ``path`` was measured under ``sweep`` (and, for this sweep's methods, their spec).

    Args:
        rows: The rows already in the results file.
        sweep: :func:`sweep_settings` of this run.
        methods: ``{method name: method_settings(...)}`` of this run's methods.
        path: The results file, for the message.

    Raises:
        ValueError: One line naming each differing setting, its old and new value, and the way out (a new --out).
    """
    differences: dict[str, tuple[str, str]] = {}
    for row in rows:
        for name in SWEEP_FIELDS:
            if row[name] != sweep[name]:
                differences.setdefault(name, (row[name], sweep[name]))
        spec = methods.get(row["method"])
        if spec is not None and row["method_spec"] != spec["method_spec"]:
            differences.setdefault(f"method_spec of {row['method']}", (row["method_spec"], spec["method_spec"]))
    if differences:
        listed = "; ".join(f"{name} {old or '(none)'} -> {new or '(none)'}" for name, (old, new) in
                           differences.items())
        raise ValueError(f"{path} holds cells measured under other settings ({listed}); pass a new --out for "
                         f"these settings (or move the old folder away)")


def _json(value) -> str:
    return json.dumps(value, sort_keys=True, default=list)
