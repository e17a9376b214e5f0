"""The fused form of LoRA: the adapter's down-projection rides in the frozen layer's own GEMM or convolution.

LoRA (Hu et al. 2021, arXiv:2106.09685) adds ΔW = s·B·A to a frozen W. Its activation form runs op(x) plus two
thin ops x·Aᵀ and (x·Aᵀ)·Bᵀ, with four more thin ops in the backward pass, each reading an activation-sized tensor
at low efficiency; its weight form runs op(x, W + ΔW) but pays the full weight gradient. The fused form keeps the
weight form's forward and the activation form's cheap factor gradients:

* forward: one GEMM (or one conv) of x with Q = [W + s·B·A; A], which has out + r output rows (channels). The
  first ``out`` columns are y = x·(W + ΔW)ᵀ + b; the last r are h = x·Aᵀ, kept for dB. Building Q costs
  out·in·r multiply-adds on the weights (r/N of the base GEMM for N rows of x) and no activation-sized thin op.
* backward, with g the output gradient: the input gradient is g·(W + ΔW) in one GEMM (one transposed conv) with
  the rows of Q the forward pass used, so no [g, g_h] concatenation of activation size is built; then only the
  thin factor gradients remain: g_h = s·g·B, dA = g_hᵀ·x and dB = s·gᵀ·h. W never receives a gradient.

Saved for backward: x (which the base layer saves as well), h (N×r) and Q (weight-sized). y is returned as a
tensor over the GEMM's output storage (not a view, so downstream in-place ops are allowed); its rows are
out + r apart.

A second layout for Linears, ``fused-split`` (``split=True``), keeps y contiguous: GELU runs about 2x slower on a
strided input, which on ConvNeXt's stage-0 fc1 (25,088 rows, 96 → 384) costs more than the layer's whole LoRA
overhead. Its forward pass is one GEMM of x with W + ΔW plus h = A·xᵀ as a thin GEMM of its own (a second read of
x, cheap where x is the narrow side); its backward pass gets the input gradient and g_h = s·g·B from one GEMM
g·[W + ΔW | s·B], so the wide g is read once instead of twice (the input gradient comes back with rows in + r
apart). A 1x1, stride-1, ungrouped conv is a Linear over each image's pixels and has the same layout
(:class:`_FusedPointwiseSplit`; ResNet bottlenecks' 1x1 convs). ``form='auto'`` runs ``fused``; this layout is
asked for by name (see ``LoraLayer.candidate_forms``).

Not fused (the layer falls back to the weight or activation form, see ``fused_blocker`` of each layer): DoRA
(m/||W + ΔW|| rescales rows, not linear in x·Aᵀ), LoRA dropout (it drops the LoRA branch's input only, while the
fused GEMM feeds one x to W and A), a base weight that requires grad, and conv subclasses (timm's StdConv2d /
ScaledStdConv2d standardise W + ΔW inside forward, which is not linear in ΔW; Conv2dSame pads per input size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import Function

DORA_REASON = "DoRA rescales each row of W + ΔW by m/||W + ΔW||, which is not linear in x·Aᵀ"
DROPOUT_REASON = "LoRA dropout drops the LoRA branch's input only, but the fused GEMM feeds one x to W and A"
CONV_SUBCLASS_REASON = ("only a plain nn.Conv2d is fused: {name} transforms its weight or input inside forward "
                        "(StdConv2d standardises W + ΔW, not linear in ΔW; Conv2dSame pads per input size)")


def slot_blocker(slot) -> str | None:
    """Why a slot's settings rule the fused form out (DoRA, dropout), or None."""
    if slot.use_dora:
        return DORA_REASON
    if slot.lora_dropout is not None:
        return DROPOUT_REASON
    return None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the base op would run in: autocast's when it is on for ``x``'s device, else ``x``'s own."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _alias(z: torch.Tensor, size: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
    """A tensor over ``z``'s storage with the given geometry that autograd does not treat as a view of ``z``.

    Autograd forbids in-place ops on views a custom Function returns; ``z`` itself never leaves the Function (the
    part of it backward needs is cloned), so nothing else can observe the aliasing.
    """
    return z.new_empty(0).set_(z.untyped_storage(), z.storage_offset(), size, stride)


