"""Host side of the Triton kernels: buffers, grids and launches.

No host syncs and no data-dependent allocation happen here, so both passes
can be captured in CUDA graphs.
"""
import struct

import torch
import triton
import triton.language as tl

from . import launch_config
from ._alloc import new_output
from .kernels import (xent_backward_kernel, xent_combine_kernel, xent_forward_kernel, xent_rows_backward_kernel,
                      xent_rows_forward_kernel, xent_step_kernel)
from .layout import Rows

_TL = {torch.float32: tl.float32, torch.float64: tl.float64}


def _hi_lo(v: float):
    """Split a float into fp32 hi + lo (see kernels.row_math.f64_param)."""
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


def _target_args(rows: Rows):
    """Class-index pointer and its (outer, inner) strides; rows.target is 1-D but may be strided."""
    if rows.target is None:
        return rows.logits, 0, 0
    s = rows.target.stride(0)
    return rows.target, s * rows.n_inner, s


def _operands(rows: Rows):
    """(labels, target, target outer/inner strides, weight) pointers for a launch."""
    # Unused pointers are given the logits: constexpr flags compile their loads out.
    y = rows.labels if rows.labels is not None else rows.logits
    w = rows.weight if rows.weight is not None else rows.logits
    return (y, *_target_args(rows), w)


def _row_outputs(rows: Rows, loss_dtype: torch.dtype):
    """Per-row loss, lse and label mass buffers."""
    dev = rows.logits.device
    return (new_output((rows.n_rows,), loss_dtype, dev), new_output((rows.n_rows,), rows.acc, dev),
            new_output((rows.n_rows,), rows.acc, dev))


def forward(rows: Rows, ignore_index: int, smoothing: float, z_scale: float, softcap: float,
            loss_dtype: torch.dtype):
    """Per-row loss, lse and label mass sum(q)."""
    dev = rows.logits.device
    n, V = rows.n_rows, rows.n_cols
    loss, lse, qsum = _row_outputs(rows, loss_dtype)
    if n == 0:
        return loss, lse, qsum
    flags = _flags(rows, smoothing, softcap)
    y, t, st_outer, st_inner, w = _operands(rows)
    short = launch_config.rows_launch(n, V, dev)
    if short is not None:
        xent_rows_forward_kernel[(triton.cdiv(n, short.rows),)](
            rows.logits, *rows.x_strides, y, *rows.y_strides, t, st_outer, st_inner, w, loss, lse, qsum,
            n, rows.n_inner, V, rows.n_classes, rows.class_offset,
            ignore_index, *_hi_lo(smoothing), *_hi_lo(z_scale), *_hi_lo(softcap), HAS_Z=z_scale != 0.0,
            ROWS=short.rows, BLOCK=short.block, num_warps=short.num_warps, **flags,
        )
        return loss, lse, qsum
    cfg = launch_config.forward_launch(n, V, rows.logits.element_size(), dev)
    part = new_output((5, n, cfg.split), rows.acc, dev) if cfg.split > 1 else lse
    xent_forward_kernel[(n, cfg.split)](
        rows.logits, *rows.x_strides, y, *rows.y_strides, t, st_outer, st_inner, w,
        loss, lse, qsum, part,
        n, rows.n_inner, V, rows.n_classes, rows.class_offset, cfg.cols_per_prog,
        ignore_index, *_hi_lo(smoothing), *_hi_lo(z_scale), *_hi_lo(softcap),
        HAS_Z=z_scale != 0.0, SPLIT=cfg.split,
        BLOCK=cfg.block, num_warps=cfg.num_warps, **flags,
    )
    if cfg.split > 1:
        xent_combine_kernel[(n,)](
            t, st_outer, st_inner, w, loss, lse, qsum, part,
            n, rows.n_inner, V, rows.n_classes, rows.class_offset, ignore_index, *_hi_lo(smoothing), *_hi_lo(z_scale),
            HARD=flags["HARD"], HAS_WEIGHT=flags["HAS_WEIGHT"], HAS_Z=z_scale != 0.0,
            SPLIT=cfg.split, SPLIT_P2=triton.next_power_of_2(cfg.split), ACC=flags["ACC"], num_warps=1,
        )
    return loss, lse, qsum


_STEP_POLICY = {}


