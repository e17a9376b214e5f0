"""A per-layer table of what LoRA adapted and what it costs: ranks, forms, parameter counts and the reduction
factor."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .inject import lora_layers


@dataclass
class LayerRow:
    """One adapted layer: its base weight size and its LoRA size."""

    path: str
    kind: str
    weight_shape: tuple[int, ...]
    rank: int
    base_params: int
    lora_params: int
    form: str = "activation"  # fused / weight / activation; "?" appended while form='auto' has not measured yet

    @property
    def reduction(self) -> float:
        """How many times fewer numbers LoRA trains than fine-tuning this weight would."""
        return self.base_params / self.lora_params


@dataclass
class LoraSummary:
    """Rows per adapted layer plus model totals; ``str()`` renders a table."""

    rows: list[LayerRow]
    lora_params: int
    adapted_base_params: int
    trainable_params: int
    total_params: int

    @property
    def reduction(self) -> float:
        """Adapted base weights / LoRA parameters over all adapted layers."""
        return self.adapted_base_params / self.lora_params if self.lora_params else float("nan")

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        width = max([len("layer")] + [len(r.path) for r in self.rows])
        header = f"{'kind':<13} {'weight':<18} {'rank':>4} {'form':<11} {'base':>12} {'lora':>10} {'reduction':>9}"
        lines = [f"{'layer':<{width}}  {header}"]
        for r in self.rows:
            shape = "x".join(map(str, r.weight_shape))
            lines.append(f"{r.path:<{width}}  {r.kind:<13} {shape:<18} {r.rank:>4} {r.form:<11} {r.base_params:>12,} "
                         f"{r.lora_params:>10,} {r.reduction:>8.1f}x")
        lines.append(f"{len(self.rows)} adapted layers: {self.lora_params:,} LoRA parameters for "
                     f"{self.adapted_base_params:,} adapted weights ({self.reduction:.1f}x fewer)")
        lines.append(f"trainable: {self.trainable_params:,} of {self.total_params:,} parameters "
                     f"({100 * self.trainable_fraction:.2f}%)")
        return "\n".join(lines)


def lora_summary(model: nn.Module) -> LoraSummary:
    """Summarise the LoRA layers of ``model``'s active adapter (print it for a table); the totals count every
    parameter, inactive adapters and heads included."""
    rows = []
    for path, layer in lora_layers(model).items():
        slot = layer.slot_or_none(layer.active_adapter)  # the active adapter's layers
        if slot is None:
            continue
        weight = layer.base_weight()
        # The adapted part of the weight: every row a factor pair covers, times its per-group fan-in.
        base = sum(pair.B.shape[0] * pair.A[0].numel() for pair in layer.factors(slot))
        kind = type(layer).__name__.removeprefix("Lora")
        if "lora_slices" in slot._modules:
            kind += f"[{slot.lora_slices.slices}]"
        form = layer.form_name(slot) + ("?" if slot.form_pending else "")
        rows.append(LayerRow(path, kind, tuple(weight.shape), slot.rank, base, layer.lora_parameter_count(slot), form))
    params = list(model.parameters())
    return LoraSummary(
        rows=rows,
        lora_params=sum(r.lora_params for r in rows),
        adapted_base_params=sum(r.base_params for r in rows),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params),
    )
