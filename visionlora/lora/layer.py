"""The shared machinery of every LoRA layer: factors, ΔW, merge/unmerge, DoRA and initialisation.

A LoRA layer wraps a frozen ``base_layer`` and adds ΔW = scale · B·A (Hu et al. 2021, arXiv:2106.09685). Every
layer type stores its update as one or more :class:`Factors`: a pair (A, B) that covers some output rows of the
base weight, split into ``groups`` independent blocks so grouped convolutions keep their block-diagonal layout.
From the factors this module derives ΔW in the base weight's own shape, so merging is a plain ``W += ΔW`` for
every layer type.

A layer may hold several named adapters (several tasks on one frozen backbone): one slot of factors and settings
per adapter, and the name of the active one, which is all the forward pass looks at. The adapter named
``default`` keeps its slot on the layer itself, so a single-adapter layer has the names it always had.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_ADAPTER = "default"
# The per-adapter settings of a slot (besides its tensors): the adapter named "default" keeps them on the layer.
SLOT_SETTINGS = ("rank", "scale", "use_dora", "lora_dropout", "weight_form", "fused_form", "fused_split",
                 "form_pending", "_merged_norm")
FORM_NAMES = ("activation", "weight", "fused", "fused-split")
# The fused forms: A rides in the base GEMM ("fused"), or a contiguous base GEMM plus h = x·Aᵀ ("fused-split").
FUSED_FORMS = ("fused", "fused-split")

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


class AdapterSlot(nn.Module):
    """One named adapter's factors and settings in one layer (``layer.lora_adapters[name]``).

    The adapter named ``default`` keeps the same members on the layer itself, under the names every single-adapter
    model and checkpoint has (``lora_A``, ``lora_slices.lora_A_q``, ...). A slot has no ``forward``: its layer runs
    it. Members: the :data:`SLOT_SETTINGS`, the factors, the DoRA magnitude and PiSSA's initial factors.
    """


class LoraLayer(nn.Module):
    """Base class: a frozen ``base_layer`` plus one slot of factors per named adapter, one of them active.

    Subclasses implement ``build_factors(slot, rank, ...)``, ``factors(adapter)``, ``base_weight()``,
    ``activation_delta(x, adapter)`` (the LoRA branch applied to activations) and ``forward_with_weight(x, weight)``
    (the base op with a substituted weight); those with a fused form (:mod:`visionlora.lora.fused`) also
    ``fused_forward(x, slot)`` and ``fused_blocker(slot)``. Every per-adapter method takes ``adapter``: None for
    the active one, a name, or a slot (built by :meth:`new_slot`, possibly not yet added).

    A slot runs in one of four forms, all equal to float rounding: ``weight`` op(x, W + ΔW), ``activation``
    op(x) + s·x·Aᵀ·Bᵀ, ``fused`` (A rides in the base op, see :mod:`visionlora.lora.fused`) and, where
    ``supports_fused_split``, ``fused-split`` (the fused backward pass with a contiguous base op plus h = x·Aᵀ).
    ``form='auto'`` times the forms the slot supports on its first training step (:func:`measure_faster_form`).
    """

    supports_activation_form = True
    supports_fused_split = False

    def __init__(self, base_layer: nn.Module, active_adapter: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapter = active_adapter
        self.merged_adapter: str | None = None
        self.holds_default = False
        # Set by visionlora.lora.batch.adapter_batch for a forward pass where each sample has its own adapter.
        self.batch_plan = None

    # ----- subclass interface -------------------------------------------------------------------------------
    def build_factors(self, slot: nn.Module, rank: int, **kind) -> None:
        raise NotImplementedError

    def factors(self, adapter: str | nn.Module | None = None) -> list[Factors]:
        raise NotImplementedError

    def base_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def activation_delta(self, x: torch.Tensor, adapter: str | nn.Module | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fused_blocker(self, slot: nn.Module) -> str | None:
        """Why ``slot`` has no fused form on this layer, or None when it has one."""
        return f"{type(self).__name__} has no fused form"

    def fused_forward(self, x: torch.Tensor, slot: nn.Module, split: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def activation_forward(self, x: torch.Tensor, lora_input: torch.Tensor,
                           adapter: str | nn.Module | None = None) -> torch.Tensor:
        """base(x) + activation_delta(lora_input), the delta added in place: the base output is fresh and nothing
        saved it for backward, so no second and third output-sized tensor (the delta, the sum) are made."""
        return self.base_layer(x).add_(self.activation_delta(lora_input, adapter))

    # ----- named adapters -----------------------------------------------------------------------------------
    def new_slot(self, rank: int, scale: float, dropout: float = 0.0, use_dora: bool = False, form: str = "auto",
                 **kind) -> AdapterSlot:
        """A slot of uninitialised factors for this layer, not yet added (see :meth:`add_slot`, :meth:`initialize`).

        ``kind``: the subclass's own options (``slices`` for qkv and MultiheadAttention, ``adapt_out_proj``).
        """
        slot = AdapterSlot()
        slot.rank = rank
        slot.scale = float(scale)
        # No dropout module when p == 0: nn.Dropout(0) still copies its input in training mode.
        slot.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None
        slot.use_dora = use_dora
        slot.fused_form = form in FUSED_FORMS and self.fused_blocker(slot) is None
        # form='fused-split' where the layer has one fused layout only (convs other than 1x1 stride 1, Linears with
        # out <= in): that one.
        slot.fused_split = slot.fused_form and form == "fused-split" and self.supports_fused_split
        # form='fused' where the layer has none: what 'auto' would choose among the other forms.
        slot.weight_form = self._resolve_form("auto" if form in FUSED_FORMS else form, slot)
        slot.weight_form = slot.weight_form and not slot.fused_form
        # form='auto' (or 'fused' without one) where several forms exist: time them on the first training step.
        slot.form_pending = (form in ("auto", *FUSED_FORMS) and not slot.fused_form
                             and len(self.candidate_forms(slot)) > 1)
        slot._merged_norm = None
        if use_dora:
            weight = self.base_weight()
            slot.lora_magnitude = nn.Parameter(weight.new_empty(weight.shape[0]))
        self.build_factors(slot, rank, **kind)
        return slot

    def add_slot(self, name: str, slot: AdapterSlot) -> None:
        """Hold ``slot`` as adapter ``name``: on the layer itself for ``default``, else in ``lora_adapters``."""
        if self.slot_or_none(name) is not None:
            raise ValueError(f"{type(self).__name__} already holds an adapter named {name!r}")
        if name == DEFAULT_ADAPTER:
            _move_members(slot, self)
            self.holds_default = True
            return
        if "lora_adapters" not in self._modules:
            self.lora_adapters = nn.ModuleDict()
        self.lora_adapters[name] = slot

    def remove_slot(self, name: str) -> None:
        """Drop adapter ``name``'s factors from this layer (its parameters are freed with the last reference)."""
        self.slot(name)
        if name != DEFAULT_ADAPTER:
            del self.lora_adapters[name]
            return
        for member in _slot_members(self):
            delattr(self, member)
        self.holds_default = False

    def adapter_names(self) -> list[str]:
        """The adapters this layer holds, ``default`` first."""
        others = list(self._modules["lora_adapters"]) if "lora_adapters" in self._modules else []
        return ([DEFAULT_ADAPTER] if self.holds_default else []) + others

    def slot_or_none(self, name: str) -> nn.Module | None:
        """Adapter ``name``'s slot (the layer itself for ``default``), or None when this layer has no such adapter."""
        if name == DEFAULT_ADAPTER:
            return self if self.holds_default else None
        adapters = self._modules.get("lora_adapters")
        return adapters[name] if adapters is not None and name in adapters else None

    def slot(self, adapter: str | nn.Module | None = None) -> nn.Module:
        """The slot of ``adapter`` (None: the active one); a slot passed in is returned as it is."""
        if isinstance(adapter, nn.Module):
            return adapter
        name = self.active_adapter if adapter is None else adapter
        found = self.slot_or_none(name)
        if found is None:
            raise ValueError(f"{type(self).__name__} holds no adapter {name!r}; it holds {self.adapter_names()}")
        return found

    @property
    def merged(self) -> bool:
        """Whether an adapter's ΔW is folded into the base weight (``merged_adapter`` says which)."""
        return self.merged_adapter is not None

    @merged.setter
    def merged(self, value: bool) -> None:
        self.merged_adapter = self.active_adapter if value else None

    # ----- forward ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged_adapter is not None:
            return self.base_layer(x)
        if self.batch_plan is not None:
            return self.mixed_forward(x)
        # Only the active adapter's slot is looked up: the others cost nothing.
        slot = self.slot_or_none(self.active_adapter)
        if slot is None:
            return self.base_layer(x)
        return self.slot_forward(x, slot)

    def slot_forward(self, x: torch.Tensor, slot: nn.Module) -> torch.Tensor:
        """The unmerged forward pass with one adapter, in its form."""
        if slot.form_pending and self.training and torch.is_grad_enabled():
            chosen = measure_faster_form(self, x, slot)
            slot.weight_form, slot.fused_form = chosen == "weight", chosen in FUSED_FORMS
            slot.fused_split, slot.form_pending = chosen == "fused-split", False
        if slot.fused_form and not self.base_weight().requires_grad:
            return self.fused_forward(x, slot, split=slot.fused_split)
        if slot.weight_form:
            return self.forward_with_weight(x, self.adapted_weight(slot))
        lora_input = slot.lora_dropout(x) if slot.lora_dropout is not None else x
        return self.activation_forward(x, lora_input, slot)

    def mixed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each sample (dim 0) with its own adapter (``batch_plan``). A batch of one weight-form adapter runs one op
        with its W + ΔW, as that adapter alone. Otherwise one base op for the whole batch plus each group's low-rank
        branch where every group can run the activation form (exact for weight-form slots too: the same ΔW, applied
        to the activations, and one op instead of one per group), else (DoRA, MultiheadAttention) one op per group
        with its own W + ΔW."""
        plan = self.batch_plan
        plan.check_batch(x.shape[0])
        slots = [self.slot_or_none(name) for name in plan.names]
        if all(slot is None for slot in slots):  # no adapter of this batch adapts this layer
            return self.base_layer(x)
        if len(slots) == 1 and slots[0].weight_form:
            return self.slot_forward(x, slots[0])
        if all(slot is None or self._branch_applies(slot) for slot in slots):
            out = self.base_layer(x)
            if self._per_sample_branches_apply(slots) and self.add_per_sample_deltas_(out, x, slots, plan.sample_group):
                return out
            for group, slot in enumerate(slots):
                if slot is not None:
                    rows = plan.take(x, group)
                    rows = slot.lora_dropout(rows) if slot.lora_dropout is not None else rows
                    delta = self.activation_delta(rows, slot).to(out.dtype)
                    out.index_add_(0, plan.indices[group].to(out.device), delta)
            return out
        pieces = [self.base_layer(rows) if slot is None else self.slot_forward(rows, slot)
                  for rows, slot in zip(plan.split(x), slots, strict=True)]
        return plan.join(pieces)

    def _branch_applies(self, slot: nn.Module) -> bool:
        """Whether the slot's update can be applied as an activation-space branch op(x) + x·Aᵀ·Bᵀ."""
        return self.supports_activation_form and not slot.use_dora

    def add_per_sample_deltas_(self, out: torch.Tensor, x: torch.Tensor, slots: list[nn.Module | None],
                               sample_group: torch.Tensor) -> bool:
        """Add sample i's branch with adapter ``slots[sample_group[i]]`` into ``out`` in a few batched ops
        (:mod:`visionlora.lora.per_sample`); False, having changed nothing, where this layer kind cannot."""
        return False

    def _per_sample_branches_apply(self, slots: list[nn.Module | None]) -> bool:
        # Dropout draws a mask per group's rows in training: the per-group loop keeps that exact.
        return not (self.training and any(slot is not None and slot.lora_dropout is not None for slot in slots))

    def forward_in_form(self, x: torch.Tensor, form: str | bool, adapter: str | nn.Module | None = None
                        ) -> torch.Tensor:
        """The unmerged forward pass in ``form`` (a name of :data:`FORM_NAMES`; True/False: weight/activation).
        All forms give the same result up to float rounding, and each is the very path :meth:`forward` takes, so
        timing it measures what will run."""
        slot = self.slot(adapter)
        form = {True: "weight", False: "activation"}.get(form, form)
        if form == "weight":
            return self.forward_with_weight(x, self.adapted_weight(slot))
        if form in FUSED_FORMS:
            return self.fused_forward(x, slot, split=form == "fused-split")
        return self.activation_forward(x, x, slot)

    def candidate_forms(self, slot: nn.Module) -> list[str]:
        """The forms ``form='auto'`` chooses among for ``slot`` (the weight form always exists).

        ``fused-split`` is not among them: it is faster than ``fused`` on some layers measured alone (ConvNeXt's
        stage-0 fc1, ResNet's expanding 1x1 convs), but whole training steps with ``auto`` choosing it per layer
        were slower than all-fused in 9 of 13 interleaved comparisons over three sessions (6 of 7 in the last:
        ViT-S 1.13 against 1.03 x floor, ResNet-50 1.22 against 1.14), so it is an explicit form only.
        """
        forms = ["weight"] if slot.lora_dropout is None else []
        if self._branch_applies(slot):
            forms.append("activation")
        if self.fused_blocker(slot) is None:
            forms.append("fused")
        return forms

    def form_name(self, adapter: str | nn.Module | None = None) -> str:
        """The form ``adapter``'s slot runs in: ``fused``, ``fused-split``, ``weight`` or ``activation``."""
        slot = self.slot(adapter)
        if slot.fused_form:
            return "fused-split" if slot.fused_split else "fused"
        return "weight" if slot.weight_form else "activation"

    def _resolve_form(self, form: str, slot: nn.Module) -> bool:
        """True for the weight-space form op(x, W + ΔW), False for the activation-space form op(x) + x·Aᵀ·Bᵀ."""
        needs_weight_form = not self._branch_applies(slot)
        if needs_weight_form and slot.lora_dropout is not None:
            kind = "DoRA" if slot.use_dora else type(self.base_layer).__name__
            raise ValueError(f"LoRA dropout needs the activation-space form, which {kind} layers lack; set dropout=0")
        if needs_weight_form:
            return True
        if form == "auto":
            # Until measured (see measures_form), measuring layers run in the weight form: one op instead of three.
            return self.measures_form() and slot.lora_dropout is None
        if form == "weight" and slot.lora_dropout is not None:
            raise ValueError("LoRA dropout needs the activation-space form; set dropout=0 or form='auto'")
        return form == "weight"

    def measures_form(self) -> bool:
        """Whether ``form='auto'`` runs the weight form until it has measured (else: the activation form)."""
        return False

    # ----- ΔW and merge -------------------------------------------------------------------------------------
    def delta_weight(self, adapter: str | nn.Module | None = None) -> torch.Tensor:
        """ΔW = scale · B·A in the base weight's shape (block-diagonal per group, zero rows where not adapted)."""
        slot = self.slot(adapter)
        weight = self.base_weight()
        pairs = self.factors(slot)
        if len(pairs) == 1 and pairs[0].rows == slice(None):
            # The common case: one pair covers every row, so no zero-filled buffer is needed.
            return pairs[0].blocks(slot.scale).reshape(weight.shape)
        delta = weight.new_zeros(weight.shape[0], weight[0].numel())
        for pair in pairs:
            delta[pair.rows] = pair.blocks(slot.scale).reshape(-1, delta.shape[1])
        return delta.reshape(weight.shape)

    def adapted_weight(self, adapter: str | nn.Module | None = None) -> torch.Tensor:
        """W + ΔW, rescaled per output channel by DoRA's magnitude when enabled (Liu et al. 2024)."""
        slot = self.slot(adapter)
        weight = self.base_weight() + self.delta_weight(slot)
        if not slot.use_dora:
            return weight
        # DoRA section 4.3: the norm is treated as a constant so it receives no gradient.
        norm = _row_norm(weight).detach()
        return weight * _per_row(slot.lora_magnitude / norm, weight)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter's ΔW into the base weight in place. Merging a merged layer does nothing, nor
        does merging a layer the active adapter does not adapt."""
        slot = self.slot_or_none(self.active_adapter)
        if self.merged or slot is None:
            return
        weight = self.base_weight()
        if slot.use_dora:
            slot._merged_norm = _row_norm(weight.float() + self.delta_weight(slot).float())
        weight.copy_(self.adapted_weight(slot).to(weight.dtype))
        self.merged_adapter = self.active_adapter

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (up to float rounding). Unmerging an unmerged layer does nothing."""
        if not self.merged:
            return
        slot = self.slot(self.merged_adapter)
        weight = self.base_weight()
        restored = weight.float()
        if slot.use_dora:
            restored = restored * _per_row(slot._merged_norm / slot.lora_magnitude.float(), restored)
        weight.copy_((restored - self.delta_weight(slot).float()).to(weight.dtype))
        self.merged_adapter = None

    # ----- initialisation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, init: str, adapter: str | nn.Module | None = None) -> None:
        """Set A and B (and the DoRA magnitude); ``pissa`` also moves the principal part out of the base weight."""
        slot = self.slot(adapter)
        for pair in self.factors(slot):
            _init_pair(pair, init)
        if init == "pissa":
            self._init_pissa(slot)
        if slot.use_dora:
            slot.lora_magnitude.copy_(_row_norm(self.base_weight() + self.delta_weight(slot)))

    def _init_pissa(self, slot: nn.Module) -> None:
        """PiSSA (Meng et al. 2024): A, B from the top-r singular triplets; the base weight keeps the residual.

        The initial factors are kept as buffers so the adapter can be saved as a plain LoRA against the original
        weights (rank 2r: scale·(B·A - B0·A0)).
        """
        weight = self.base_weight()
        matrix = weight.detach().float().reshape(weight.shape[0], -1)
        for index, pair in enumerate(self.factors(slot)):
            blocks = matrix[pair.rows].reshape(pair.groups, -1, matrix.shape[1])
            u, s, vh = torch.linalg.svd(blocks, full_matrices=False)
            root = (s[:, : pair.rank] / slot.scale).sqrt()
            a = root.unsqueeze(-1) * vh[:, : pair.rank]
            b = u[:, :, : pair.rank] * root.unsqueeze(1)
            pair.A.copy_(a.reshape(pair.A.shape))
            pair.B.copy_(b.reshape(pair.B.shape))
            slot.register_buffer(f"pissa_A0_{index}", pair.A.detach().clone())
            slot.register_buffer(f"pissa_B0_{index}", pair.B.detach().clone())
        weight.sub_(self.delta_weight(slot).to(weight.dtype))

    def pissa_initial_factors(self, adapter: str | nn.Module | None = None
                              ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The (A0, B0) of each factor pair when initialised with PiSSA, else None."""
        slot = self.slot(adapter)
        if "pissa_A0_0" not in slot._buffers:
            return None
        count = len(self.factors(slot))
        return [(slot.get_buffer(f"pissa_A0_{i}"), slot.get_buffer(f"pissa_B0_{i}")) for i in range(count)]

    # ----- bookkeeping --------------------------------------------------------------------------------------
    def lora_parameter_count(self, adapter: str | nn.Module | None = None) -> int:
        """Trainable LoRA numbers of one adapter in this layer (A, B and the DoRA magnitude)."""
        slot = self.slot(adapter)
        count = sum(p.A.numel() + p.B.numel() for p in self.factors(slot))
        return count + (slot.lora_magnitude.numel() if slot.use_dora else 0)

    def extra_repr(self) -> str:
        names = self.adapter_names()
        slot = self.slot_or_none(self.active_adapter)
        text = f"adapters={names}, active={self.active_adapter!r}" if names != [DEFAULT_ADAPTER] else ""
        if slot is not None:
            ranks = ",".join(str(p.rank) for p in self.factors(slot))
            form = self.form_name(slot) + ("?" if slot.form_pending else "")
            own = f"rank={ranks}, scale={slot.scale:g}, form={form}, dora={slot.use_dora}, merged={self.merged}"
            text = f"{own}, {text}" if text else own
        return text


def _slot_members(layer: LoraLayer) -> list[str]:
    """The default adapter's members on ``layer``: its settings, parameters, buffers and modules."""
    settings = [name for name in SLOT_SETTINGS if name in vars(layer) or name in layer._modules]
    owned = [*layer._parameters, *layer._buffers, *layer._modules]
    return settings + [name for name in owned if name not in ("base_layer", "lora_adapters", *settings)]


def _move_members(slot: nn.Module, layer: LoraLayer) -> None:
    """Put a slot's members on the layer itself (the default adapter's home): the same objects, nothing copied."""
    for name in SLOT_SETTINGS:
        setattr(layer, name, getattr(slot, name))
    for name, param in slot._parameters.items():
        layer.register_parameter(name, param)
    for name, buffer in slot._buffers.items():
        layer.register_buffer(name, buffer)
    for name, module in slot._modules.items():
        if name not in SLOT_SETTINGS:
            layer.add_module(name, module)


# A form must be this fraction faster than the fused forms to be chosen over them: they need the fewest FLOPs
# (no weight gradient, no thin k×k conv in forward, three thin GEMMs instead of six), so a smaller gap is taken
# for noise: with 10%, single-layer timings on a loaded 2-core machine still flipped 10-20% of the layers.
# (fused-split is not measured: see LoraLayer.candidate_forms.)
FUSED_MARGIN = 0.25


def measure_faster_form(layer: LoraLayer, x: torch.Tensor, adapter: str | nn.Module | None = None,
                        repeats: int = 3) -> str:
    """Time forward + backward of each of the slot's :meth:`~LoraLayer.candidate_forms` on ``x`` (best of
    ``repeats``, the forms taken in turn so drift hits all alike); the name of the fastest, where the faster fused
    form wins unless another is :data:`FUSED_MARGIN` (25%) faster.

    Which form wins depends on the layer's shape, the batch and the device's kernels (a thin k×k conv with r output
    channels is cheap in FLOPs but often slow on CPUs; the fused form's extra r GEMM columns cost little where the
    kernel is efficient), so it is measured, as cudnn.benchmark does for algorithms.
    """
    slot = layer.slot(adapter)
    probe = x.detach().requires_grad_(x.requires_grad)
    inputs = [probe] if probe.requires_grad else []
    inputs += [p for p in slot.parameters() if p.requires_grad]
    forms = layer.candidate_forms(slot)
    timings = dict.fromkeys(forms, float("inf"))
    for _ in range(repeats):
        for form in forms:
            start = time.perf_counter()
            # .contiguous(): the next layer reads the output, and a strided one (the fused form's y, rows out + r
            # apart) costs there: GELU runs about 2x slower on it. One copy stands in for that read; a no-op for
            # the other forms.
            out = layer.forward_in_form(probe, form, slot).contiguous()
            if inputs:
                torch.autograd.grad(out, inputs, grad_outputs=torch.ones_like(out), allow_unused=True)
            timings[form] = min(timings[form], time.perf_counter() - start)
    for form in FUSED_FORMS:
        if form in timings:
            timings[form] *= 1.0 - FUSED_MARGIN
    return min(forms, key=timings.__getitem__)


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
