"""LoRA for ``nn.Linear`` and for fused qkv projections with per-slice (q, k, v) factors.

Hu et al. (2021, arXiv:2106.09685, section 7.1) adapt W_q and W_v of every attention layer. timm's ViTs fuse the
three projections into one ``attn.qkv`` Linear of 3·dim outputs, so a library that treats ``qkv`` as one matrix
cannot express that setting. :class:`LoraFusedQKV` gives each chosen slice its own A and B and writes the merged
update back into the native ``qkv.weight``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fused import fused_linear, slot_blocker
from .layer import DEFAULT_ADAPTER, Factors, LoraLayer, new_factor
from .per_sample import add_linear_deltas_


class LinearKind(LoraLayer):
    """What the Linear kinds share: the base is an ``nn.Linear`` and each adapter is one low-rank pair on its
    weight (:meth:`low_rank_pair`), which the activation form and mixed-task batches apply."""

    @property
    def supports_fused_split(self) -> bool:
        # Expanding layers only (an MLP's fc1, qkv): fused-split reads x a second time and returns the input gradient
        # with rows in + r apart, both cheap only where x is the narrow side. Where it is the wide one (fc2),
        # a strided input gradient slows the GELU backward pass it feeds.
        return self.base_layer.out_features > self.base_layer.in_features

    def low_rank_pair(self, slot: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with ΔW = scale · B·A on the whole weight: A (r, in), B (out, r)."""
        raise NotImplementedError

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def activation_delta(self, x: torch.Tensor, adapter: str | nn.Module | None = None) -> torch.Tensor:
        slot = self.slot(adapter)
        a, b = self.low_rank_pair(slot)
        # Scaling the r×out factor is cheaper than scaling the N×out output.
        return F.linear(F.linear(x, a), b * slot.scale)

    def forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.base_layer.bias)

    def add_per_sample_deltas_(self, out: torch.Tensor, x: torch.Tensor, slots: list[nn.Module | None],
                               sample_group: torch.Tensor) -> bool:
        pairs = [None if slot is None else (*self.low_rank_pair(slot), slot.scale) for slot in slots]
        add_linear_deltas_(out, x, pairs, sample_group)
        return True

    def fused_blocker(self, slot: nn.Module) -> str | None:
        return slot_blocker(slot)


