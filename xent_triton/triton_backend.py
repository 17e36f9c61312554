"""Host side of the Triton kernels: launch plans, buffers, grids and launches.

A plan holds what the row layout, the options and the dtypes decide (which kernel, its tiles, its
constexpr flags and integer arguments); ``forward`` and ``backward`` add the tensors of one call.
No host syncs and no data-dependent allocation happen here, so both passes can be captured in
CUDA graphs.
"""
import struct
from dataclasses import dataclass
from typing import Optional

import torch
import triton.language as tl

from . import _alloc, kernels, launch_config
from .launcher import Launcher
from .layout import Layout, stats_shape

# Launched through Launcher: Triton binds each kernel's ~25-50 arguments once per specialization,
# not on every call (xent_triton/launcher.py).
xent_forward_kernel = Launcher(kernels.xent_forward_kernel)
xent_combine_kernel = Launcher(kernels.xent_combine_kernel)
xent_backward_kernel = Launcher(kernels.xent_backward_kernel)
xent_rows_forward_kernel = Launcher(kernels.xent_rows_forward_kernel)
xent_rows_backward_kernel = Launcher(kernels.xent_rows_backward_kernel)

_TL = {torch.float32: tl.float32, torch.float64: tl.float64}


def _hi_lo(v: float):
    """Split a float into fp32 hi + lo (see kernels.row_math.f64_param)."""
    hi = struct.unpack("f", struct.pack("f", v))[0]
    return hi, v - hi


def _same_alignment(layout: Layout, strides, itemsize: int, x_itemsize: int) -> bool:
    """Whether rows addressed with (outer, inner) ``strides`` sit at the logits rows' offset from a
    16-byte boundary, once their base addresses are a multiple of 16 bytes apart (checked per call):
    equal element sizes, and strides that differ by a multiple of 16 bytes where they are used
    (kernels/row_math.same_run)."""
    if itemsize != x_itemsize or 16 % itemsize:
        return False
    per = 16 // itemsize
    used = (layout.n_rows > layout.n_inner, layout.n_inner > 1)  # the outer / inner index is ever nonzero
    return all((a - b) % per == 0 for a, b, u in zip(strides, layout.x_strides, used) if u)


@dataclass(frozen=True)
class Plan:
    """The launches of one pass, as the layout, options, dtypes and configuration decide them (not the
    tensors' addresses): made once per prepared call (xent_triton/prepare.py)."""
    layout: Layout
    loss_dtype: Optional[torch.dtype]  # the forward's per-row loss; None for a backward
    grid: tuple
    kernel: Launcher
    scalars: tuple  # the arguments after the tensors
    flags: dict  # constexpr flags and launch options
    per_row: bool  # the one-row-per-program kernels (not the short-row tiles)
    combine: Optional[tuple]  # the split forward's combine: (kernel, scalars, flags), else None
    part_shape: Optional[tuple]
    y_aligned: bool  # labels rows share the logits rows' alignment (with 16-byte aligned bases)
    dx_strides: tuple  # (outer, inner) of dlogits: contiguous, or the logits' own (in place)
    dx_aligned: bool
    dy_aligned: bool
    gradients: tuple = ()  # a backward's (need_dx, inplace, dlabels dtype or None): what it allocates
    stats_shape: tuple = ()  # a forward's statistics (layout.stats_shape)


def _flags(hard, weighted, options, acc):
    _, smoothing, z_scale, softcap = options
    return dict(HARD=hard, HAS_WEIGHT=weighted, SMOOTH=smoothing != 0.0, HAS_Z=z_scale != 0.0,
                SOFTCAP=softcap != 0.0, ACC=_TL[acc])


def _scalars(options):
    ignore_index, smoothing, z_scale, softcap = options
    return (ignore_index, *_hi_lo(smoothing), *_hi_lo(z_scale), *_hi_lo(softcap))


