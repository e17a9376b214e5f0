"""Every sample's own low-rank branch in a few batched ops: the mixed-task batches of :mod:`.batch`.

In a mixed-task batch sample i needs scale_i · B_i·A_i applied to its own activations (Hu et al. 2021,
arXiv:2106.09685, for one adapter). Running each task's branch on its rows costs two thin ops per task and layer;
with 16 tasks in a batch of 16 that is 32 ops of one sample each, which CPU kernels run far below their speed. Here
each sample's factors are gathered into a batch of factors (ranks padded with zeros, which add nothing) and applied
by one batched matmul (Linear, 1x1 conv, strided 1x1 conv on every stride-th position) or one grouped convolution
with one group per sample (k×k conv: the sample's activations are the channels of one image; a stem reading a few
input channels instead runs one plain conv with the distinct A's), then one in-place batched matmul adds B_i·h_i
into the base output. Tasks holding one shared A (LoRA-FA) stack it once. The result equals the per-task branches
up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# One adapter's factors in one layer, as matrices, or None where that adapter does not adapt the layer:
# (A: (groups·r, fan_in_per_group...), B: (out, r, ...), scale).
Pair = tuple[torch.Tensor, torch.Tensor, float] | None


def sample_groups(indices: list[torch.Tensor], size: int) -> torch.Tensor:
    """Each sample's group (adapter) number, from the groups' batch positions."""
    found = torch.empty(size, dtype=torch.long, device=indices[0].device)
    for group, rows in enumerate(indices):
        found[rows] = group
    return found


def stacked_factors(pairs: list[Pair], groups: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's distinct down-projections A and every adapter's scale·B, padded to the largest rank and stacked:
    (D, groups, R, fan_in_g), (G, groups, out_g, R), and each adapter's row in the first (G,). Adapters holding
    one A tensor (LoRA-FA tasks, :mod:`.frozen_a`) share a row, so their branch projects each sample once. An
    adapter absent from the layer (None) gets a zero B (and row 0 of A, which it then adds nothing through)."""
    present = [pair for pair in pairs if pair is not None]
    like_a, like_b, _ = present[0]
    fan_in = like_a[0].numel()
    out = like_b.shape[0]
    top = max(a.shape[0] // groups for a, _, _ in present)
    distinct: dict[tuple, int] = {}
    row_of = [0 if pair is None else distinct.setdefault(_storage_key(pair[0]), len(distinct)) for pair in pairs]
    stacked_a = like_a.new_zeros(len(distinct), groups, top, fan_in)
    stacked_b = like_b.new_zeros(len(pairs), groups, out // groups, top)
    for index, pair in enumerate(pairs):
        if pair is not None:
            a, b, scale = pair
            rank = a.shape[0] // groups
            stacked_a[row_of[index], :, :rank] = a.reshape(groups, rank, fan_in)
            stacked_b[index, :, :, :rank] = b.reshape(groups, out // groups, rank) * scale
    return stacked_a, stacked_b, torch.tensor(row_of, dtype=torch.long, device=like_a.device)


def add_linear_deltas_(out: torch.Tensor, x: torch.Tensor, pairs: list[Pair], sample_group: torch.Tensor) -> None:
    """``out[i] += scale_i · x[i]·A_iᵀ·B_iᵀ`` for Linear layers (x: (batch, ..., in), out: (batch, ..., out))."""
    stacked_a, stacked_b, a_row = stacked_factors(pairs)
    a = stacked_a[:, 0].index_select(0, a_row.index_select(0, sample_group)).to(out.dtype)  # (batch, R, in)
    b = stacked_b[:, 0].index_select(0, sample_group).to(out.dtype)  # (batch, out, R)
    batch = x.shape[0]
    hidden = torch.bmm(x.reshape(batch, -1, x.shape[-1]).to(out.dtype), a.transpose(1, 2))
    # In place into the fresh base output (nothing saved it for backward): no output-sized temporary.
    out.view(batch, -1, out.shape[-1]).baddbmm_(hidden, b.transpose(1, 2))


def add_conv_deltas_(out: torch.Tensor, x: torch.Tensor, conv: nn.Conv2d, pairs: list[Pair],
                     sample_group: torch.Tensor) -> None:
    """``out[i] += conv(x[i], scale_i · ΔW_i)`` for a plain ``nn.Conv2d`` (zero padding, NCHW output)."""
    groups = conv.groups
    stacked_a, stacked_b, a_row = stacked_factors(pairs, groups)
    sample_a = a_row.index_select(0, sample_group)
    batch, channels = x.shape[:2]
    distinct, rank = stacked_a.shape[0], stacked_a.shape[2]
    b = stacked_b.index_select(0, sample_group).to(out.dtype)  # (batch, groups, out_g, R)
    positions = out.shape[2] * out.shape[3]
    x = x.to(out.dtype)
    if _is_pointwise(conv):
        # A 1x1 conv is a matmul over positions, (batch, R, in) @ (batch, in, positions), after taking every
        # stride-th position (zero padding 0: those are the only ones a strided 1x1 conv reads).
        rows = x[:, :, :: conv.stride[0], :: conv.stride[1]] if conv.stride != (1, 1) else x
        a = stacked_a[:, 0].index_select(0, sample_a).to(out.dtype)
        hidden = torch.bmm(a, rows.reshape(batch, channels, -1))
    elif _dense_projection_is_cheaper(conv, distinct, batch):
        # Every distinct A on the whole batch, one plain conv, then each sample's own rows.
        weight = stacked_a.reshape(distinct * rank, channels, *conv.kernel_size).to(out.dtype)
        every = F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation)
        hidden = every.view(batch, distinct, rank, positions)[torch.arange(batch, device=x.device), sample_a]
    else:
        # One group per sample (and per conv group): the batch becomes the channels of a single image.
        a = stacked_a.index_select(0, sample_a).to(out.dtype)  # (batch, groups, R, fan_in_g)
        weight = a.reshape(batch * groups * rank, channels // groups, *conv.kernel_size)
        hidden = F.conv2d(x.reshape(1, batch * channels, *x.shape[2:]), weight, None, conv.stride,
                          conv.padding, conv.dilation, batch * groups)
    hidden = hidden.reshape(batch * groups, rank, positions)
    out.view(batch * groups, -1, positions).baddbmm_(b.reshape(batch * groups, -1, rank), hidden)


def conv_supports_per_sample(conv: nn.Module, out: torch.Tensor) -> bool:
    """The batched branch needs a plain Conv2d with zero padding (its padding is then the conv's own argument)
    and an NCHW-contiguous output to add into."""
    return type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and out.is_contiguous()


def _is_pointwise(conv: nn.Conv2d) -> bool:
    return conv.kernel_size == (1, 1) and conv.groups == 1 and conv.padding in ((0, 0), "valid")


def _dense_projection_is_cheaper(conv: nn.Conv2d, distinct: int, batch: int) -> bool:
    """A grouped conv with a group per sample is the faster down-projection for k×k convs, except where each
    group would read only a few input channels (at most 4: a stem on RGB or grey images): there one plain conv
    with the few distinct A's wins while they are few against the batch. Measured on 2 AVX2 cores, batch 16,
    rank 4, ResNet-50's 7x7 stem: grouped 25.5 ms, dense 6.6 ms (one shared A), 16.6 ms (4 A's); every 3x3 conv of
    64 to 512 channels: grouped faster (e.g. 3.8 against 6.3 ms at 64 channels, 56 px)."""
    return conv.groups == 1 and conv.in_channels <= 4 and 4 * distinct <= batch


def _storage_key(tensor: torch.Tensor) -> tuple:
    """Equal for two views of the same elements (one shared Parameter), different otherwise."""
    return tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype
