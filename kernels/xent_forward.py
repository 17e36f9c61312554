"""Forward kernels: one streaming pass over each row (or each part of a row).

Memory traffic per row of V classes: V logits read, plus V labels read for
soft labels (nothing of size V for class indices). Everything else is O(1) per
row: the loss, lse, and the statistics the backward pass needs (the row max m,
log_s = log(sum(exp(x - m))) and sum(q): row_math.finalize_row).
"""
import triton
import triton.language as tl

from .row_math import (aligned_run, block_ranges, f64_param, finalize_row, load_logits, row_target, same_run,
                       store_row, target_mass, tie_to_logits)


@triton.jit
def _online_max_sumexp(m, s, x):
    """One block of the online softmax for each thread's slice: (new max, new sum of exp, shift = old max -
    new max), all of shape [R] for x of shape [R, EPT].

    s == 0 means no finite logit yet (the max itself adds exp(0) = 1). Until then
    m stays 0, so exp(x - m) never computes -inf - (-inf).
    """
    bmax = tl.max(x, axis=1)
    m_new = tl.where(s == 0, bmax, tl.maximum(m, bmax))
    m_new = tl.where(m_new == float("-inf"), m, m_new)
    # Nothing accumulated yet (s == 0): no rescale. exp(m - m_new) could be
    # inf for a very negative first max, and 0 * inf is NaN.
    shift = tl.where(s == 0, 0.0, m - m_new)
    s = s * tl.exp(shift) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
    return m_new, s, shift


@triton.jit
def _stats_block(m, s, d, qsum, nnz, x_ptrs, y_ptrs, W, cols, cmask, n_classes, t, tw, active, smoothing,
                 softcap, HARD: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr,
                 LABELS: tl.constexpr, ACC: tl.constexpr, EVICT: tl.constexpr, FULL: tl.constexpr):
    """One [R, EPT] block of _row_partial into the per-slice statistics: the online max and sum of exp,
    and with LABELS d, qsum and nnz. FULL: every lane is inside the row, cmask is not used."""
    x = load_logits(x_ptrs, cmask, softcap, SOFTCAP, ACC, EVICT, FULL)
    if LABELS:
        q = target_mass(y_ptrs, W, cols, cmask, n_classes, t, tw, active, smoothing, HARD, HAS_WEIGHT, SMOOTH,
                        ACC, EVICT, FULL)
        if HARD:
            q = tie_to_logits(q, x)
        m_new, s, shift = _online_max_sumexp(m, s, x)
        # d is 0 or -inf (label mass on -inf logits) while s == 0, which the zero shift leaves as it is.
        # A zero label never multiplies its logit, so 0 * -inf cannot make a NaN.
        d = tl.where(qsum != 0, d + qsum * shift, d) + tl.sum(tl.where(q != 0, q * (x - m_new[:, None]), 0.0),
                                                              axis=1)
        qsum += tl.sum(q, axis=1)
        nnz += tl.sum(tl.where(q != 0, 1.0, 0.0), axis=1)
        m = m_new
    else:
        m, s, _ = _online_max_sumexp(m, s, x)
    return m, s, d, qsum, nnz


@triton.jit
def combine_parts(m, s, d, qsum, nnz, LABELS: tl.constexpr):
    """Merge statistics kept per part ([P] vectors: the slices of a row, or a split row's parts) into the
    row's, each part relative to its own max. An empty part (s == 0) has no max to re-base: its d is
    0 or -inf (label mass on -inf logits) and stays so."""
    m_row = tl.max(tl.where(s > 0, m, float("-inf")), axis=0)
    m_row = tl.where(m_row == float("-inf"), 0.0, m_row)
    shift = m - m_row
    s_row = tl.sum(tl.where(s != 0, s * tl.exp(shift), s), axis=0)
    if LABELS:
        d_row = tl.sum(tl.where((qsum != 0) & (s != 0), d + qsum * shift, d), axis=0)
        qsum_row = tl.sum(qsum, axis=0)
        nnz_row = tl.sum(nnz, axis=0)
    else:
        d_row = 0.0
        qsum_row = 0.0
        nnz_row = 0.0
    return m_row, s_row, d_row, qsum_row, nnz_row


