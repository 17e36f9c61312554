"""Backward kernels.

dlogits = g * (softmax * coef - q), with coef = sum(q) + 2 z lse from the
statistics the forward saved; dlabels = g * (1 - eps) * w * (lse - x) for soft labels that require
grad. Both are computed in fp32 (fp64 for fp64 inputs) and rounded once on
store: rounding softmax - 1 to bf16 first loses the true-class gradient.
Traffic per row: read V logits (+ V labels if soft), write V dlogits
(+ V dlabels if requested). Ignored hard-label rows only write zeros. In the
in-place memory mode dlogits is written over the logits it was computed from.
"""
import triton
import triton.language as tl

from .row_math import cap_logits, dlogits_block, f64_param, grad_coef, row_target, target_mass, to_store


@triton.jit
def xent_backward_kernel(
    X, sx_outer, sx_inner,
    Y, sy_outer, sy_inner,
    T, st_outer, st_inner,
    W,
    G, sg_outer, sg_inner,
    LSE, QSUM,
    DX, sdx_outer, sdx_inner,
    DY, S, WROTE, POLICY,
    n_inner, V, n_classes, class_offset, cols_per_prog,
    ignore_index, smoothing, smoothing_lo, z_scale, z_scale_lo, softcap, softcap_lo,
    HARD: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, HAS_Z: tl.constexpr, SOFTCAP: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DY: tl.constexpr, SKIP_SCALED: tl.constexpr, BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    """Grid (n_rows, cdiv(V, cols_per_prog)). DY is contiguous (n_rows, V); DX is
    addressed like X and may be X itself (the in-place mode): each element is
    loaded before this same program stores over it.

    LSE and QSUM are the row's log-sum-exp and label mass; for a vocabulary
    shard they are the global (all-shard) values.

    SKIP_SCALED (after xent_step_kernel): if WROTE[0] != 0, DX already holds the
    gradient for an upstream gradient equal to the scalar S. Rows whose G equals
    S are then left as they are, reading and writing nothing; the others are
    recomputed, and clear the step's POLICY flag (see xent_step.py).
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
    g = tl.load(G + outer * sg_outer + inner * sg_inner).to(ACC)
    col_begin = part * cols_per_prog
    col_end = tl.minimum(col_begin + cols_per_prog, V)
    if SKIP_SCALED:
        wrote = tl.load(WROTE) != 0
        expected = g == tl.load(S).to(ACC)
        # Every program that stores here stores the same 0: the order does not matter.
        tl.store(POLICY, tl.zeros([], tl.int32), mask=wrote & (~expected))
        col_end = tl.where(wrote & expected, col_begin, col_end)
    g = tl.where(active, g, 0.0)
    lse = tl.load(LSE + row).to(ACC)
    coef = grad_coef(lse, tl.load(QSUM + row).to(ACC), z_scale, active, valid, HAS_Z)
    # Ignored rows load nothing (every lane masked) and only write zeros.
    load_end = tl.where(active, col_end, col_begin)
    for start in range(col_begin, col_end, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        cmask = cols < col_end
        xr = tl.load(X_row + cols, mask=cols < load_end, other=float("-inf")).to(ACC)
        x = xr
        th = xr
        if SOFTCAP:
            x, th = cap_logits(xr, softcap)
        if NEED_DX:
            q = target_mass(Y_row, W, cols, cmask, n_classes, t, tw, active, smoothing, HARD, HAS_WEIGHT, SMOOTH,
                            ACC, "")
            dx = dlogits_block(x, th, q, lse, coef, g, active, SOFTCAP)
            tl.store(DX + outer * sdx_outer + inner * sdx_inner + cols, to_store(dx, DX), mask=cmask)
        if NEED_DY:
            dy = g * (lse - x)
            if SMOOTH:
                dy = dy * (1.0 - smoothing)
            if HAS_WEIGHT:
                dy = dy * tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
            tl.store(DY + row * V + cols, to_store(dy, DY), mask=cmask)