class LoraLinear(LinearKind):
    """y = x·Wᵀ + b + scale · x·Aᵀ·Bᵀ for a wrapped ``nn.Linear``."""

    def __init__(self, base_layer: nn.Linear, rank: int, scale: float, dropout: float = 0.0, use_dora: bool = False,
                 form: str = "auto", adapter: str = DEFAULT_ADAPTER) -> None:
        super().__init__(base_layer, adapter)
        self.add_slot(adapter, self.new_slot(rank, scale, dropout, use_dora, form))

    def build_factors(self, slot: nn.Module, rank: int) -> None:
        weight = self.base_layer.weight
        slot.lora_A = new_factor(rank, self.base_layer.in_features, like=weight)
        slot.lora_B = new_factor(self.base_layer.out_features, rank, like=weight)

    def factors(self, adapter: str | nn.Module | None = None) -> list[Factors]:
        slot = self.slot(adapter)
        return [Factors(slot.lora_A, slot.lora_B, slice(None), groups=1, rank=slot.rank)]

    def low_rank_pair(self, slot: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return slot.lora_A, slot.lora_B

    def fused_forward(self, x: torch.Tensor, slot: nn.Module, split: bool = False) -> torch.Tensor:
        base = self.base_layer
        rows = [slice(0, base.out_features)]
        return fused_linear(x, base.weight, base.bias, slot.lora_A, [slot.lora_B], rows, slot.scale, split)

    def activation_forward(self, x: torch.Tensor, lora_input: torch.Tensor,
                           adapter: str | nn.Module | None = None) -> torch.Tensor:
        # On 2-D rows: the base matmul, then scale · (x·Aᵀ)·Bᵀ accumulated into its output by one in-place addmm
        # (the scale as addmm's alpha). No output-sized temporary, no extra op to scale B, and no in-place write
        # through a view, which autograd would undo with a copy of the output gradient.
        slot = self.slot(adapter)
        rows = x.reshape(-1, x.shape[-1])
        out = F.linear(rows, self.base_layer.weight, self.base_layer.bias)
        low = F.linear(lora_input.reshape(-1, x.shape[-1]), slot.lora_A)
        # In-place ops skip autocast: the factors follow the output's dtype (a no-op in fp32).
        out.addmm_(low.to(out.dtype), slot.lora_B.to(out.dtype).t(), alpha=slot.scale)
        return out.view(*x.shape[:-1], out.shape[-1])


class QKVSlices(nn.Module):
    """Per-slice factors for a fused (q, k, v) projection whose output rows are [q; k; v], each ``dim`` long.

    Shared by :class:`LoraFusedQKV` and the MultiheadAttention wrapper (its ``in_proj_weight``).
    """

    def __init__(self, in_features: int, dim: int, slices: str, rank: int, like: torch.Tensor) -> None:
        super().__init__()
        if set(slices) - set("qkv"):
            raise ValueError(f"qkv slices must be a subset of 'qkv', got {slices!r}")
        self.slices = "".join(s for s in "qkv" if s in slices)
        self.dim = dim
        self.rank = rank
        for name in self.slices:
            setattr(self, f"lora_A_{name}", new_factor(rank, in_features, like=like))
            setattr(self, f"lora_B_{name}", new_factor(dim, rank, like=like))

    def factors(self) -> list[Factors]:
        return [
            Factors(getattr(self, f"lora_A_{n}"), getattr(self, f"lora_B_{n}"), self.rows(n), groups=1, rank=self.rank)
            for n in self.slices
        ]

    def rows(self, name: str) -> slice:
        start = "qkv".index(name) * self.dim
        return slice(start, start + self.dim)

    def stacked_A(self) -> torch.Tensor:
        """All slices' A stacked: (rank·n_slices, in). One matmul projects x for every slice."""
        return torch.cat([p.A for p in self.factors()], dim=0)

    def block_B(self) -> torch.Tensor:
        """(3·dim, rank·n_slices): slice n's B in its own rows and columns, zeros elsewhere.

        With :meth:`stacked_A` this is a single rank-(rank·n_slices) LoRA on the fused weight that equals the
        per-slice update exactly, which is how the update is exported in PEFT's layout.
        """
        total_rank = self.rank * len(self.slices)
        pieces = []
        for name in "qkv":
            if name in self.slices:
                column = self.slices.index(name) * self.rank
                b = getattr(self, f"lora_B_{name}")
                pieces.append(F.pad(b, (column, total_rank - column - self.rank)))
            else:
                pieces.append(self.factors()[0].B.new_zeros(self.dim, total_rank))
        return torch.cat(pieces, dim=0)


class LoraFusedQKV(LinearKind):
    """A fused ``qkv`` Linear where any subset of q, k and v has its own LoRA factors."""

    def __init__(self, base_layer: nn.Linear, rank: int, scale: float, slices: str = "qkv", dropout: float = 0.0,
                 use_dora: bool = False, form: str = "auto", adapter: str = DEFAULT_ADAPTER) -> None:
        if base_layer.out_features % 3:
            raise ValueError(f"fused qkv Linear needs out_features divisible by 3, got {base_layer.out_features}")
        super().__init__(base_layer, adapter)
        self.add_slot(adapter, self.new_slot(rank, scale, dropout, use_dora, form, slices=slices))

    def build_factors(self, slot: nn.Module, rank: int, slices: str = "qkv") -> None:
        base = self.base_layer
        slot.lora_slices = QKVSlices(base.in_features, base.out_features // 3, slices or "qkv", rank, base.weight)

    def factors(self, adapter: str | nn.Module | None = None) -> list[Factors]:
        return self.slot(adapter).lora_slices.factors()

    def low_rank_pair(self, slot: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        # The slices as one rank-(r·slices) pair on the fused weight (block_B is exact, see QKVSlices).
        return slot.lora_slices.stacked_A(), slot.lora_slices.block_B()

    def fused_forward(self, x: torch.Tensor, slot: nn.Module, split: bool = False) -> torch.Tensor:
        # Every slice's A in one block: the base GEMM gains rank·n_slices columns; B stays per slice (block-sparse).
        slices = slot.lora_slices
        pairs = slices.factors()
        base = self.base_layer
        bs = [pair.B for pair in pairs]
        rows = [p.rows for p in pairs]
        return fused_linear(x, base.weight, base.bias, slices.stacked_A(), bs, rows, slot.scale, split)
