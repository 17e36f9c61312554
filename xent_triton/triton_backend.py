"""Host side of the Triton kernels: buffers, grids and launches.

No host syncs and no data-dependent allocation happen here, so both passes
can be captured in CUDA graphs.
"""
import struct
from dataclasses import dataclass
from typing import Optional

import torch
import triton.language as tl

from . import kernels, launch_config
from ._alloc import new_output
from .launcher import Launcher
from .layout import Rows, stats_shape

# Launched through Launcher: Triton binds each kernel's ~25-50 arguments once per specialization,
# not on every call (xent_triton/launcher.py).
xent_forward_kernel = Launcher(kernels.xent_forward_kernel)
xent_combine_kernel = Launcher(kernels.xent_combine_kernel)
xent_backward_kernel = Launcher(kernels.xent_backward_kernel)
xent_step_kernel = Launcher(kernels.xent_step_kernel)
xent_rows_forward_kernel = Launcher(kernels.xent_rows_forward_kernel)
xent_rows_backward_kernel = Launcher(kernels.xent_rows_backward_kernel)

_TL = {torch.float32: tl.float32, torch.float64: tl.float64}


def _hi_lo(v: float):
    """Split a float into fp32 hi + lo (see kernels.row_math.f64_param)."""
    if v == 0.0:
        return 0.0, 0.0  # the common case (an option turned off), without the packing's host time
    hi = struct.unpack("f", struct.pack("f", v))[0]
    return hi, v - hi


def _flags(rows: Rows, smoothing: float, softcap: float):
    return dict(
        HARD=rows.target is not None,
        HAS_WEIGHT=rows.weight is not None,
        SMOOTH=smoothing != 0.0,
        SOFTCAP=softcap != 0.0,
        ACC=_TL[rows.acc],
    )


def _aligned_like(rows: Rows, t, strides) -> bool:
    """Whether every row of ``t`` (addressed with (outer, inner) ``strides``) sits at the same offset
    from a 16-byte boundary as the same row of the logits, so that the kernels may give it the
    logits' block alignment (kernels/row_math.same_run): equal element sizes, base addresses a
    multiple of 16 bytes apart, and strides that differ by a multiple of 16 bytes where they matter."""
    x = rows.logits
    item = x.element_size()
    if t is None or t.element_size() != item or 16 % item:
        return False
    per = 16 // item
    used = [rows.n_rows > rows.n_inner, rows.n_inner > 1]  # the outer / inner index is ever nonzero
    return (t.data_ptr() - x.data_ptr()) % 16 == 0 and all(
        (a - b) % per == 0 for a, b, u in zip(strides, rows.x_strides, used) if u)


def _contiguous_strides(rows: Rows):
    """(outer, inner) strides of a contiguous (*batch, V) buffer."""
    return rows.n_inner * rows.n_cols, rows.n_cols


def _target_args(rows: Rows):
    """Class-index pointer and its (outer, inner) strides; rows.target is 1-D but may be strided."""
    if rows.target is None:
        return rows.logits, 0, 0
    s = rows.target.stride(0)
    return rows.target, s * rows.n_inner, s


def _inputs(rows: Rows):
    """The leading arguments of every kernel but the combine: logits, labels, class indices and weight
    pointers, each with its (outer, inner) strides."""
    # Unused pointers are given the logits: constexpr flags compile their loads out.
    y = rows.labels if rows.labels is not None else rows.logits
    w = rows.weight if rows.weight is not None else rows.logits
    return (rows.logits, *rows.x_strides, y, *rows.y_strides, *_target_args(rows), w)


def _row_geometry(rows: Rows):
    """n_rows, n_inner, V, n_classes, class_offset: how every kernel addresses rows and classes."""
    return rows.n_rows, rows.n_inner, rows.n_cols, rows.n_classes, rows.class_offset