def step_policy(device: torch.device) -> torch.Tensor:
    """The fused step's flag on ``device`` (kernels/xent_step.py): 1 while its forward writes dlogits,
    0 once a backward got an upstream gradient other than the expected one."""
    key = (device.type, device.index)
    if key not in _STEP_POLICY:
        flag = torch.ones(1, dtype=torch.int32, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # Allocated in a CUDA graph's pool, its fill part of the graph: that graph's copy, refilled
            # with 1 at each replay. The device's own flag is made at the first call outside a capture.
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

    ``scale`` is a one-element tensor (no host sync reads it). Returns per-row loss, lse and
    label mass, and a one-element int32 tensor: whether dx_buf was written.
    """
    n, V = rows.n_rows, rows.n_cols
    loss, lse, qsum = _row_outputs(rows, loss_dtype)
    wrote = new_output((1,), torch.int32, rows.logits.device)
    # One snapshot of the flag for the whole launch (and for this call's backward).
    wrote.copy_(step_policy(rows.logits.device))
    if n == 0:
        return loss, lse, qsum, wrote
    cfg = launch_config.step_launch(V, rows.logits.element_size(), rows.logits.device, rows.target is not None)
    y, t, st_outer, st_inner, w = _operands(rows)
    xent_step_kernel[(min(n, cfg.programs),)](
        rows.logits, *rows.x_strides, y, *rows.y_strides, t, st_outer, st_inner, w, scale, wrote,
        loss, lse, qsum, dx_buf,
        n, rows.n_inner, V, rows.n_classes, rows.class_offset,
        ignore_index, *_hi_lo(smoothing), *_hi_lo(z_scale), *_hi_lo(softcap),
        HAS_Z=z_scale != 0.0, BLOCK=cfg.block, num_warps=cfg.num_warps, **_flags(rows, smoothing, softcap),
    )
    return loss, lse, qsum, wrote


def backward(rows: Rows, grad: torch.Tensor, lse, qsum, ignore_index: int, smoothing: float, z_scale: float,
             softcap: float, dx_buf, dy_buf, skip_scale=None, written=None):
    """Write dlogits into ``dx_buf`` and dlabels into ``dy_buf`` (or skip either when None).

    ``dx_buf`` is a contiguous (*batch, V) buffer or, in the in-place mode, the
    class-last logits view itself; ``dy_buf`` is contiguous. After a fused step,
    ``skip_scale`` is the one-element scale it assumed and ``written`` whether it
    wrote ``dx_buf``: if it did, rows whose gradient equals the scale are left as
    they are.
    """
    n, V = rows.n_rows, rows.n_cols
    if n == 0:
        return
    g = grad.reshape(n)
    y, t, st_outer, st_inner, w = _operands(rows)
    dx_strides = _row_strides(dx_buf, rows) if dx_buf is not None else (0, 0)
    # After a fused step (skip_scale) the per-row kernel runs: it skips whole rows.
    short = launch_config.rows_launch(n, V, rows.logits.device) if skip_scale is None else None
    if short is not None:
        xent_rows_backward_kernel[(triton.cdiv(n, short.rows),)](
            rows.logits, *rows.x_strides, y, *rows.y_strides, t, st_outer, st_inner, w,
            g, g.stride(0) * rows.n_inner, g.stride(0), lse, qsum,
            dx_buf if dx_buf is not None else rows.logits, *dx_strides,
            dy_buf if dy_buf is not None else rows.logits,
            n, rows.n_inner, V, rows.n_classes, rows.class_offset, ignore_index,
            *_hi_lo(smoothing), *_hi_lo(z_scale), *_hi_lo(softcap), HAS_Z=z_scale != 0.0,
            NEED_DX=dx_buf is not None, NEED_DY=dy_buf is not None,
            ROWS=short.rows, BLOCK=short.block, num_warps=short.num_warps, **_flags(rows, smoothing, softcap),
        )
        return
    cfg = launch_config.backward_launch(n, V, rows.logits.element_size(), rows.logits.device)
    xent_backward_kernel[(n, cfg.split)](
        rows.logits, *rows.x_strides, y, *rows.y_strides, t, st_outer, st_inner, w,
        g, g.stride(0) * rows.n_inner, g.stride(0), lse, qsum,
        dx_buf if dx_buf is not None else rows.logits, *dx_strides,
        dy_buf if dy_buf is not None else rows.logits, skip_scale if skip_scale is not None else lse,
        written if written is not None else lse, step_policy(rows.logits.device) if skip_scale is not None else lse,
        rows.n_inner, V, rows.n_classes, rows.class_offset, cfg.cols_per_prog, ignore_index,
        *_hi_lo(smoothing), *_hi_lo(z_scale), *_hi_lo(softcap), HAS_Z=z_scale != 0.0,
        NEED_DX=dx_buf is not None, NEED_DY=dy_buf is not None, SKIP_SCALED=skip_scale is not None,
        BLOCK=cfg.block, num_warps=cfg.num_warps, **_flags(rows, smoothing, softcap),
    )


def _row_strides(buf: torch.Tensor, rows: Rows):
    """(outer, inner) strides of a gradient buffer: the logits' own for the in-place mode."""
    if buf is rows.logits:
        return rows.x_strides
    return rows.n_inner * rows.n_cols, rows.n_cols
