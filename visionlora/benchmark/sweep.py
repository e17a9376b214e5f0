"""Run a few-shot benchmark: every (method, cell) of one protocol, resumable, then the table and the plots."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path

import timm
import torch
from tqdm import tqdm

from .cells import Backbone, Budget, CellData, run_cell
from .methods import parse_method
from .plots import plot_accuracy_vs_params, plot_accuracy_vs_shots, plot_error_with_references
from .protocols import PROTOCOLS, CellKey, data_module, episodic_cells, kshot_cells, omniglot_cells
from .results import ResultsLog, markdown_table, summarise

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
        if config.root is None and (config.protocol == "omniglot" or config.dataset != "digits"):
            # Shipped configs name no dataset folder outside the repository: the caller passes it.
            what = ("the folder holding Omniglot's all_runs.zip" if config.protocol == "omniglot"
                    else f"the folder of dataset {config.dataset!r}")
            raise ValueError(f"{source}: root is not set; pass --root DIR ({what})")
        for method in config.methods:
            parse_method(method)  # fail before any training on a misspelt method
        return config

    @property
    def output_dir(self) -> Path:
        return Path(self.out or f"runs/fewshot_benchmark/{self.name}")


def run_sweep(config: SweepConfig, progress: bool = True) -> list[dict]:
    """Run every cell not yet in ``<out>/results.csv``, then write ``summary.md`` and the plots; returns the summary."""
    out = config.output_dir
    if config.threads:
        torch.set_num_threads(config.threads)
    log = ResultsLog(out / "results.csv")
    backbone = Backbone(config.backbone, config.pretrained, config.pretrained_file, config.model_args)
    preprocessing, cells = _cells(config, backbone)
    todo = [(spec, key, data) for key, data in cells for spec in map(parse_method, config.methods)
            if not log.done(_row_key(config, spec.name, key))]
    logger.info("%d cells to run (%d already in %s)", len(todo), len(log.rows), log.path)
    try:
        for spec, key, data in tqdm(todo, desc=f"{config.name} cells", disable=not progress):
            result = run_cell(spec, backbone, data, preprocessing, _budget(config), seed=key.trial)
            log.append(_row_key(config, spec.name, key) | {
                "accuracy": result.accuracy, "trainable_params": result.trainable_params,
                "total_params": result.total_params, "seconds": round(result.seconds, 2)})
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished cells are in {log.path}; rerun the same command to continue")
    summary = summarise([r for r in log.rows if r["protocol"] == config.protocol])
    write_report(config, summary, out)
    return summary


def write_report(config: SweepConfig, summary: list[dict], out: Path) -> None:
    """``summary.md`` (the table, plus the published references for Omniglot) and the two PNGs."""
    omniglot = config.protocol == "omniglot"
    table = markdown_table(summary, error_rate=omniglot, order=config.methods)
    dataset = "omniglot (official runs)" if omniglot else config.dataset
    weights = f" ({config.pretrained_file})" if config.pretrained_file else ""
    lines = [f"# {config.name}: {config.protocol} on {dataset}, backbone {config.backbone}{weights}", "",
             f"{config.steps} AdamW steps per cell, batch {config.batch_size}; mean ± 95% CI (Student t) over "
             f"{'runs' if omniglot else 'episodes' if config.protocol == 'episodic' else 'seeds'}.", "", table]
    if omniglot:
        lines += ["", "Published references (20-way 1-shot error %, same 20 runs):", "",
                  *[f"- {name}: {error}%" for name, error in OMNIGLOT_REFERENCES.items()]]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    if omniglot:
        order = {m: i for i, m in enumerate(config.methods)}
        ordered = sorted(summary, key=lambda s: order.get(s["method"], len(order)))
        plot_error_with_references(ordered, OMNIGLOT_REFERENCES, out / "error_vs_references.png",
                                   "Omniglot 20-way 1-shot, 20 official runs")
        return
    title = f"{config.dataset}, {config.backbone}"
    plot_accuracy_vs_shots(summary, out / "accuracy_vs_shots.png", title)
    plot_accuracy_vs_params(summary, out / "accuracy_vs_params.png", title)


def _cells(config: SweepConfig, backbone: Backbone) -> tuple[dict, list[tuple[CellKey, CellData]]]:
    dataset = "omniglot" if config.protocol == "omniglot" else config.dataset
    data = data_module(dataset, config.root, config.classes)
    data.set_data_config(_backbone_data_config(backbone))
    if config.protocol == "omniglot":
        return data.preprocessing, list(omniglot_cells(config.root, config.runs))
    if config.protocol == "episodic":
        return data.preprocessing, list(episodic_cells(data, config.ways, config.shots, config.queries,
                                                       config.episodes))
    return data.preprocessing, list(kshot_cells(data, config.shots, config.seeds))


def _backbone_data_config(backbone: Backbone) -> dict:
    """The backbone's preprocessing (input size, mean, std, crop) from its pretrained config."""
    name = backbone.pretrained_file if backbone.pretrained_file and backbone.pretrained_file.startswith(
        "local-dir:") else backbone.name
    model = timm.create_model(name, pretrained=name.startswith("local-dir:"), **(backbone.model_args or {}))
    return timm.data.resolve_model_data_config(model)


def _budget(config: SweepConfig) -> Budget:
    return Budget(steps=config.steps, batch_size=config.batch_size, warmup_fraction=config.warmup_fraction)


def _row_key(config: SweepConfig, method: str, key: CellKey) -> dict:
    return {"protocol": config.protocol, "dataset": config.dataset if config.protocol != "omniglot" else "omniglot",
            "backbone": config.backbone, "method": method, "ways": key.ways, "shots": key.shots, "trial": key.trial}
