"""Kernels for short rows: ROWS whole rows per program, loaded as one [ROWS, BLOCK] tile (BLOCK >= V).

With one program per row, a row of 128 classes gives a program 256 bytes (bf16) to move, and
scheduling N programs costs more than moving the data: the anchors measured every one-row-per-program
kernel below torch eager at 131072 x 128 and 32768 x 1024. Here every program moves ROWS x V elements
(a few KB) in one load per thread, and N / ROWS programs are launched. The math and row rules are those
of the per-row kernels (row_math.py); the single tile needs no online rescaling.

Tail rows past n_rows count as ignored rows: their per-row scalars (class index, upstream gradient,
statistics) are read at the last row's index, clamped, and their tile loads and all their stores are masked.
"""
import triton
import triton.language as tl

from .row_math import (divided_grad, f64_param, finalize_row, grad_block, grad_coef, load_logits, load_row,
                       row_target, store_row, target_mass, tie_to_logits)


@triton.jit
def _tile_rows(T, st_outer, st_inner, W, V, n_rows, n_inner, n_classes, class_offset, ignore_index, smoothing,
               HARD: tl.constexpr, HAS_WEIGHT: tl.constexpr, ROWS: tl.constexpr, ACC: tl.constexpr):
    """Rows of this program: (row, row_ok, outer, inner) and the row_target results as [ROWS] vectors."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = r < n_rows
    row = tl.minimum(r, n_rows - 1).to(tl.int64)
    outer = row // n_inner
    inner = row % n_inner
    t, active, valid, tw = row_target(T, outer * st_outer + inner * st_inner, W, V, n_classes, class_offset,
                                      ignore_index, smoothing, HARD, HAS_WEIGHT, ACC)
    # Soft labels give scalars here; make every row quantity a [ROWS] vector. (tl.where, not | or &:
    # the interpreter turns a scalar bool combined with a vector into integers, which masks reject.)
    zero = tl.zeros([ROWS], tl.int64)
    t = t + zero
    tw = tw + zero.to(ACC)
    active = tl.where(active, row_ok, zero != 0)  # rows past n_rows count as ignored
    valid = tl.where(valid, zero == 0, zero != 0)
    return row, row_ok, outer, inner, t, active, valid, tw


@triton.jit
def xent_rows_forward_kernel(
    X, sx_outer, sx_inner,
    Y, sy_outer, sy_inner,
    T, st_outer, st_inner,
    W,
    LOSS, LSE, STATS,
    n_rows, n_inner, V, n_classes, class_offset,
    ignore_index, smoothing, smoothing_lo, z_scale, z_scale_lo, softcap, softcap_lo,
    HARD: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, HAS_Z: tl.constexpr,
    SOFTCAP: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """Loss, lse and statistics of ROWS rows per program (grid cdiv(n_rows, ROWS)); see xent_forward_kernel."""
    smoothing = f64_param(smoothing, smoothing_lo, ACC)
    z_scale = f64_param(z_scale, z_scale_lo, ACC)
    softcap = f64_param(softcap, softcap_lo, ACC)
    row, row_ok, outer, inner, t, active, valid, tw = _tile_rows(
        T, st_outer, st_inner, W, V, n_rows, n_inner, n_classes, class_offset, ignore_index, smoothing,
        HARD, HAS_WEIGHT, ROWS, ACC)
    cols = tl.arange(0, BLOCK)[None, :]
    # Ignored rows read nothing: all their lanes are masked. (Loading them anyway, so that the logits'
    # load need not wait for the class indices', changed nothing on an H100: perf/NOTES.md P11.)
    cmask = (cols < V) & active[:, None]
    x = load_logits(X + (outer * sx_outer + inner * sx_inner)[:, None] + cols, cmask, softcap, SOFTCAP, ACC, "",
                    False)
    # The max with -inf replaced by 0, so that exp(x - m) never computes -inf - (-inf).
    m = tl.max(x, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)
    x_rel = x - m[:, None]
    s = tl.sum(tl.exp(x_rel), axis=1)
    if HARD and not SMOOTH:
        # q is tw in the target column and 0 elsewhere. Built and summed as a tile, it depended on no
        # load of the tile, and Triton (3.6 and 3.9) gave it a layout of its own: q computed twice, its
        # sums reduced across all 16 warps through shared memory (sm_90 code, Triton 3.9: 93 warp
        # shuffles against the soft kernel's 35; perf/NOTES.md P21). The target's logit is picked out of the loaded tile
        # instead, a reduction in the logits' own layout.
        mine = active & (tw != 0)
        x_t = tl.sum(tl.where(cols == tl.where(mine, t, -1).to(tl.int32)[:, None], x_rel, 0.0), axis=1)
        d = tl.where(mine, tw * x_t, 0.0)
        nnz = tl.where(mine, 1.0, 0.0)
        qsum = tl.where(mine, tw, 0.0)
    else:
        q = target_mass(Y + (outer * sy_outer + inner * sy_inner)[:, None] + cols, W, cols, cmask, n_classes,
                        t[:, None], tw[:, None], active[:, None], smoothing, HARD, HAS_WEIGHT, SMOOTH, ACC, "",
                        False)
        if HARD:
            q = tie_to_logits(q, x)
        # A zero label never multiplies its logit, so 0 * -inf cannot make a NaN.
        d = tl.sum(tl.where(q != 0, q * x_rel, 0.0), axis=1)
        nnz = tl.sum(tl.where(q != 0, 1.0, 0.0), axis=1)
        qsum = tl.sum(q, axis=1)
    loss, lse, m, log_s, qsum = finalize_row(m, s, d, qsum, nnz, active, valid, z_scale, HAS_Z)
    store_row(LOSS, LSE, STATS, row, loss, lse, m, log_s, qsum, row_ok)


@triton.jit
def xent_rows_backward_kernel(
    X, sx_outer, sx_inner,
    Y, sy_outer, sy_inner,
    T, st_outer, st_inner,
    W,
    G, sg_outer, sg_inner, DEN,
    STATS,
    DX, sdx_outer, sdx_inner,
    DY,
    n_rows, n_inner, V, n_classes, class_offset,
    ignore_index, smoothing, smoothing_lo, z_scale, z_scale_lo, softcap, softcap_lo,
    HARD: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, HAS_Z: tl.constexpr, SOFTCAP: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DY: tl.constexpr, DIVIDE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    """dlogits and dlabels of ROWS rows per program; see xent_backward_kernel (DX may be X itself:
    the whole tile is loaded before any of it is stored)."""
    smoothing = f64_param(smoothing, smoothing_lo, ACC)
    z_scale = f64_param(z_scale, z_scale_lo, ACC)
    softcap = f64_param(softcap, softcap_lo, ACC)
    row, row_ok, outer, inner, t, active, valid, tw = _tile_rows(
        T, st_outer, st_inner, W, V, n_rows, n_inner, n_classes, class_offset, ignore_index, smoothing,
        HARD, HAS_WEIGHT, ROWS, ACC)
    g = divided_grad(tl.load(G + outer * sg_outer + inner * sg_inner).to(ACC), DEN, DIVIDE, ACC)
    g = tl.where(active, g, 0.0)
    m, log_s, qsum = load_row(STATS, row, ACC)
    coef = grad_coef(m, log_s, qsum, z_scale, active, valid, HAS_Z)
    cols = tl.arange(0, BLOCK)[None, :]
    smask = (cols < V) & row_ok[:, None]
    # Ignored rows load nothing and only write zeros.
    grad_block(X + (outer * sx_outer + inner * sx_inner)[:, None] + cols,
               Y + (outer * sy_outer + inner * sy_inner)[:, None] + cols,
               DX + (outer * sdx_outer + inner * sdx_inner)[:, None] + cols, DY + row[:, None] * V + cols,
               W, cols, smask, n_classes, t[:, None], tw[:, None], active[:, None], smoothing, softcap,
               m[:, None], log_s[:, None], coef[:, None], g[:, None], HARD, HAS_WEIGHT, SMOOTH, SOFTCAP, NEED_DX,
               NEED_DY, ACC, "", "", False)