def plan_forward(layout: Layout, options, dtypes, loss_dtype: torch.dtype, hard: bool, weighted: bool,
                 device: torch.device) -> Plan:
    """The forward's launches. ``options``: (ignore_index, label_smoothing, lse_square_scale, softcap);
    ``dtypes``: (logits, labels or None)."""
    n, V = layout.n_rows, layout.n_cols
    x_size = dtypes[0].itemsize
    geometry = (n, layout.n_inner, V, layout.n_classes, layout.class_offset)
    flags = _flags(hard, weighted, options, layout.acc)
    options = _scalars(options)
    y_aligned = dtypes[1] is not None and _same_alignment(layout, layout.y_strides, dtypes[1].itemsize, x_size)
    rows = launch_config.rows_launch(n, V, device, hard_forward=hard) if n else None
    combine = part_shape = None
    if rows is not None:
        kernel, grid, scalars = xent_rows_forward_kernel, (launch_config.cdiv(n, rows.rows),), geometry + options
        flags.update(ROWS=rows.rows, BLOCK=rows.block, num_warps=rows.num_warps)
    else:
        cfg = launch_config.forward_launch(n, V, x_size, device) if n else launch_config.Launch(1, 1, 1, 1)
        kernel, grid, scalars = xent_forward_kernel, (n, cfg.split), geometry + (cfg.cols_per_prog,) + options
        if cfg.split > 1:
            part_shape = (5, n, cfg.split)
            combine = (xent_combine_kernel, geometry + options[:5],  # no softcap
                       dict(HARD=hard, HAS_WEIGHT=weighted, HAS_Z=flags["HAS_Z"], SPLIT=cfg.split,
                            SPLIT_P2=launch_config.next_pow2(cfg.split), ACC=flags["ACC"], num_warps=1))
        flags.update(SPLIT=cfg.split, BLOCK=cfg.block, EPT=launch_config.slice_width(cfg.block, cfg.num_warps, x_size),
                     STAGES=cfg.stages, num_warps=cfg.num_warps)
    return Plan(layout, loss_dtype, grid, kernel, scalars, flags, rows is None, combine, part_shape, y_aligned,
                (0, 0), False, False, stats_shape=stats_shape(n))


def plan_backward(layout: Layout, options, dtypes, hard: bool, weighted: bool, need_dx: bool, need_dy: bool,
                  dy_dtype, divide: bool, inplace: bool, device: torch.device) -> Plan:
    """The backward's launches: ``need_dx``/``need_dy``, which gradients are written (dlabels in
    ``dy_dtype``); ``divide``, whether the upstream gradient is divided by a denominator tensor first;
    ``inplace``, whether dlogits is written over the logits."""
    n, V = layout.n_rows, layout.n_cols
    x_size = dtypes[0].itemsize
    flags = dict(_flags(hard, weighted, options, layout.acc), NEED_DX=need_dx, NEED_DY=need_dy, DIVIDE=divide)
    options = _scalars(options)
    contiguous = layout.contiguous_strides
    dx_strides = layout.x_strides if inplace else contiguous
    y_size = dtypes[1].itemsize if dtypes[1] is not None else 0
    dy_size = dy_dtype.itemsize if dy_dtype is not None else 0
    y_aligned = y_size > 0 and _same_alignment(layout, layout.y_strides, y_size, x_size)
    rows = launch_config.rows_launch(n, V, device) if n else None
    if rows is not None:
        kernel, grid = xent_rows_backward_kernel, (launch_config.cdiv(n, rows.rows),)
        scalars = (n, layout.n_inner, V, layout.n_classes, layout.class_offset) + options
        flags.update(ROWS=rows.rows, BLOCK=rows.block, num_warps=rows.num_warps)
    else:
        # The backward needs no reduction, so a row splits freely.
        cfg = launch_config.backward_launch(n, V, x_size, device) if n else launch_config.Launch(1, 1, 1, 1)
        kernel, grid = xent_backward_kernel, (n, cfg.split)
        scalars = (layout.n_inner, V, layout.n_classes, layout.class_offset, cfg.cols_per_prog) + options
        flags.update(BLOCK=cfg.block, num_warps=cfg.num_warps)
    return Plan(layout, None, grid, kernel, scalars, flags, rows is None, None, None, y_aligned, dx_strides,
                need_dx and _same_alignment(layout, dx_strides, x_size, x_size),
                need_dy and _same_alignment(layout, contiguous, dy_size, x_size), (need_dx, inplace, dy_dtype))


