"""The forward loop as it was before perf/NOTES.md P16 (kernels/xent_forward.py at 8ef397d), for
perf/loop_ab.py only: row statistics updated once per block by block-wide tl.max / tl.sum (warp shuffles,
shared memory, barriers inside the loop), against the per-slice loop that replaced it. Timing both in
one run on one card is the only fair comparison; delete this file once P16 is measured.

Only the SPLIT == 1 path is exercised (perf/loop_ab.py launches whole rows).
"""
import triton
import triton.language as tl

from xent_triton.kernels.row_math import (aligned_run, block_ranges, f64_param, finalize_row, load_logits,
                                          row_target, same_run, store_row, target_mass)


@triton.jit
def _online_max_sumexp(m, s, x):
    """One block of the online softmax: (new max, new sum of exp, shift = old max - new max).

    s == 0 means no finite logit yet (the max itself adds exp(0) = 1). Until then
    m stays 0, so exp(x - m) never computes -inf - (-inf).
    """
    bmax = tl.max(x, axis=0)
    m_new = tl.where(s == 0, bmax, tl.maximum(m, bmax))
    m_new = tl.where(m_new == float("-inf"), m, m_new)
    # Nothing accumulated yet (s == 0): no rescale. exp(m - m_new) could be
    # inf for a very negative first max, and 0 * inf is NaN.
    shift = tl.where(s == 0, 0.0, m - m_new)
    s = s * tl.exp(shift) + tl.sum(tl.exp(x - m_new), axis=0)
    return m_new, s, shift


@triton.jit
def _stats_block(m, s, d, qsum, nnz, x_ptrs, y_ptrs, W, cols, cmask, n_classes, t, tw, active, smoothing,
                 softcap, HARD: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr,
                 LABELS: tl.constexpr, ACC: tl.constexpr, EVICT: tl.constexpr, FULL: tl.constexpr):
    """One block of _row_partial: the online max and sum of exp, and with LABELS the label statistics
    (d, qsum, nnz are per-lane accumulators). FULL: every lane is inside the row, cmask is not used."""
    x = load_logits(x_ptrs, cmask, softcap, SOFTCAP, ACC, EVICT, FULL)
    if LABELS:
        q = target_mass(y_ptrs, W, cols, cmask, n_classes, t, tw, active, smoothing, HARD, HAS_WEIGHT, SMOOTH,
                        ACC, EVICT, FULL)
        m_new, s, shift = _online_max_sumexp(m, s, x)
        # d is 0 or -inf (label mass on -inf logits) while s == 0, which the zero shift leaves as it is.
        # A zero label never multiplies its logit, so 0 * -inf cannot make a NaN.
        d = tl.where(qsum != 0, d + qsum * shift, d) + tl.where(q != 0, q * (x - m_new), 0.0)
        qsum += q
        nnz += tl.where(q != 0, 1.0, 0.0)
        m = m_new
    else:
        m, s, _ = _online_max_sumexp(m, s, x)
    return m, s, d, qsum, nnz