def _options(ignore_index: int, smoothing: float, z_scale: float, softcap: float):
    """ignore_index and the three float options as fp32 hi + lo pairs (kernels.row_math.f64_param)."""
    return (ignore_index, *_hi_lo(smoothing), *_hi_lo(z_scale), *_hi_lo(softcap))


def _row_outputs(rows: Rows, loss_dtype: torch.dtype):
    """Per-row loss and lse buffers, and the (rows, 3) statistics (layout.stats_shape)."""
    dev = rows.logits.device
    return (new_output((rows.n_rows,), loss_dtype, dev), new_output((rows.n_rows,), rows.acc, dev),
            new_output(stats_shape(rows.n_rows), rows.acc, dev))


@dataclass(frozen=True)
class ForwardPlan:
    """The launches of a forward, as far as the row view's metadata and the options decide them (not its
    tensors' addresses): worked out once per call signature by call_plans, or per call."""
    loss_dtype: torch.dtype
    options: tuple  # ignore_index and the float options (_options)
    rows_tile: Optional[launch_config.RowsLaunch]  # the short-row kernel's tiles, or None
    launch: Optional[launch_config.Launch]  # the row kernel's launch, or None
    flags: dict  # constexpr flags of every kernel


def forward_plan(rows: Rows, ignore_index: int, smoothing: float, z_scale: float, softcap: float,
                 loss_dtype: torch.dtype) -> ForwardPlan:
    n, V, dev = rows.n_rows, rows.n_cols, rows.logits.device
    short = launch_config.rows_launch(n, V, dev, hard_forward=rows.target is not None) if n else None
    cfg = launch_config.forward_launch(n, V, rows.logits.element_size(), dev) if n and short is None else None
    return ForwardPlan(loss_dtype, _options(ignore_index, smoothing, z_scale, softcap), short, cfg,
                       dict(_flags(rows, smoothing, softcap), HAS_Z=z_scale != 0.0))


def forward(rows: Rows, ignore_index: int, smoothing: float, z_scale: float, softcap: float,
            loss_dtype: torch.dtype):
    """Per-row loss and lse, and the (rows, 3) statistics the backward reads (layout.stats_shape)."""
    return run_forward(forward_plan(rows, ignore_index, smoothing, z_scale, softcap, loss_dtype), rows)


def run_forward(plan: ForwardPlan, rows: Rows):
    """``forward`` with its launches planned (``forward_plan`` of this row view's metadata)."""
    loss, lse, stats = _row_outputs(rows, plan.loss_dtype)
    n = rows.n_rows
    if n == 0:
        return loss, lse, stats
    inputs, options, flags, short = _inputs(rows), plan.options, plan.flags, plan.rows_tile
    outputs = (loss, lse, stats)
    if short is not None:
        xent_rows_forward_kernel[(launch_config.cdiv(n, short.rows),)](
            *inputs, *outputs, *_row_geometry(rows), *options,
            ROWS=short.rows, BLOCK=short.block, num_warps=short.num_warps, **flags,
        )
        return loss, lse, stats
    cfg = plan.launch
    part = new_output((5, n, cfg.split), rows.acc, rows.logits.device) if cfg.split > 1 else lse
    xent_forward_kernel[(n, cfg.split)](
        *inputs, *outputs, part, *_row_geometry(rows), cfg.cols_per_prog, *options,
        SPLIT=cfg.split, Y_ALIGNED=_aligned_like(rows, rows.labels, rows.y_strides), BLOCK=cfg.block,
        EPT=launch_config.slice_width(cfg.block, cfg.num_warps, rows.logits.element_size()), STAGES=cfg.stages,
        num_warps=cfg.num_warps, **flags,
    )
    if cfg.split > 1:
        xent_combine_kernel[(n,)](
            *inputs[-4:], *outputs, part, *_row_geometry(rows), *options[:5],  # target, weight; no softcap
            HARD=flags["HARD"], HAS_WEIGHT=flags["HAS_WEIGHT"], HAS_Z=flags["HAS_Z"],
            SPLIT=cfg.split, SPLIT_P2=launch_config.next_pow2(cfg.split), ACC=flags["ACC"], num_warps=1,
        )
    return loss, lse, stats