def _new(shape, dtype, device):
    # Tests poison every output (tests/conftest.py), so that an element a kernel forgot shows.
    if _alloc.POISON is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, _alloc.POISON, dtype=dtype, device=device)


def forward(plan: Plan, x, y, t, w):
    """Per-row loss and lse, and the (rows, 3) statistics the backward reads (layout.stats_shape), of
    the row views ``x`` (logits), ``y`` (labels or None), ``t`` (class indices or None), ``w`` (class
    weights or None)."""
    layout = plan.layout
    n, dev = layout.n_rows, x.device
    loss, lse, stats = (_new((n,), plan.loss_dtype, dev), _new((n,), layout.acc, dev),
                        _new(plan.stats_shape, layout.acc, dev))
    if n == 0:
        return loss, lse, stats
    # Unused pointers are given the logits: constexpr flags compile their loads out.
    inputs = (x, *layout.x_strides, x if y is None else y, *layout.y_strides, x if t is None else t,
              *layout.t_strides, x if w is None else w)
    if not plan.per_row:
        plan.kernel[plan.grid](*inputs, loss, lse, stats, *plan.scalars, **plan.flags)
        return loss, lse, stats
    # A split row's partial statistics; without a split the kernel writes none (it is given lse).
    part = lse if plan.part_shape is None else _new(plan.part_shape, layout.acc, dev)
    aligned = plan.y_aligned and (y.data_ptr() - x.data_ptr()) % 16 == 0
    plan.kernel[plan.grid](*inputs, loss, lse, stats, part, *plan.scalars, Y_ALIGNED=aligned, **plan.flags)
    if plan.combine is not None:
        combine, scalars, flags = plan.combine
        combine[(n,)](*inputs[-4:], loss, lse, stats, part, *scalars, **flags)
    return loss, lse, stats


def backward(plan: Plan, x, y, t, w, grad, stats, denom=None):
    """(dlogits, dlabels) from the statistics ``forward`` returned, each None where the plan does not
    ask for it: class-last, contiguous (*batch, V) tensors, or in the in-place mode ``x`` itself,
    overwritten.

    ``grad`` is per row, or 0-dim (a reduced loss's: every row reads it), and is divided by the
    one-element ``denom`` first when one is given (a ``mean``'s denominator).
    """
    layout = plan.layout
    need_dx, inplace, dy_dtype = plan.gradients
    shape = (*layout.batch_shape, layout.n_cols)
    dx = (x if inplace else _new(shape, x.dtype, x.device)) if need_dx else None
    dy = _new(shape, dy_dtype, x.device) if dy_dtype is not None else None
    if layout.n_rows == 0:
        return dx, dy
    if grad.dim() == 0:
        g_strides = (0, 0)
    else:
        if grad.dim() != 1:
            grad = grad.reshape(layout.n_rows)
        g_strides = (grad.stride(0) * layout.n_inner, grad.stride(0))
    operands = (x, *layout.x_strides, x if y is None else y, *layout.y_strides, x if t is None else t,
                *layout.t_strides, x if w is None else w, grad, *g_strides, x if denom is None else denom, stats,
                x if dx is None else dx, *(plan.dx_strides if dx is not None else (0, 0)), x if dy is None else dy)
    if plan.per_row:
        base = x.data_ptr()
        plan.kernel[plan.grid](*operands, *plan.scalars, **plan.flags,
                               Y_ALIGNED=plan.y_aligned and (y.data_ptr() - base) % 16 == 0,
                               DX_ALIGNED=plan.dx_aligned and (dx.data_ptr() - base) % 16 == 0,
                               DY_ALIGNED=plan.dy_aligned and (dy.data_ptr() - base) % 16 == 0)
    else:
        plan.kernel[plan.grid](*operands, *plan.scalars, **plan.flags)
    return dx, dy