@triton.jit
def _row_partial(X_row, Y_row, W, col_begin, col_end, n_classes, t, tw, active, smoothing, softcap,
                 HARD: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
                 SOFTCAP: tl.constexpr, Y_ALIGNED: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
                 EVICT: tl.constexpr):
    """Online statistics over columns [col_begin, col_end); EVICT is the L2 hint of the loads.

    Returns m (the running max, -inf replaced by 0), s = sum(exp(x - m)),
    d = sum(q * (x - m)), sum(q) and the count of nonzero q. Keeping the
    label-weighted sum relative to the max matters: lse * sum(q) - sum(q * x) cancels
    catastrophically in fp32 once |x| is large (1e4 loses 3 digits, 1e30 all).

    The blocks wholly inside the row come first, as unmasked aligned vector loads, then the
    partial ones (row_math.block_ranges). Y_ALIGNED: see row_math.same_run.
    """
    # Class indices without smoothing: q is nonzero in the target column only, so the loop keeps no
    # label state at all (fewer registers and instructions); the target logit is read once after it.
    LABELS: tl.constexpr = not (HARD and not SMOOTH)
    m = tl.zeros([], ACC)
    s = tl.zeros([], ACC)
    d = tl.zeros([BLOCK], ACC)
    qsum = tl.zeros([BLOCK], ACC)
    nnz = tl.zeros([BLOCK], ACC)
    Xb, lead = aligned_run(X_row + col_begin, BLOCK)
    Yb = same_run(Y_row + col_begin, lead, Y_ALIGNED, BLOCK)
    first = col_begin - lead  # the column of lane 0 of the frame
    n, k0, k1, e0, e1, e_step = block_ranges(col_begin, col_end, lead, True, BLOCK)
    for k in range(k0, k1, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        m, s, d, qsum, nnz = _stats_block(m, s, d, qsum, nnz, Xb + offs, Yb + offs, W, first + offs, None,
                                          n_classes, t, tw, active, smoothing, softcap, HARD, HAS_WEIGHT, SMOOTH,
                                          SOFTCAP, LABELS, ACC, EVICT, True)
    for k in range(e0, e1, e_step):
        offs = k + tl.arange(0, BLOCK)
        m, s, d, qsum, nnz = _stats_block(m, s, d, qsum, nnz, Xb + offs, Yb + offs, W, first + offs,
                                          (offs >= lead) & (offs < n), n_classes, t, tw, active, smoothing,
                                          softcap, HARD, HAS_WEIGHT, SMOOTH, SOFTCAP, LABELS, ACC, EVICT, False)
    if LABELS:
        d_row = tl.sum(d, axis=0)
        qsum_row = tl.sum(qsum, axis=0)
        nnz_row = tl.sum(nnz, axis=0)
    else:
        mine = (t >= col_begin) & (t < col_end) & (tw != 0)
        x_t = load_logits(X_row + tl.where(mine, t, 0), mine, softcap, SOFTCAP, ACC, EVICT, False)
        d_row = tl.where(mine, tw * (x_t - m), 0.0)
        qsum_row = tl.where(mine, tw, 0.0)
        nnz_row = tl.where(mine, 1.0, 0.0)
    return m, s, d_row, qsum_row, nnz_row


@triton.jit
def block_state_forward_kernel(
    X, sx_outer, sx_inner,
    Y, sy_outer, sy_inner,
    T, st_outer, st_inner,
    W,
    LOSS, LSE, STATS,
    PART,
    n_rows, n_inner, V, n_classes, class_offset, cols_per_split,
    ignore_index, smoothing, smoothing_lo, z_scale, z_scale_lo, softcap, softcap_lo,
    HARD: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, HAS_Z: tl.constexpr,
    SOFTCAP: tl.constexpr, SPLIT: tl.constexpr, Y_ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """Row statistics of softmax cross entropy.

    Grid (n_rows, SPLIT). Rows are addressed as (row // n_inner, row % n_inner)
    with two strides, so views like ``logits[:, :-1]`` are read in place. All
    row offsets are int64: row * stride passes 2**31 at LLM sizes.

    The row holds classes [class_offset, class_offset + V) of n_classes: a
    vocabulary shard (xent_triton.distributed) or, usually, the whole row.

    SPLIT == 1: the program owns the row and writes LOSS, LSE, STATS. SPLIT > 1: each program owns
    ``cols_per_split`` columns and writes its partial (m, s, d, qsum, nnz)
    into PART[5, n_rows, SPLIT] for xent_combine_kernel (d is relative to m).
    """
    smoothing = f64_param(smoothing, smoothing_lo, ACC)
    z_scale = f64_param(z_scale, z_scale_lo, ACC)
    softcap = f64_param(softcap, softcap_lo, ACC)
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    outer = row // n_inner
    inner = row % n_inner
    X_row = X + outer * sx_outer + inner * sx_inner
    Y_row = Y + outer * sy_outer + inner * sy_inner
    t, active, valid, tw = row_target(T, outer * st_outer + inner * st_inner, W, V, n_classes, class_offset,
                                      ignore_index, smoothing, HARD, HAS_WEIGHT, ACC)
    col_begin = split * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, V)
    # Ignored rows (hard labels) read nothing: their loop is empty.
    col_end = tl.where(active, col_end, col_begin)
    m, s, d, qsum, nnz = _row_partial(X_row, Y_row, W, col_begin, col_end, n_classes, t, tw, active,
                                        smoothing, softcap, HARD, HAS_WEIGHT, SMOOTH, SOFTCAP, Y_ALIGNED, BLOCK, ACC,
                                        "")
    if SPLIT == 1:
        loss, lse, m, log_s, qsum = finalize_row(m, s, d, qsum, nnz, active, valid, z_scale, HAS_Z)
        store_row(LOSS, LSE, STATS, row, loss, lse, m, log_s, qsum, None)
    else:
        base = row * SPLIT + split
        stride = n_rows * SPLIT
        tl.store(PART + base, m)
        tl.store(PART + stride + base, s)
        tl.store(PART + 2 * stride + base, d)
        tl.store(PART + 3 * stride + base, qsum)
        tl.store(PART + 4 * stride + base, nnz)
