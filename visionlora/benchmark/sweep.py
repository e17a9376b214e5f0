"""Run a few-shot benchmark: every (method, cell) of one protocol, resumable, then the table and the plots."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path

import timm
import torch
from tqdm import tqdm

from visionlora.data.sources.omniglot import CENTRED_RENDERS
from visionlora.files import write_text_atomic

from .cells import Backbone, Budget, CellData, has_attention, run_cell
from .methods import MethodSpec, parse_method
from .plots import plot_accuracy_vs_params, plot_accuracy_vs_shots, plot_error_with_references
from .protocols import (
    NUM_RUNS,
    ONE_SHOT_PROTOCOLS,
    PROTOCOLS,
    CellKey,
    check_runs_root,
    data_module,
    episodic_cells,
    kshot_cells,
    omniglot_cells,
    omniglot_validation_cells,
    runs_preprocessing,
)
from .results import ResultsLog, markdown_table, summarise
from .settings import check_same_settings, method_settings, sweep_settings

logger = logging.getLogger(__name__)

# Published 20-way 1-shot error rates on the official runs (Lake et al. 2015, Science, table/figure 3):
# people, Bayesian Program Learning, Siamese convnet (Koch et al. 2015; learned from the full 30-alphabet
# background set) and modified Hausdorff distance (no learning).
OMNIGLOT_REFERENCES = {"people": 4.5, "Bayesian Program Learning": 3.3, "Siamese convnet (30 alphabets)": 8.0,
                       "modified Hausdorff distance (no learning)": 38.8}


@dataclass
class SweepConfig:
    """Everything a benchmark run needs; the YAML files under ``configs/benchmark/`` set these fields.

    Attributes:
        name: Names the output folder ``<out>``'s default (``runs/fewshot_benchmark/<name>``).
        protocol: ``kshot``, ``episodic`` or ``omniglot``.
        dataset, root, classes: ``FewShotDataModule`` arguments (``digits``, ``imagefolder``, ``omniglot``), or
            ``torchvision:pets|flowers102|aircraft|food101|cars`` with ``root`` where torchvision keeps them.
        backbone, pretrained, pretrained_file, model_args: the backbone every cell starts from.
        methods: Method names (see :func:`~visionlora.benchmark.methods.parse_method`).
        shots: Shot counts (kshot, episodic).
        seeds: Seeds of the k-shot draws (kshot).
        ways, queries, episodes: Episode shape and count (episodic).
        runs: Official run numbers to use (omniglot; None: all 20).
        render: The centred render the Omniglot images are read in (omniglot, omniglot-validation): the one the
            backbone was pretrained on, ``centred`` (28 px) or ``centred56``.
        steps, batch_size, warmup_fraction: Optimisation budget of each cell.
        threads: torch intra-op threads (None: torch's default). Tiny backbones run fastest on 1: more threads
            spin against each other, and on a shared machine that made cells 50x slower.
        out: Output folder (``results.csv``, ``summary.md``, PNGs).
    """

    name: str = "digits"
    protocol: str = "kshot"
    dataset: str = "digits"
    root: str | None = None
    classes: str = "novel"
    backbone: str = "test_resnet"
    pretrained: bool = False
    pretrained_file: str | None = "local-dir:data/weights/resnet_digits"
    model_args: dict | None = None
    methods: list[str] = field(default_factory=lambda: ["ncm", "linear", "full", "lora-r2"])
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    ways: int = 5
    queries: int = 15
    episodes: int = 20
    runs: list[int] | None = None
    render: str = "centred"
    steps: int = 60
    batch_size: int = 16
    warmup_fraction: float = 0.1
    threads: int | None = None
    out: str | None = None

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> SweepConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}; known: {sorted(known)}")
        config = cls(**values)
        if config.protocol not in PROTOCOLS:
            raise ValueError(f"{source}: protocol must be one of {PROTOCOLS}, got {config.protocol!r}")
        if config.root is None and (config.protocol in ONE_SHOT_PROTOCOLS or config.dataset != "digits"):
            # Shipped configs name no dataset folder outside the repository: the caller passes it.
            what = {"omniglot": "the folder holding Omniglot's all_runs.zip",
                    "omniglot-validation": "the folder holding images_background_small1.zip and "
                                           "images_background_small2.zip"}.get(
                config.protocol, f"the folder of dataset {config.dataset!r}")
            raise ValueError(f"{source}: root is not set; pass --root DIR ({what})")
        for method in config.methods:
            parse_method(method)  # fail before any training on a misspelt method
        _check_cell_choices(config, set(values), source)
        return config

    @property
    def output_dir(self) -> Path:
        return Path(self.out or f"runs/fewshot_benchmark/{self.name}")


@dataclass
class PlannedCell:
    """One (method, cell) of a sweep: its method, its row key in ``results.csv`` (settings included) and its data."""

    spec: MethodSpec
    row: dict
    key: CellKey
    data: CellData


@dataclass
class SweepPlan:
    """A checked sweep, nothing run and nothing written yet (:func:`prepare_sweep`); :func:`execute_sweep` runs it."""

    config: SweepConfig
    backbone: Backbone
    preprocessing: dict
    settings: dict[str, str]  # the sweep-wide settings every row carries (settings.sweep_settings)
    log: ResultsLog
    cells: list[PlannedCell]


@dataclass
class SweepOutcome:
    """What :func:`execute_sweep` did: the summary of this sweep's finished cells, how many of how many."""

    summary: list[dict]
    finished: int
    total: int
    interrupted: bool


def prepare_sweep(config: SweepConfig) -> SweepPlan:
    """Every check a sweep needs before its first cell: data, weights, methods, and the results already in ``<out>``.

    Raises:
        ValueError, FileNotFoundError: One line naming what is wrong, e.g. a results folder holding cells of
            other settings (see :func:`~visionlora.benchmark.settings.check_same_settings`).
    """
    specs = [parse_method(method) for method in config.methods]
    backbone = Backbone(config.backbone, config.pretrained, config.pretrained_file, config.model_args)
    _check_methods_fit(specs, backbone)
    log = ResultsLog(config.output_dir / "results.csv")
    preprocessing, cells = _cells(config, backbone)
    sweep = sweep_settings(config, backbone, preprocessing)
    per_method = {spec.name: method_settings(sweep, spec) for spec in specs}
    check_same_settings(log.rows, sweep, per_method, log.path)
    planned = [PlannedCell(spec, per_method[spec.name] | {"method": spec.name, "ways": key.ways, "shots": key.shots,
                                                          "trial": key.trial}, key, data)
               for key, data in cells for spec in specs]
    return SweepPlan(config, backbone, preprocessing, sweep, log, planned)


def execute_sweep(plan: SweepPlan, progress: bool = True) -> SweepOutcome:
    """Run every planned cell not yet in ``results.csv`` (each appended once finished), then write the report.

    Ctrl-C stops after the running cell, which is lost; the report then says how many cells it holds.
    """
    config, log = plan.config, plan.log
    if config.threads:
        torch.set_num_threads(config.threads)
    todo = [cell for cell in plan.cells if not log.done(cell.row)]
    logger.info("%d cells to run (%d already in %s)", len(todo), len(plan.cells) - len(todo), log.path)
    interrupted = False
    try:
        for cell in tqdm(todo, desc=f"{config.name} cells", disable=not progress):
            result = run_cell(cell.spec, plan.backbone, cell.data, plan.preprocessing, _budget(config),
                              seed=cell.key.trial)
            log.append(cell.row | {
                "accuracy": result.accuracy, "trainable_params": result.trainable_params,
                "total_params": result.total_params, "seconds": round(result.seconds, 2)})
    except KeyboardInterrupt:
        interrupted = True
        print(f"\ninterrupted: finished cells are in {log.path}; rerun the same command to continue")
    rows = [log.get(cell.row) for cell in plan.cells if log.done(cell.row)]
    summary = summarise(rows)
    write_report(config, summary, config.output_dir, weights_sha256=plan.settings["weights_sha256"],
                 finished=len(rows), total=len(plan.cells))
    return SweepOutcome(summary, len(rows), len(plan.cells), interrupted)


def run_sweep(config: SweepConfig, progress: bool = True) -> list[dict]:
    """Run every cell not yet in ``<out>/results.csv``, then write ``summary.md`` and the plots; returns the summary
    (of this sweep's cells only)."""
    return execute_sweep(prepare_sweep(config), progress).summary


def write_report(config: SweepConfig, summary: list[dict], out: Path, weights_sha256: str = "",
                 finished: int | None = None, total: int | None = None) -> None:
    """``summary.md`` (the table, plus the published references for Omniglot) and the two PNGs.

    ``summary`` must hold only cells of ``config``'s settings, which its header names. With ``finished`` below
    ``total`` (an interrupted sweep) the summary's first line and the plot titles say "k of n cells".
    """
    omniglot = config.protocol == "omniglot"
    one_shot = config.protocol in ONE_SHOT_PROTOCOLS
    table = markdown_table(summary, error_rate=one_shot, order=config.methods)
    dataset = {"omniglot": "omniglot (official runs)", "omniglot-validation": "omniglot (validation episodes from "
               "held-out background alphabets)"}.get(config.protocol, config.dataset)
    digest = f", sha256 {weights_sha256[:12]}" if weights_sha256 else ""
    weights = f" ({config.pretrained_file}{digest})" if config.pretrained_file else ""
    partial = finished is not None and total is not None and finished < total
    lines = [f"**Partial summary: {finished} of {total} cells** (interrupted; rerun the same command to run the "
             f"rest).", ""] if partial else []
    lines += [f"# {config.name}: {config.protocol} on {dataset}, backbone {config.backbone}{weights}", "",
              f"{config.steps} AdamW steps per cell, batch {config.batch_size}; mean ± 95% CI (Student t) over "
              f"{'runs' if omniglot else 'episodes' if config.protocol != 'kshot' else 'seeds'}"
              f"{f'; {total} cells' if total is not None and not partial else ''}.", "", table]
    if omniglot:
        lines += ["", "Published references (20-way 1-shot error %, same 20 runs):", "",
                  *[f"- {name}: {error}%" for name, error in OMNIGLOT_REFERENCES.items()]]
    write_text_atomic(out / "summary.md", "\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    if not summary:
        return
    marker = f" (partial: {finished} of {total} cells)" if partial else ""
    if one_shot:
        order = {m: i for i, m in enumerate(config.methods)}
        ordered = sorted(summary, key=lambda s: order.get(s["method"], len(order)))
        # The published figures are on the official runs only; the validation plot has no references beside it.
        references, what = (OMNIGLOT_REFERENCES, "20 official runs") if omniglot else ({}, "validation episodes")
        plot_error_with_references(ordered, references, out / "error_vs_references.png",
                                   f"Omniglot 20-way 1-shot, {what}{marker}")
        return
    title = f"{config.dataset}, {config.backbone}{marker}"
    plot_accuracy_vs_shots(summary, out / "accuracy_vs_shots.png", title)
    plot_accuracy_vs_params(summary, out / "accuracy_vs_params.png", title)


def _cells(config: SweepConfig, backbone: Backbone) -> tuple[dict, list[tuple[CellKey, CellData]]]:
    if config.protocol == "omniglot":  # the runs and the bundled weights only: no background archives needed
        check_runs_root(config.root)
        raw = any(parse_method(method).method == "raw-nn" for method in config.methods)
        cells = list(omniglot_cells(config.root, config.runs, raw=raw, render=config.render))
        return _one_shot_preprocessing(config, backbone), cells
    if config.protocol == "omniglot-validation":
        cells = list(omniglot_validation_cells(config.root, config.episodes, config.seeds, config.render))
        return _one_shot_preprocessing(config, backbone), cells
    data = data_module(config.dataset, config.root, config.classes)
    data.set_data_config(_backbone_data_config(backbone))
    if config.protocol == "episodic":
        return data.preprocessing, list(episodic_cells(data, config.ways, config.shots, config.queries,
                                                       config.episodes))
    return data.preprocessing, list(kshot_cells(data, config.shots, config.seeds))


def _one_shot_preprocessing(config: SweepConfig, backbone: Backbone) -> dict:
    """The Omniglot protocols' preprocessing; a render other than the default is part of it (and so of the
    settings every row records), the default is left out so that earlier rows keep their settings hash."""
    render = {} if config.render == "centred" else {"render": config.render}
    return runs_preprocessing(_backbone_data_config(backbone)) | render


# The fields that choose a protocol's cells; a field given to a protocol that does not use it is an error, not
# silently ignored. The Omniglot runs are 1-shot: shots may only be [1] there.
PROTOCOL_FIELDS = {"kshot": ("shots", "seeds", "dataset", "classes"),
                   "episodic": ("ways", "shots", "queries", "episodes", "dataset", "classes"),
                   "omniglot": ("runs", "render"), "omniglot-validation": ("episodes", "seeds", "render")}
LIST_FIELDS = ("methods", "shots", "seeds", "runs")
MINIMUM = {"shots": 1, "seeds": 0, "ways": 2, "queries": 1, "episodes": 1, "steps": 1, "batch_size": 1}


def _check_cell_choices(config: SweepConfig, given: set[str], source: str) -> None:
    """Raise naming the first field that is of the wrong kind, out of range, repeated or unused by the protocol."""
    used = PROTOCOL_FIELDS[config.protocol]
    for name in sorted(given & {f for fs in PROTOCOL_FIELDS.values() for f in fs} - set(used)):
        value = getattr(config, name)
        if config.protocol == "omniglot" and (name, value) in (("shots", [1]), ("dataset", "omniglot")):
            continue
        if config.protocol == "omniglot" and name == "shots":
            raise ValueError(f"{source}: shots {value} with protocol 'omniglot': the official runs are 1-shot "
                             f"(shots: [1])")
        raise ValueError(f"{source}: {name} is not used by protocol {config.protocol!r} (it uses "
                         f"{', '.join(used)}); remove it")
    runs = config.runs
    if runs is not None and not (isinstance(runs, list) and runs and len(set(runs)) == len(runs)
                                 and all(isinstance(r, int) and 1 <= r <= NUM_RUNS for r in runs)):
        raise ValueError(f"{source}: runs must be official run numbers 1..{NUM_RUNS}, each once, got {runs}")
    for name in LIST_FIELDS:
        value = getattr(config, name)
        if value is not None and (not isinstance(value, list) or not value):
            raise ValueError(f"{source}: {name} must be a non-empty list, got {value!r}")
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"{source}: {name} lists a value twice: {value}")
    for name, lowest in MINIMUM.items():
        value = getattr(config, name)
        for number in value if isinstance(value, list) else [value]:
            if not isinstance(number, int) or isinstance(number, bool) or number < lowest:
                raise ValueError(f"{source}: {name} must be whole numbers >= {lowest}, got {value}")
    if config.render not in CENTRED_RENDERS:
        raise ValueError(f"{source}: render must be one of {tuple(CENTRED_RENDERS)}, got {config.render!r}")
    if not 0.0 <= config.warmup_fraction < 1.0:
        raise ValueError(f"{source}: warmup_fraction must be in [0, 1), got {config.warmup_fraction}")


def _check_methods_fit(specs: list[MethodSpec], backbone: Backbone) -> None:
    """Raise if a method cannot adapt this backbone (attention-only LoRA on a ConvNet), before the first cell."""
    for spec in specs:
        try:
            spec.lora_config(has_attention(backbone))
        except ValueError as error:
            raise ValueError(f"methods: {error}; backbone {backbone.name} has none") from None


def _backbone_data_config(backbone: Backbone) -> dict:
    """The backbone's preprocessing (input size, mean, std, crop) from its pretrained config."""
    name = backbone.pretrained_file if backbone.pretrained_file and backbone.pretrained_file.startswith(
        "local-dir:") else backbone.name
    model = timm.create_model(name, pretrained=name.startswith("local-dir:"), **(backbone.model_args or {}))
    return timm.data.resolve_model_data_config(model)


def _budget(config: SweepConfig) -> Budget:
    return Budget(steps=config.steps, batch_size=config.batch_size, warmup_fraction=config.warmup_fraction)