@triton.jit
def _row_partial(X_row, Y_row, W, col_begin, col_end, n_classes, t, tw, active, smoothing, softcap,
                 HARD: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
                 SOFTCAP: tl.constexpr, Y_ALIGNED: tl.constexpr, BLOCK: tl.constexpr, EPT: tl.constexpr,
                 ACC: tl.constexpr, EVICT: tl.constexpr, STAGES: tl.constexpr):
    """Online statistics over columns [col_begin, col_end); EVICT is the L2 hint of the loads.

    Returns m (the running max, -inf replaced by 0), s = sum(exp(x - m)),
    d = sum(q * (x - m)), sum(q) and the count of nonzero q. Keeping the
    label-weighted sum relative to the max matters: lse * sum(q) - sum(q * x) cancels
    catastrophically in fp32 once |x| is large (1e4 loses 3 digits, 1e30 all).

    Each block is a [BLOCK // EPT, EPT] tile, one slice of EPT consecutive columns (one 16-byte
    vector) per thread, and the statistics are kept per slice: the reductions inside the loop stay
    within a thread. Reducing whole blocks each iteration put a block-wide max and sum (warp shuffles,
    shared memory and a barrier) between one block's loads and the next's: in the sm_90 code 14 shuffles
    and 4 barriers per iteration, about half of them waiting on the label load (perf/NOTES.md P16). The
    slices are merged once, after the loop.

    The blocks wholly inside the row come first, as unmasked aligned vector loads, then the
    partial ones (row_math.block_ranges). Y_ALIGNED: see row_math.same_run.

    STAGES > 1 software-pipelines the whole blocks' loads (asynchronous copies into shared memory,
    STAGES - 1 blocks ahead): a program then has that many blocks in flight instead of one, which
    is what a grid of few programs per SM (the fused step's, perf/fused_step) needs to cover the memory latency.
    """
    # Class indices without smoothing: q is nonzero in the target column only, so the loop keeps no
    # label state at all (fewer registers and instructions); the target logit is read once after it.
    LABELS: tl.constexpr = not (HARD and not SMOOTH)
    R: tl.constexpr = BLOCK // EPT
    m = tl.zeros([R], ACC)
    s = tl.zeros([R], ACC)
    d = tl.zeros([R], ACC)
    qsum = tl.zeros([R], ACC)
    nnz = tl.zeros([R], ACC)
    Xb, lead = aligned_run(X_row + col_begin, BLOCK)
    Yb = same_run(Y_row + col_begin, lead, Y_ALIGNED, BLOCK)
    first = col_begin - lead  # the column of lane 0 of the frame
    n, k0, k1, e0, e1, e_step = block_ranges(col_begin, col_end, lead, True, BLOCK)
    tile = tl.arange(0, R)[:, None] * EPT + tl.arange(0, EPT)[None, :]
    for k in tl.range(k0, k1, BLOCK, num_stages=STAGES):
        offs = k + tile
        m, s, d, qsum, nnz = _stats_block(m, s, d, qsum, nnz, Xb + offs, Yb + offs, W, first + offs, None,
                                          n_classes, t, tw, active, smoothing, softcap, HARD, HAS_WEIGHT, SMOOTH,
                                          SOFTCAP, LABELS, ACC, EVICT, True)
    for k in range(e0, e1, e_step):
        offs = k + tile
        m, s, d, qsum, nnz = _stats_block(m, s, d, qsum, nnz, Xb + offs, Yb + offs, W, first + offs,
                                          (offs >= lead) & (offs < n), n_classes, t, tw, active, smoothing,
                                          softcap, HARD, HAS_WEIGHT, SMOOTH, SOFTCAP, LABELS, ACC, EVICT, False)
    m, s, d_row, qsum_row, nnz_row = combine_parts(m, s, d, qsum, nnz, LABELS)
    if not LABELS:
        mine = (t >= col_begin) & (t < col_end) & (tw != 0)
        x_t = load_logits(X_row + tl.where(mine, t, 0), mine, softcap, SOFTCAP, ACC, EVICT, False)
        d_row = tl.where(mine, tw * (x_t - m), 0.0)
        qsum_row = tl.where(mine, tw, 0.0)
        nnz_row = tl.where(mine, 1.0, 0.0)
    return m, s, d_row, qsum_row, nnz_row


@triton.jit
def xent_forward_kernel(
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
    BLOCK: tl.constexpr, EPT: tl.constexpr, ACC: tl.constexpr, STAGES: tl.constexpr,
):
    """Row statistics of softmax cross entropy.

    Grid (n_rows, SPLIT). Rows are addressed as (row // n_inner, row % n_inner)
    with two strides, so views like ``logits[:, :-1]`` are read in place. All
    row offsets are int64: row * stride passes 2**31 at LLM sizes.

    The row holds classes [class_offset, class_offset + V) of n_classes: a
    vocabulary shard (xent_triton.distributed) or, usually, the whole row.

    SPLIT == 1: the program owns the row and writes LOSS, LSE and STATS (row_math.store_row). SPLIT > 1:
    each program owns
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
                                        smoothing, softcap, HARD, HAS_WEIGHT, SMOOTH, SOFTCAP, Y_ALIGNED, BLOCK, EPT,
                                        ACC, "", STAGES)
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


@triton.jit
def xent_combine_kernel(
    T, st_outer, st_inner, W,
    LOSS, LSE, STATS, PART,
    n_rows, n_inner, V, n_classes, class_offset, ignore_index, smoothing, smoothing_lo, z_scale, z_scale_lo,
    HARD: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_Z: tl.constexpr,
    SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr, ACC: tl.constexpr,
):
    """Merge the SPLIT partial statistics of each row (grid: n_rows)."""
    smoothing = f64_param(smoothing, smoothing_lo, ACC)
    z_scale = f64_param(z_scale, z_scale_lo, ACC)
    row = tl.program_id(0).to(tl.int64)
    outer = row // n_inner
    inner = row % n_inner
    t, active, valid, tw = row_target(T, outer * st_outer + inner * st_inner, W, V, n_classes, class_offset,
                                      ignore_index, smoothing, HARD, HAS_WEIGHT, ACC)
    k = tl.arange(0, SPLIT_P2)
    kmask = k < SPLIT
    base = row * SPLIT + k
    stride = n_rows * SPLIT
    # Each partial s is relative to its own (safe) max; an empty (or padding) part has s == 0.
    part = PART + base
    m, s, d, qsum, nnz = combine_parts(
        tl.load(part, mask=kmask, other=0.0), tl.load(part + stride, mask=kmask, other=0.0),
        tl.load(part + 2 * stride, mask=kmask, other=0.0), tl.load(part + 3 * stride, mask=kmask, other=0.0),
        tl.load(part + 4 * stride, mask=kmask, other=0.0), True)
    loss, lse, m, log_s, qsum = finalize_row(m, s, d, qsum, nnz, active, valid, z_scale, HAS_Z)
    store_row(LOSS, LSE, STATS, row, loss, lse, m, log_s, qsum, None)
