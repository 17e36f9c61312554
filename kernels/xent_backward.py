"""Backward kernels.

dlogits = g * (softmax * coef - q), with coef = sum(q) + 2 z lse from the
statistics the forward saved; dlabels = g * (1 - eps) * w * (lse - x) for soft labels that require
grad. softmax and lse - x are formed from the row max and log_s apart (row_math's docstring).
Both are computed in fp32 (fp64 for fp64 inputs) and rounded once on store: rounding
softmax - 1 to bf16 first loses the true-class gradient. Traffic per row: read V logits
(+ V labels if soft), write V dlogits (+ V dlabels if requested). Ignored hard-label rows
only write zeros. In the in-place memory mode dlogits is written over the logits it was
computed from.
"""
import triton
import triton.language as tl

from .row_math import (aligned_run, block_ranges, divided_grad, f64_param, grad_block, grad_coef, load_row,
                       row_target, same_run)


@triton.jit
def xent_backward_kernel(
    X, sx_outer, sx_inner,
    Y, sy_outer, sy_inner,
    T, st_outer, st_inner,
    W,
    G, sg_outer, sg_inner, DEN,
    STATS,
    DX, sdx_outer, sdx_inner,
    DY,
    n_inner, V, n_classes, class_offset, cols_per_prog,
    ignore_index, smoothing, smoothing_lo, z_scale, z_scale_lo, softcap, softcap_lo,
    HARD: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, HAS_Z: tl.constexpr, SOFTCAP: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DY: tl.constexpr, DIVIDE: tl.constexpr,
    Y_ALIGNED: tl.constexpr, DX_ALIGNED: tl.constexpr, DY_ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    """Grid (n_rows, cdiv(V, cols_per_prog)). DY is contiguous (n_rows, V); DX is
    addressed like X and may be X itself (the in-place mode): each element is
    loaded before this same program stores over it.

    STATS holds the row statistics the forward stored (row_math.store_row); for a vocabulary
    shard they are the global (all-shard) values.

    DIVIDE: G is divided by a mean's denominator (one element at DEN) first (row_math.divided_grad).
    G may be one element read with zero strides: a reduced loss's backward needs no per-row tensor.

    Blocks start on 16-byte boundaries of the logits row (row_math.aligned_run); *_ALIGNED say
    which other rows share that alignment (row_math.same_run).
    """
    smoothing = f64_param(smoothing, smoothing_lo, ACC)
    z_scale = f64_param(z_scale, z_scale_lo, ACC)
    softcap = f64_param(softcap, softcap_lo, ACC)
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    outer = row // n_inner
    inner = row % n_inner
    X_row = X + outer * sx_outer + inner * sx_inner
    Y_row = Y + outer * sy_outer + inner * sy_inner
    t, active, valid, tw = row_target(T, outer * st_outer + inner * st_inner, W, V, n_classes, class_offset,
                                      ignore_index, smoothing, HARD, HAS_WEIGHT, ACC)
    g = divided_grad(tl.load(G + outer * sg_outer + inner * sg_inner).to(ACC), DEN, DIVIDE, ACC)
    col_begin = part * cols_per_prog
    col_end = tl.minimum(col_begin + cols_per_prog, V)
    g = tl.where(active, g, 0.0)
    m, log_s, qsum = load_row(STATS, row, ACC)
    coef = grad_coef(m, log_s, qsum, z_scale, active, valid, HAS_Z)
    # Whole blocks as unmasked aligned vectors, then the partial ones; ignored rows load nothing
    # and only write zeros (row_math.block_ranges).
    Xb, lead = aligned_run(X_row + col_begin, BLOCK)
    Yb = same_run(Y_row + col_begin, lead, Y_ALIGNED, BLOCK)
    DXb = same_run(DX + outer * sdx_outer + inner * sdx_inner + col_begin, lead, DX_ALIGNED, BLOCK)
    DYb = same_run(DY + row * V + col_begin, lead, DY_ALIGNED, BLOCK)
    first = col_begin - lead
    n, k0, k1, e0, e1, e_step = block_ranges(col_begin, col_end, lead, active, BLOCK)
    for k in range(k0, k1, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        grad_block(Xb + offs, Yb + offs, DXb + offs, DYb + offs, W, first + offs, None, n_classes, t, tw, active,
                   smoothing, softcap, m, log_s, coef, g, HARD, HAS_WEIGHT, SMOOTH, SOFTCAP, NEED_DX, NEED_DY, ACC, "",
                   "", True)
    for k in range(e0, e1, e_step):
        offs = k + tl.arange(0, BLOCK)
        grad_block(Xb + offs, Yb + offs, DXb + offs, DYb + offs, W, first + offs, (offs >= lead) & (offs < n),
                   n_classes, t, tw, active, smoothing, softcap, m, log_s, coef, g, HARD, HAS_WEIGHT, SMOOTH, SOFTCAP,
                   NEED_DX, NEED_DY, ACC, "", "", False)
