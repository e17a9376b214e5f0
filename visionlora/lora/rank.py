"""How much of its rank does each LoRA layer use? Singular values and effective ranks of the learned ΔW.

LoRA learns ΔW = scale · B·A of rank at most r; Hu et al. (2021, arXiv:2106.09685, section 7.2) find that a few top
singular directions carry it, and AdaLoRA (Zhang et al. 2023, arXiv:2303.10512) allocates rank by singular values.
This module measures each layer's spectrum, from a model or from the adapter files alone, and suggests a rank.

Singular values come from the r×r core: with B = Q_b·R_b and Aᵀ = Q_a·R_a (reduced QR), B·A = Q_b·(R_b·R_aᵀ)·Q_aᵀ
and Q_b, Q_a have orthonormal columns, so σ(B·A) = σ(R_b·R_aᵀ) without forming the out×in product.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from visionlora.files import write_text_atomic

from .adapter_files import CONFIG_NAME, PREFIX, WEIGHTS_NAME, pattern_value, read_adapter_config, read_adapter_weights
from .conv import LoraConv2d
from .inject import lora_layers
from .linear import LoraFusedQKV
from .mha import LoraMultiheadAttention


@dataclass
class RankRow:
    """One low-rank update: a layer, or one q/k/v slice (``path@q``) or out-projection (``path.out_proj``)."""

    path: str
    kind: str
    rank: int
    shape: tuple[int, int]
    scale: float
    singular_values: list[float]
    effective_ranks: dict[float, int]
    suggested_rank: int
    params_per_rank: int

    @property
    def normalised(self) -> list[float]:
        """σ_i / ‖ΔW‖_F: their squares are each direction's share of the energy (all 0 when ΔW = 0)."""
        norm = sum(s * s for s in self.singular_values) ** 0.5
        return [s / norm if norm else 0.0 for s in self.singular_values]