# ----- Linear ------------------------------------------------------------------------------------------------
class _FusedLinear(Function):
    """y = x·(W + s·Σ_i B_i·A_i)ᵀ + b with the factor pairs in blocks: B_i covers output rows ``rows[i]`` and
    A's rows i·r:(i+1)·r (fused qkv slices); one dense pair is ``rows = [slice(0, out)]``."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, scale, rows, split, *bs):
        out, rank = weight.shape[0], bs[0].shape[1]
        dtype = x.dtype
        ctx.scale, ctx.rows, ctx.rank, ctx.has_bias, ctx.factor_dtype = scale, rows, rank, bias is not None, a.dtype
        if split:
            # y contiguous from W + ΔW alone, h = x·Aᵀ from its own thin GEMM; P = [W + ΔW | s·B] lets the backward
            # GEMM g·P give the input gradient and g_h = s·g·B at once (g read once, not twice).
            in_features, total_rank = x.shape[1], a.shape[0]
            p = x.new_zeros(out, in_features + total_rank)
            _write_adapted_rows(p[:, :in_features], weight, a, bs, rows, scale)
            for index, (r, b) in enumerate(zip(rows, bs, strict=True)):
                p[r, in_features + index * rank:in_features + (index + 1) * rank] = b * scale
            y = F.linear(x, p[:, :in_features], None if bias is None else bias.to(dtype))
            h_t = a.to(dtype).mm(x.t())  # (r, N): r output rows, and the layout the dB GEMM reads fastest
            ctx.save_for_backward(x, p, h_t, *bs)
            ctx.split = True
            return y
        ctx.split = False
        q = x.new_empty(out + a.shape[0], x.shape[1])
        _write_adapted_rows(q[:out], weight, a, bs, rows, scale)
        q[out:].copy_(a)
        bias_cat = None
        if bias is not None:
            bias_cat = torch.cat([bias.to(dtype), bias.new_zeros(a.shape[0], dtype=dtype)])
        z = F.linear(x, q, bias_cat)
        h_t = z[:, out:].t().contiguous()  # (r, N): the layout the dB GEMM reads fastest
        ctx.save_for_backward(x, q[:out], h_t, *bs)
        return _alias(z, (x.shape[0], out), (z.stride(0), 1))

    @staticmethod
    def backward(ctx, g):
        x, adapted, h_t, *bs = ctx.saved_tensors
        scale, rows, rank = ctx.scale, ctx.rows, ctx.rank
        g = g.to(x.dtype)
        if ctx.split:
            both = g.mm(adapted)  # adapted is P = [W + ΔW | s·B]: (N, in + r)
            grad_x, g_h_t = both[:, :x.shape[1]], both[:, x.shape[1]:].t()
        else:
            grad_x = g.mm(adapted) if ctx.needs_input_grad[0] else None
            # The thin GEMMs with r output rows (Bᵀ·gᵀ, hᵀ·g): on CPU BLAS several times faster than g·B and gᵀ·h.
            g_h_t = torch.cat([b.to(g.dtype).t().mm(g[:, r].t()) for r, b in zip(rows, bs, strict=True)]).mul_(scale)
        grad_a = g_h_t.mm(x).to(ctx.factor_dtype)
        grad_bs = [h_t[i * rank:(i + 1) * rank].mm(g[:, r]).t().mul_(scale).to(ctx.factor_dtype)
                   for i, r in enumerate(rows)]
        grad_bias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return (grad_x, None, grad_bias, grad_a, None, None, None, *grad_bs)


def _write_adapted_rows(dest: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, bs: tuple, rows: list[slice],
                        scale: float) -> None:
    """dest = W + s·Σ_i B_i·A_i (rows[i] of W get B_i times A's i-th r rows), in ``dest``'s dtype.

    ``rows`` are disjoint slices with explicit bounds; rows no slice covers (a qkv slice left out) copy W.
    """
    rank = bs[0].shape[1]
    same_dtype = dest.dtype == weight.dtype
    for index, (r, b) in enumerate(zip(rows, bs, strict=True)):
        a_i = a[index * rank:(index + 1) * rank]
        if same_dtype:
            torch.addmm(weight[r], b, a_i, alpha=scale, out=dest[r])
        else:
            dest[r].copy_(torch.addmm(weight[r], b, a_i, alpha=scale))
    done = 0
    for r in sorted(rows, key=lambda s: s.start):
        if r.start > done:
            dest[done:r.start].copy_(weight[done:r.start])
        done = r.stop
    if done < weight.shape[0]:
        dest[done:].copy_(weight[done:])


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                 bs: list[torch.Tensor], rows: list[slice], scale: float, split: bool = False) -> torch.Tensor:
    """x·(W + ΔW)ᵀ + b in the fused form for a Linear (``bs``/``rows``: one B per row block, see _FusedLinear).

    ``split``: the ``fused-split`` layout, one GEMM of x with W + ΔW (a contiguous y) and h = x·Aᵀ as a thin GEMM
    of its own, for layers where the r extra GEMM columns and a y strided by out + r cost more than reading x once
    more (narrow layers over many rows: ConvNeXt's stage-0 MLP). The backward pass is the same.

    Under autocast the GEMMs run in autocast's dtype, as ``F.linear`` would; the factor gradients come back in the
    factors' own dtype.
    """
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        rows2d = x.reshape(-1, x.shape[-1]).to(dtype)
        y = _FusedLinear.apply(rows2d, weight, bias, a, scale, rows, split, *bs)
    return y.view(*x.shape[:-1], weight.shape[0])


# ----- Conv2d ------------------------------------------------------------------------------------------------
class _FusedConv2d(Function):
    """conv(x, W + s·blockdiag_g(B_g·A_g)) + b, with h = conv(x, A) from the same conv's extra channels."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale, stride, padding, dilation, groups):
        out, fan = weight.shape[0], weight[0].numel()
        out_g, rank = out // groups, a.shape[0] // groups
        q = x.new_empty(groups, out_g + rank, fan)
        w3, a3 = weight.reshape(groups, out_g, fan), a.reshape(groups, rank, fan)
        b3 = b.reshape(groups, out_g, rank)
        if groups == 1 and weight.dtype == x.dtype:
            torch.baddbmm(w3, b3, a3, alpha=scale, out=q[:, :out_g])
        else:
            q[:, :out_g].copy_(torch.baddbmm(w3, b3, a3, alpha=scale))
        q[:, out_g:].copy_(a3)
        bias_cat = None
        if bias is not None:
            bias_cat = torch.cat([bias.to(x.dtype).reshape(groups, out_g), bias.new_zeros(groups, rank,
                                                                                          dtype=x.dtype)], 1)
            bias_cat = bias_cat.reshape(-1)
        z = F.conv2d(x, q.reshape(-1, *weight.shape[1:]), bias_cat, stride, padding, dilation, groups)
        n, _, height, width = z.shape
        z5 = z.view(n, groups, out_g + rank, height, width)
        h = z5[:, :, out_g:].reshape(n, groups * rank, height, width)
        adapted = q[:, :out_g].reshape(weight.shape) if groups > 1 else q[0, :out_g].view(weight.shape)
        ctx.save_for_backward(x, adapted, h, b)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.scale, ctx.a_shape, ctx.has_bias, ctx.factor_dtype = scale, a.shape, bias is not None, a.dtype
        if groups > 1:  # the channels of y are not evenly strided: one copy
            return z5[:, :, :out_g].reshape(n, out, height, width)
        return _alias(z, (n, out, height, width), z.stride())

    @staticmethod
    def backward(ctx, g):
        x, adapted, h, b = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        g = g.to(x.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(g, x, adapted, None, stride, padding, dilation, False,
                                                         [0, 0], groups, [True, False, False])[0]
        g_h = _conv_lora_input_grad(g, b.to(g.dtype), ctx.scale, groups)
        grad_a = _conv_a_grad(g_h, x, ctx.a_shape, ctx.conv)
        grad_b = _conv_b_grad(g, h, b.to(g.dtype), groups).mul_(ctx.scale)
        grad_a, grad_b = grad_a.to(ctx.factor_dtype), grad_b.to(ctx.factor_dtype)
        grad_bias = g.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None, None, None


# The thin conv gradients as batched GEMMs where they are 1x1 (an (r, H·W) by (H·W, C) product per image): on CPU
# several times faster than convolution_backward's thin-channel kernels.
def _conv_lora_input_grad(g: torch.Tensor, b: torch.Tensor, scale: float, groups: int) -> torch.Tensor:
    """g_h = s·Bᵀ·g per pixel (the gradient at h = conv(x, A)): (N, groups·r, H, W)."""
    out_g, rank = b.shape[0] // groups, b.shape[1]
    if groups == 1:
        n, _, height, width = g.shape
        return torch.matmul(b.view(-1, rank).t() * scale, g.reshape(n, -1, height * width)).view(n, rank, height, width)
    b_t = b.reshape(groups, out_g, rank).transpose(1, 2).reshape(groups * rank, out_g, 1, 1)
    return F.conv2d(g, b_t * scale, groups=groups)


def _conv_a_grad(g_h: torch.Tensor, x: torch.Tensor, a_shape: torch.Size, conv: tuple) -> torch.Tensor:
    """dA: the weight gradient of conv(x, A) for its r (per group) output channels only."""
    stride, padding, dilation, groups = conv
    if groups == 1 and a_shape[2:] == (1, 1) and list(stride) == [1, 1] and list(padding) == [0, 0]:
        n, rank = g_h.shape[:2]
        grad = torch.matmul(g_h.reshape(n, rank, -1), x.reshape(n, x.shape[1], -1).transpose(1, 2)).sum(0)
        return grad.view(a_shape)
    return torch.ops.aten.convolution_backward(g_h, x, x.new_empty(a_shape), None, stride, padding, dilation, False,
                                               [0, 0], groups, [False, True, False])[1]


def _conv_b_grad(g: torch.Tensor, h: torch.Tensor, b: torch.Tensor, groups: int) -> torch.Tensor:
    """dB/s: the weight gradient of the 1x1 up-projection from h (N, groups·r, H, W) to g's channels."""
    if groups == 1:
        n = g.shape[0]
        # (h·gᵀ)ᵀ per image: r output rows, the layout CPU BLAS runs fastest (1.3-1.6x faster than g·hᵀ here).
        grad = torch.matmul(h.reshape(n, h.shape[1], -1), g.reshape(n, g.shape[1], -1).transpose(1, 2)).sum(0)
        return grad.t().reshape(b.shape)
    return torch.ops.aten.convolution_backward(g, h, b, None, [1, 1], [0, 0], [1, 1], False, [0, 0], groups,
                                               [False, True, False])[1]


class _FusedPointwiseSplit(Function):
    """The ``fused-split`` layout of a 1x1, stride-1, ungrouped conv: a Linear over each image's pixels.

    Per image (channels x pixels): y = (W + ΔW)·x + b, contiguous, and h = A·x as a thin GEMM of its own; backward
    gets the input gradient and g_h = s·Bᵀ·g from one GEMM [W + ΔW | s·B]ᵀ·g, so the output gradient is read once
    for both instead of twice (ResNet bottlenecks' 1x1 convs at 56x56: the thin g_h GEMM reads 256 channels).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale):
        n, channels, height, width = x.shape
        out, rank = weight.shape[0], a.shape[0]
        w2, a2, b2 = weight.reshape(out, channels), a.reshape(rank, channels), b.reshape(out, rank)
        p_t = x.new_empty(channels + rank, out)  # [W + ΔW | s·B]ᵀ: the backward GEMM's left operand
        p_t[:channels].copy_(torch.addmm(w2, b2, a2, alpha=scale).t())
        p_t[channels:].copy_(b2.t() * scale)
        pixels = x.reshape(n, channels, height * width)
        y = torch.matmul(p_t[:channels].t(), pixels)
        if bias is not None:
            y += bias.to(x.dtype)[:, None]
        h = torch.matmul(a2.to(x.dtype), pixels)
        ctx.save_for_backward(x, p_t, h)
        ctx.scale, ctx.a_shape, ctx.b_shape, ctx.factor_dtype = scale, a.shape, b.shape, a.dtype
        ctx.has_bias = bias is not None
        # Over y's storage, not a view of it: autograd forbids in-place ops (timm's inplace activations) on views.
        return _alias(y, (n, out, height, width), (out * height * width, height * width, width, 1))

    @staticmethod
    def backward(ctx, g):
        x, p_t, h = ctx.saved_tensors
        n, channels, height, width = x.shape
        g3 = g.to(x.dtype).reshape(n, g.shape[1], height * width)
        both = torch.matmul(p_t, g3)  # (N, in + r, H·W): the input gradient, then g_h
        grad_x = both[:, :channels].view(n, channels, height, width)
        g_h = both[:, channels:]
        grad_a = torch.matmul(g_h, x.reshape(n, channels, -1).transpose(1, 2)).sum(0)
        grad_b = torch.matmul(h, g3.transpose(1, 2)).sum(0).t().mul_(ctx.scale)
        grad_bias = g3.sum((0, 2)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return (grad_x, None, grad_bias, grad_a.reshape(ctx.a_shape).to(ctx.factor_dtype),
                grad_b.reshape(ctx.b_shape).to(ctx.factor_dtype), None)


def is_pointwise(conv: torch.nn.Conv2d) -> bool:
    """A plain 1x1, stride-1, unpadded, ungrouped conv: a Linear over pixels, which has the ``fused-split`` layout."""
    return (type(conv) is torch.nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.groups == 1 and conv.padding in ((0, 0), "valid") and conv.padding_mode == "zeros")


def fused_conv2d(conv: torch.nn.Conv2d, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 scale: float, split: bool = False) -> torch.Tensor:
    """``conv`` (a plain ``nn.Conv2d``) with weight W + s·blockdiag(B·A), in the fused form.

    Padding modes other than zeros and string paddings ('same', 'valid') are applied to x first, as
    ``nn.Conv2d._conv_forward`` does, so the fused conv itself always pads with zeros by numbers.
    """
    dtype = compute_dtype(x)
    if split:
        if not is_pointwise(conv):
            raise ValueError(f"fused_conv2d: the split layout needs a 1x1, stride-1, unpadded, ungrouped Conv2d, got "
                             f"{conv}")
        with torch.autocast(x.device.type, enabled=False):
            return _FusedPointwiseSplit.apply(x.to(dtype), conv.weight, conv.bias, a, b, scale)
    x, padding = _pre_pad(conv, x)
    with torch.autocast(x.device.type, enabled=False):
        return _FusedConv2d.apply(x.to(dtype), conv.weight, conv.bias, a, b, scale,
                                  list(conv.stride), padding, list(conv.dilation), conv.groups)


def _pre_pad(conv: torch.nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """(x, numeric zero padding) equivalent to ``conv``'s padding mode and padding."""
    if conv.padding_mode != "zeros":
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), [0, 0]
    if conv.padding == "valid":
        return x, [0, 0]
    if conv.padding != "same":
        return x, list(conv.padding)
    totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
    if all(t % 2 == 0 for t in totals):
        return x, [t // 2 for t in totals]
    # F.conv2d's 'same' puts the odd pixel after (right, bottom): pad explicitly.
    (th, tw) = totals
    return F.pad(x, [tw // 2, tw - tw // 2, th // 2, th - th // 2]), [0, 0]
