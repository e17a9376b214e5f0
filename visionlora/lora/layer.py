"""The shared machinery of every LoRA layer: factors, ΔW, merge/unmerge, DoRA and initialisation.

A LoRA layer wraps a frozen ``base_layer`` and adds ΔW = scale · B·A (Hu et al. 2021, arXiv:2106.09685). Every
layer type stores its update as one or more :class:`Factors`: a pair (A, B) that covers some output rows of the
base weight, split into ``groups`` independent blocks so grouped convolutions keep their block-diagonal layout.
From the factors this module derives ΔW in the base weight's own shape, so merging is a plain ``W += ΔW`` for
every layer type.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Factors:
    """One low-rank pair: rows ``rows`` of ΔW (as an out×fan_in matrix) equal blockdiag_g(B_g·A_g).

    ``A`` is viewable as (groups, rank, fan_in_per_group) and ``B`` as (groups, rows_per_group, rank).
    """

    A: nn.Parameter
    B: nn.Parameter
    rows: slice
    groups: int
    rank: int

    def blocks(self, scale: float = 1.0) -> torch.Tensor:
        """scale·B_g·A_g for every group: (groups, rows_per_group, fan_in_per_group)."""
        a = self.A.reshape(self.groups, self.rank, -1)
        # Scaling B (rows×r) is cheaper than scaling the rows×fan_in product.
        b = self.B.reshape(self.groups, -1, self.rank) * scale
        return torch.bmm(b, a)


class LoraLayer(nn.Module):
    """Base class: a frozen ``base_layer`` plus factors; subclasses say how the forward pass uses them.

    Subclasses implement ``factors()``, ``base_weight()``, ``activation_delta(x)`` (the LoRA branch applied to
    activations) and ``forward_with_weight(x, weight)`` (the base op with a substituted weight).
    """

    supports_activation_form = True

    def __init__(self, base_layer: nn.Module, scale: float, dropout: float, use_dora: bool, form: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scale = float(scale)
        # No dropout module when p == 0: nn.Dropout(0) still copies its input in training mode.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.use_dora = use_dora
        self.merged = False
        self.weight_form = self._resolve_form(form)
        # form='auto' on a layer that has both forms and no clear winner: time both on the first training step.
        self.form_pending = form == "auto" and self.measures_form() and self._has_both_forms()
        self._merged_norm: torch.Tensor | None = None
        if use_dora:
            weight = self.base_weight()
            self.lora_magnitude = nn.Parameter(weight.new_empty(weight.shape[0]))

    # ----- subclass interface -------------------------------------------------------------------------------
    def factors(self) -> list[Factors]:
        raise NotImplementedError

    def base_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def activation_delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def activation_forward(self, x: torch.Tensor, lora_input: torch.Tensor) -> torch.Tensor:
        """base(x) + activation_delta(lora_input), the delta added in place: the base output is fresh and nothing
        saved it for backward, so no second and third output-sized tensor (the delta, the sum) are made."""
        return self.base_layer(x).add_(self.activation_delta(lora_input))

    # ----- forward ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.form_pending and self.training and torch.is_grad_enabled():
            self.weight_form = measure_faster_form(self, x)
            self.form_pending = False
        if self.weight_form:
            return self.forward_with_weight(x, self.adapted_weight())
        lora_input = self.lora_dropout(x) if self.lora_dropout is not None else x
        return self.activation_forward(x, lora_input)

    def forward_in_form(self, x: torch.Tensor, weight_form: bool) -> torch.Tensor:
        """The unmerged forward pass in the given form (both give the same result up to float rounding); the
        activation form is the very path :meth:`forward` takes, so timing it measures what will run."""
        if weight_form:
            return self.forward_with_weight(x, self.adapted_weight())
        return self.activation_forward(x, x)

    def _has_both_forms(self) -> bool:
        return self.supports_activation_form and not self.use_dora and self.lora_dropout is None

    def _resolve_form(self, form: str) -> bool:
        """True for the weight-space form op(x, W + ΔW), False for the activation-space form op(x) + x·Aᵀ·Bᵀ."""
        needs_weight_form = self.use_dora or not self.supports_activation_form
        if needs_weight_form and self.lora_dropout is not None:
            kind = "DoRA" if self.use_dora else type(self.base_layer).__name__
            raise ValueError(f"LoRA dropout needs the activation-space form, which {kind} layers lack; set dropout=0")
        if needs_weight_form:
            return True
        if form == "auto":
            # Until measured (see measures_form), measuring layers run in the weight form: one op instead of three.
            return self.measures_form() and self.lora_dropout is None
        if form == "weight" and self.lora_dropout is not None:
            raise ValueError("LoRA dropout needs the activation-space form; set dropout=0 or form='auto'")
        return form == "weight"

    def measures_form(self) -> bool:
        """Whether ``form='auto'`` times both forms on the first training step (else: activation form)."""
        return False

    # ----- ΔW and merge -------------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """ΔW = scale · B·A in the base weight's shape (block-diagonal per group, zero rows where not adapted)."""
        weight = self.base_weight()
        pairs = self.factors()
        if len(pairs) == 1 and pairs[0].rows == slice(None):
            # The common case: one pair covers every row, so no zero-filled buffer is needed.
            return pairs[0].blocks(self.scale).reshape(weight.shape)
        delta = weight.new_zeros(weight.shape[0], weight[0].numel())
        for pair in pairs:
            delta[pair.rows] = pair.blocks(self.scale).reshape(-1, delta.shape[1])
        return delta.reshape(weight.shape)

    def adapted_weight(self) -> torch.Tensor:
        """W + ΔW, rescaled per output channel by DoRA's magnitude when enabled (Liu et al. 2024)."""
        weight = self.base_weight() + self.delta_weight()
        if not self.use_dora:
            return weight
        # DoRA section 4.3: the norm is treated as a constant so it receives no gradient.
        norm = _row_norm(weight).detach()
        return weight * _per_row(self.lora_magnitude / norm, weight)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the base weight in place. Merging an already merged layer does nothing."""
        if self.merged:
            return
        weight = self.base_weight()
        if self.use_dora:
            self._merged_norm = _row_norm(weight.float() + self.delta_weight().float())
        weight.copy_(self.adapted_weight().to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (up to float rounding). Unmerging an unmerged layer does nothing."""
        if not self.merged:
            return
        weight = self.base_weight()
        restored = weight.float()
        if self.use_dora:
            restored = restored * _per_row(self._merged_norm / self.lora_magnitude.float(), restored)
        weight.copy_((restored - self.delta_weight().float()).to(weight.dtype))
        self.merged = False

    # ----- initialisation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, init: str) -> None:
        """Set A and B (and the DoRA magnitude); ``pissa`` also moves the principal part out of the base weight."""
        for pair in self.factors():
            _init_pair(pair, init)
        if init == "pissa":
            self._init_pissa()
        if self.use_dora:
            self.lora_magnitude.copy_(_row_norm(self.base_weight() + self.delta_weight()))

    def _init_pissa(self) -> None:
        """PiSSA (Meng et al. 2024): A, B from the top-r singular triplets; the base weight keeps the residual.

        The initial factors are kept as buffers so the adapter can be saved as a plain LoRA against the original
        weights (rank 2r: scale·(B·A - B0·A0)).
        """
        weight = self.base_weight()
        matrix = weight.detach().float().reshape(weight.shape[0], -1)
        for index, pair in enumerate(self.factors()):
            blocks = matrix[pair.rows].reshape(pair.groups, -1, matrix.shape[1])
            u, s, vh = torch.linalg.svd(blocks, full_matrices=False)
            root = (s[:, : pair.rank] / self.scale).sqrt()
            a = root.unsqueeze(-1) * vh[:, : pair.rank]
            b = u[:, :, : pair.rank] * root.unsqueeze(1)
            pair.A.copy_(a.reshape(pair.A.shape))
            pair.B.copy_(b.reshape(pair.B.shape))
            self.register_buffer(f"pissa_A0_{index}", pair.A.detach().clone())
            self.register_buffer(f"pissa_B0_{index}", pair.B.detach().clone())
        weight.sub_(self.delta_weight().to(weight.dtype))

    def pissa_initial_factors(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The (A0, B0) of each factor pair when initialised with PiSSA, else None."""
        if not hasattr(self, "pissa_A0_0"):
            return None
        return [(getattr(self, f"pissa_A0_{i}"), getattr(self, f"pissa_B0_{i}")) for i in range(len(self.factors()))]

    # ----- bookkeeping --------------------------------------------------------------------------------------
    def lora_parameter_count(self) -> int:
        """Trainable LoRA numbers in this layer (A, B and the DoRA magnitude)."""
        count = sum(p.A.numel() + p.B.numel() for p in self.factors())
        return count + (self.lora_magnitude.numel() if self.use_dora else 0)

    def extra_repr(self) -> str:
        ranks = ",".join(str(p.rank) for p in self.factors())
        form = "weight" if self.weight_form else "activation"
        return f"rank={ranks}, scale={self.scale:g}, form={form}, dora={self.use_dora}, merged={self.merged}"


def measure_faster_form(layer: LoraLayer, x: torch.Tensor, repeats: int = 2) -> bool:
    """Time forward + backward of both forms on ``x`` (best of ``repeats``); True if the weight form is faster.

    Which form wins depends on the layer's shape, the batch and the device's kernels (a thin k×k conv with r output
    channels is cheap in FLOPs but often slow on CPUs), so it is measured, as cudnn.benchmark does for algorithms.
    """
    probe = x.detach().requires_grad_(x.requires_grad)
    inputs = [probe] if probe.requires_grad else []
    inputs += [p for p in layer.parameters() if p.requires_grad]
    timings = {}
    for weight_form in (False, True):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            out = layer.forward_in_form(probe, weight_form)
            if inputs:
                torch.autograd.grad(out, inputs, grad_outputs=torch.ones_like(out), allow_unused=True)
            best = min(best, time.perf_counter() - start)
        timings[weight_form] = best
    return timings[True] < timings[False]


def _init_pair(pair: Factors, init: str) -> None:
    if init in ("default", "pissa"):
        # The same Kaiming-uniform as nn.Linear's weight, per group block, with B = 0 (Hu et al. 2021).
        fan_in = pair.A[0].numel()
        bound = math.sqrt(1.0 / fan_in)
        nn.init.uniform_(pair.A, -bound, bound)
        nn.init.zeros_(pair.B)
    elif init == "gaussian":
        nn.init.normal_(pair.A, std=1.0 / pair.rank)
        nn.init.zeros_(pair.B)
    elif init == "small-random":
        nn.init.normal_(pair.A, std=0.02)
        nn.init.normal_(pair.B, std=0.02)
    else:
        raise ValueError(f"LoraConfig.init: unknown init {init!r}")


def _row_norm(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output channel's weights (DoRA's column norm ||W||_c in the paper's notation)."""
    return weight.reshape(weight.shape[0], -1).norm(dim=1)


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def max_rank(rows: int, fan_in: int) -> int:
    """The largest rank whose factors (rows·r + r·fan_in numbers) are no larger than the rows×fan_in block."""
    return rows * fan_in // (rows + fan_in)


def new_factor(*shape: int, like: torch.Tensor) -> nn.Parameter:
    """An uninitialised factor with the base weight's device and dtype (use autocast for mixed precision)."""
    return nn.Parameter(like.new_empty(shape))