@dataclass
class RankReport:
    """Rows per low-rank update; ``str()`` renders a table and :meth:`summary`; :meth:`to_dict` is JSON-able."""

    rows: list[RankRow]
    energies: tuple[float, ...]

    def summary(self) -> dict:
        """Counts of layers that could use a lower rank, use every direction, or learned nothing; parameters saved."""
        rows, first = self.rows, self.energies[0]
        current = sum(r.rank * r.params_per_rank for r in rows)
        suggested = sum(r.suggested_rank * r.params_per_rank for r in rows)
        return {"layers": len(rows), "lower_rank": sum(r.suggested_rank < r.rank for r in rows),
                "saturated": sum(r.effective_ranks[first] >= r.rank for r in rows),
                "zero": sum(not any(r.singular_values) for r in rows),
                "lora_params": current, "suggested_params": suggested, "params_saved": current - suggested}

    def __str__(self) -> str:
        width = max([len("layer")] + [len(r.path) for r in self.rows])
        effs = "".join(f" {f'eff@{100 * e:g}':>8}" for e in self.energies)
        lines = [f"{'layer':<{width}}  {'kind':<6} {'r':>4}{effs} {'suggest':>7}  top σ/‖ΔW‖"]
        for r in self.rows:
            eff = "".join(f" {r.effective_ranks[e]:>8}" for e in self.energies)
            top = " ".join(f"{s:.3f}" for s in r.normalised[:3])
            lines.append(f"{r.path:<{width}}  {r.kind:<6} {r.rank:>4}{eff} {r.suggested_rank:>7}  {top}")
        s = self.summary()
        saved = 100 * s["params_saved"] / s["lora_params"] if s["lora_params"] else 0.0
        lines.append(f"{s['lower_rank']} of {s['layers']} updates could use a lower rank, saving {s['params_saved']:,} "
                     f"of {s['lora_params']:,} LoRA parameters ({saved:.1f}%)")
        lines.append(f"{s['saturated']} use every direction at {100 * self.energies[0]:g}% energy (a higher rank may "
                     f"help); {s['zero']} have ΔW = 0 (untrained)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain Python types only (energies as string keys), for ``json.dumps``."""
        rows = []
        for row in self.rows:
            effective = {f"{e:g}": k for e, k in row.effective_ranks.items()}
            rows.append({**asdict(row), "shape": list(row.shape), "effective_ranks": effective})
        return {"energies": list(self.energies), "rows": rows, "summary": self.summary()}

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` to ``path`` (temporary file, then rename: never a partial file)."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2, allow_nan=False))
        return Path(path)


def rank_report(model: nn.Module, energies: Sequence[float] = (0.9, 0.99)) -> RankReport:
    """The spectrum of every LoRA update in ``model``.

    DoRA layers (Liu et al. 2024, arXiv:2402.09353): the spectrum of the low-rank direction update scale·B·A; the
    per-channel magnitude is not part of it. PiSSA layers: the update against the original weight,
    scale·(B·A − B0·A0), of rank 2r, as :func:`save_adapter` writes it. Grouped convs: ΔW reshaped to
    out × (in/groups·kh·kw), which stacks the groups' B_g·A_g and so can reach rank groups·r.

    Args:
        model: A model with LoRA layers (:func:`inject_lora` or :func:`load_adapter`).
        energies: Energy fractions in (0, 1] at which to report the effective rank; the first one sets the
            suggested rank (see :func:`suggest_rank`).
    """
    energies = _checked_energies(energies)
    rows = []
    for path, layer in lora_layers(model).items():
        slot = layer.slot_or_none(layer.active_adapter)  # the active adapter's update; None: it skips this layer
        if slot is None:
            continue
        initial = layer.pissa_initial_factors(slot)
        for index, pair in enumerate(layer.factors(slot)):
            a, b = pair.A.reshape(pair.groups, pair.rank, -1), pair.B.reshape(pair.groups, -1, pair.rank)
            if initial is not None:
                a0, b0 = initial[index]
                a, b = torch.cat([a, a0.reshape(a.shape)], 1), torch.cat([b, -b0.reshape(b.shape)], 2)
            rows.append(_row(*_name_and_kind(path, layer, slot, index), a, b, slot.scale, energies))
    return RankReport(rows, energies)


def rank_report_from_adapter(directory: str | os.PathLike, energies: Sequence[float] = (0.9, 0.99)) -> RankReport:
    """:func:`rank_report` from an adapter directory alone (ours or PEFT's LoRA), without building the model.

    Our adapters carry each layer's kind, q/k/v slices and scale in their metadata, so the rows equal those of
    :func:`rank_report` on the model; a PEFT adapter gives one row per module, its scale from ``lora_alpha`` /
    ``alpha_pattern`` / ``use_rslora`` and the rank of its ``lora_A``.
    """
    energies = _checked_energies(energies)
    directory = Path(directory)
    config = read_adapter_config(directory / CONFIG_NAME)
    tensors, metadata = read_adapter_weights(directory / WEIGHTS_NAME)
    try:
        if metadata and "visionlora" in metadata:
            updates = [u for spec in json.loads(metadata["visionlora"])["layers"] for u in _own_updates(spec, tensors)]
        else:
            updates = _peft_updates(config, tensors)
    except KeyError as err:
        raise ValueError(f"{directory / WEIGHTS_NAME}: missing tensor {err.args[0]}") from None
    if not updates:
        raise ValueError(f"{directory / WEIGHTS_NAME}: no LoRA tensors (lora_A / lora_B) in the adapter")
    return RankReport([_row(*u, energies) for u in updates], energies)


def lowrank_singular_values(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """σ(B·A) for B (m×k), A (k×n) in float64 from the small core R_b·R_aᵀ: min(m, n, k) values, descending."""
    r_b = torch.linalg.qr(b.detach().double().cpu(), mode="r").R
    r_a = torch.linalg.qr(a.detach().double().cpu().T, mode="r").R
    return torch.linalg.svdvals(r_b @ r_a.T)


def effective_rank(singular_values: Sequence[float], energy: float) -> int:
    """The smallest k whose top-k singular values keep at least ``energy`` of Σσ²; 0 when every σ is 0."""
    squares = torch.tensor(sorted(singular_values, reverse=True), dtype=torch.float64) ** 2
    if not squares.any():
        return 0
    kept = squares.cumsum(0) / squares.sum()
    # The tolerance keeps e.g. σ = (1, 1, 1, 1) at energy 0.75 at k = 3 despite rounding in the cumulative sum.
    return int((kept < energy - 1e-12).sum()) + 1


def suggest_rank(effective: int, rank: int) -> int:
    """The effective rank rounded up to a power of two, capped at ``rank``; at least 1.

    Rounding up leaves headroom (a retrained adapter with fewer directions spreads its update a little) and stays
    on the coarse grid ranks are swept over (Hu et al. 2021, Table 6: r ∈ {1, 2, 4, 8, 64}); the report cannot see
    beyond the trained rank, hence the cap. ΔW = 0 (effective rank 0: the layer learned nothing, e.g. B still at
    its zero init) gives 1, the smallest rank :class:`LoraConfig` accepts; consider dropping such layers instead.
    """
    return min(rank, 1 << max(effective - 1, 0).bit_length())


def _row(path: str, kind: str, a: torch.Tensor, b: torch.Tensor, scale: float, energies) -> RankRow:
    """Row for ΔW = scale · vstack_g(B_g·A_g), A as (groups, r, fan_in_g) and B as (groups, rows_g, r)."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    groups, rank, fan_in = a.shape
    rows = groups * b.shape[1]
    if groups > 1 and groups * rank >= min(rows, fan_in):
        # The stacked factors would be no smaller than ΔW itself (depthwise convs): take ΔW's values directly.
        values = torch.linalg.svdvals(torch.bmm(b, a).reshape(rows, fan_in))
    else:
        values = lowrank_singular_values(torch.block_diag(*b), a.reshape(groups * rank, fan_in))
    # σ at float64 round-off of the product (e.g. PiSSA's B·A − B0·A0 at init) is zero, not a direction.
    values = (values.masked_fill(values <= 1e-12 * b.norm() * a.norm(), 0) * abs(scale)).tolist()
    effective = {e: effective_rank(values, e) for e in energies}
    return RankRow(path, kind, rank, (rows, fan_in), float(scale), values, effective,
                   suggest_rank(effective[energies[0]], rank), rows + groups * fan_in)


def _name_and_kind(path: str, layer, slot, index: int) -> tuple[str, str]:
    if not isinstance(layer, LoraFusedQKV | LoraMultiheadAttention):
        return path, "conv" if isinstance(layer, LoraConv2d) else "linear"
    slices, kind = slot.lora_slices.slices, "qkv" if isinstance(layer, LoraFusedQKV) else "mha"
    return f"{path}@{slices[index]}" if index < len(slices) else f"{path}.out_proj", kind


def _own_updates(spec: dict, tensors: dict) -> list[tuple]:
    """(name, kind, A, B, scale) per update of one layer saved with our metadata (PEFT tensor layout)."""
    path, kind, rank, scale = spec["path"], spec["kind"], spec["rank"], spec["scale"]
    key = f"{PREFIX}{path}."
    if kind in ("conv", "linear"):
        return [(path, kind, *_factors(tensors[key + "lora_A.weight"], tensors[key + "lora_B.weight"]), scale)]
    updates = []
    if spec.get("slices"):
        a, b = tensors[key + "lora_A.weight"], tensors[key + "lora_B.weight"]
        dim = b.shape[0] // 3
        for i, name in enumerate(spec["slices"]):
            start = "qkv".index(name) * dim
            columns = slice(i * rank, (i + 1) * rank)
            updates.append((f"{path}@{name}", kind, a[columns][None], b[start : start + dim, columns][None], scale))
    if spec.get("adapt_out_proj"):
        a, b = tensors[key + "out_proj.lora_A.weight"], tensors[key + "out_proj.lora_B.weight"]
        updates.append((f"{path}.out_proj", kind, a[None], b[None], scale))
    return updates


def _peft_updates(config: dict, tensors: dict) -> list[tuple]:
    """One plain LoRA per module with a ``lora_A``, in natural path order (blocks.2 before blocks.10)."""
    updates = []
    for key in sorted((k for k in tensors if k.endswith(".lora_A.weight")), key=_natural):
        path = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        a, b = tensors[key], tensors[key.replace(".lora_A.", ".lora_B.")]
        alpha = pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
        scale = alpha / a.shape[0] ** 0.5 if config.get("use_rslora") else alpha / a.shape[0]
        updates.append((path, "conv" if a.dim() == 4 else "linear", *_factors(a, b), scale))
    return updates


def _factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(groups, r, fan_in_g) and (groups, rows_g, r) from PEFT's layout; a conv's A is block-diagonal per group."""
    if a.dim() == 2:
        return a[None], b[None]
    rank, groups = b.shape[1], a.shape[0] // b.shape[1]
    blocks = a.reshape(groups, rank, groups, a.shape[1] // groups, -1)
    a_g = torch.stack([blocks[g, :, g] for g in range(groups)]).reshape(groups, rank, -1)
    return a_g, b.reshape(groups, -1, rank)


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _checked_energies(energies: Sequence[float]) -> tuple[float, ...]:
    energies = tuple(float(e) for e in energies)
    if not energies or not all(0 < e <= 1 for e in energies):
        raise ValueError(f"rank_report: energies must be fractions in (0, 1], got {energies}")
    return energies