_STEP_POLICY = {}


def step_policy(device: torch.device) -> torch.Tensor:
    """The fused step's flag on ``device`` (kernels/xent_step.py): 1 while its forward writes dlogits,
    0 once a backward got an upstream gradient other than the expected one."""
    key = (device.type, device.index)
    if key not in _STEP_POLICY:
        flag = torch.ones(1, dtype=torch.int32, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # A temporary flag in the graph's pool, its fill part of the graph, so each replay starts at 1
            # (a backward in the same capture gets another one; correctness rests on the `written`
            # snapshot and the g == scale check). The device's own flag waits for an uncaptured call.
            return flag
        _STEP_POLICY[key] = flag
    return _STEP_POLICY[key]


def reset_step_policy():
    """Let the fused step's forward write dlogits again, on every device."""
    for flag in _STEP_POLICY.values():
        flag.fill_(1)


def step(rows: Rows, ignore_index: int, smoothing: float, z_scale: float, softcap: float,
         loss_dtype: torch.dtype, scale: torch.Tensor, dx_buf: torch.Tensor):
    """The forward that also writes ``dx_buf = scale * dloss/dlogits`` (a contiguous (*batch, V) buffer),
    while the device's step_policy flag allows it.

    ``scale`` is a one-element tensor (no host sync reads it). Returns per-row loss and lse, the
    statistics (as ``forward``), and a one-element int32 tensor: whether dx_buf was written.
    """
    n, V = rows.n_rows, rows.n_cols
    loss, lse, stats = _row_outputs(rows, loss_dtype)
    # One snapshot of the flag for the whole launch (and for this call's backward).
    wrote = step_policy(rows.logits.device).clone()
    if n == 0:
        return loss, lse, stats, wrote
    cfg = launch_config.step_launch(V, rows.logits.element_size(), rows.logits.device, rows.target is not None)
    xent_step_kernel[(min(n, cfg.programs),)](
        *_inputs(rows), scale, wrote, loss, lse, stats, dx_buf, *_row_geometry(rows),
        *_options(ignore_index, smoothing, z_scale, softcap),
        HAS_Z=z_scale != 0.0, Y_ALIGNED=_aligned_like(rows, rows.labels, rows.y_strides),
        DX_ALIGNED=_aligned_like(rows, dx_buf, _contiguous_strides(rows)), BLOCK=cfg.block,
        EPT=launch_config.slice_width(cfg.block, cfg.num_warps, rows.logits.element_size()), STAGES=cfg.stages,
        num_warps=cfg.num_warps, **_flags(rows, smoothing, softcap),
    )
    return loss, lse, stats, wrote


@dataclass(frozen=True)
class BackwardPlan:
    """The launches of a backward, as far as metadata decides them (see ForwardPlan)."""
    options: tuple
    rows_tile: Optional[launch_config.RowsLaunch]
    launch: Optional[launch_config.Launch]
    flags: dict


def backward_plan(rows: Rows, ignore_index: int, smoothing: float, z_scale: float, softcap: float, need_dx: bool,
                  need_dy: bool, divide: bool = False, skip_scaled: bool = False) -> BackwardPlan:
    """``need_dx``/``need_dy``: whether a dlogits/dlabels buffer is given; ``divide``: whether a
    denominator is; ``skip_scaled``: whether it finishes a fused step (a skip_scale is given)."""
    n, V, dev = rows.n_rows, rows.n_cols, rows.logits.device
    flags = dict(_flags(rows, smoothing, softcap), HAS_Z=z_scale != 0.0, NEED_DX=need_dx, NEED_DY=need_dy,
                 DIVIDE=divide)
    # After a fused step the per-row kernel runs: it skips whole rows.
    short = launch_config.rows_launch(n, V, dev) if n and not skip_scaled else None
    cfg = launch_config.backward_launch(n, V, rows.logits.element_size(), dev) if n and short is None else None
    return BackwardPlan(_options(ignore_index, smoothing, z_scale, softcap), short, cfg, flags)


def backward(rows: Rows, grad: torch.Tensor, stats, ignore_index: int, smoothing: float, z_scale: float,
             softcap: float, dx_buf, dy_buf, skip_scale=None, written=None, denom=None):
    """Write dlogits into ``dx_buf`` and dlabels into ``dy_buf`` (or skip either when None), from the
    statistics ``forward`` returned (a contiguous (rows, 3) tensor).

    ``dx_buf`` is a contiguous (*batch, V) buffer or, in the in-place mode, the
    class-last logits view itself; ``dy_buf`` is contiguous. After a fused step,
    ``skip_scale`` is the one-element scale it assumed and ``written`` whether it
    wrote ``dx_buf``: if it did, rows whose gradient equals the scale are left as
    they are. ``denom``: a one-element tensor the upstream gradient is divided by first (a ``mean``'s
    denominator). ``grad`` may be 0-dim (a reduced loss's): every row reads it.
    """
    plan = backward_plan(rows, ignore_index, smoothing, z_scale, softcap, dx_buf is not None, dy_buf is not None,
                         denom is not None, skip_scale is not None)
    run_backward(plan, rows, grad, stats, dx_buf, dy_buf, skip_scale, written, denom)


def run_backward(plan: BackwardPlan, rows: Rows, grad: torch.Tensor, stats, dx_buf, dy_buf, skip_scale=None,
                 written=None, denom=None):
    """``backward`` with its launches planned (``backward_plan`` of the same metadata and buffers)."""
    n = rows.n_rows
    if n == 0:
        return
    if grad.dim() == 0:
        g, sg = grad, 0  # a reduced loss's gradient, read for every row
    else:
        g = grad if grad.dim() == 1 else grad.reshape(n)
        sg = g.stride(0)
    # Inputs, upstream gradient and statistics, then the outputs (unused ones get the logits' pointer).
    operands = (*_inputs(rows), g, sg * rows.n_inner, sg, denom if denom is not None else rows.logits, stats,
                dx_buf if dx_buf is not None else rows.logits,
                *(_row_strides(dx_buf, rows) if dx_buf is not None else (0, 0)),
                dy_buf if dy_buf is not None else rows.logits)
    options, flags, short = plan.options, plan.flags, plan.rows_tile
    if short is not None:
        xent_rows_backward_kernel[(launch_config.cdiv(n, short.rows),)](
            *operands, *_row_geometry(rows), *options,
            ROWS=short.rows, BLOCK=short.block, num_warps=short.num_warps, **flags,
        )
        return
    cfg = plan.launch
    fused = (skip_scale, written, step_policy(rows.logits.device)) if skip_scale is not None else (stats,) * 3
    xent_backward_kernel[(n, cfg.split)](
        *operands, *fused, *_row_geometry(rows)[1:], cfg.cols_per_prog, *options,
        SKIP_SCALED=skip_scale is not None, Y_ALIGNED=_aligned_like(rows, rows.labels, rows.y_strides),
        DX_ALIGNED=dx_buf is not None and _aligned_like(rows, dx_buf, _row_strides(dx_buf, rows)),
        DY_ALIGNED=_aligned_like(rows, dy_buf, _contiguous_strides(rows)),
        BLOCK=cfg.block, num_warps=cfg.num_warps, **flags,
    )


def _row_strides(buf: torch.Tensor, rows: Rows):
    """(outer, inner) strides of a gradient buffer: the logits' own for the in-place mode."""
    if buf is rows.logits:
        return rows.x_strides
    return _contiguous_strides(rows)
