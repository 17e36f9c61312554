"""The fused training step: the forward that also writes dlogits (an experiment, perf/fused_step/README.md;
it left xent_triton's kernels/ in issue 22, and perf/fused_step/launch.py launches it).

A training step with the two-kernel design moves the row three times: the
forward reads it, the backward reads it again and writes dlogits (3NVb for
class indices, 5NVb with soft labels). Here each program reads its row, finishes
the row's statistics, then walks the row once more, last whole block first
(then the partial head and tail blocks, row_math.block_ranges), and writes
dlogits. The second walk is meant to hit L2: the grid is persistent (a
few programs per SM, each looping over rows), so at any time only
``programs x row bytes`` are in flight; walking backwards re-reads the most
recently loaded blocks first; and the loads of the second walk and the dlogits
stores are marked evict-first so that they do not push out the blocks still
to be re-read. With every re-read served by L2, device memory sees the
single-touch floor: NVb read + NVb written (2NVb for soft labels read).

The upstream gradient is not known yet, so dlogits is written for an assumed
scalar S (1 for reduction="sum", 1/denominator for "mean"). In the package
(until issue 22) the backward kernel then skipped the rows whose gradient
turned out to be S and recomputed the others, and a device flag (POLICY,
copied per call into WROTE) turned the second walk off once a loss came back
scaled. That machinery left with the kernel: perf/fused_step/launch.py passes
WROTE = 1 and returns dlogits for S, which is what a training step with an
unscaled loss gets; the kernel is unchanged, so it times as it did in P9/P17.
"""
import triton
import triton.language as tl

from xent_triton.kernels.row_math import (aligned_run, block_ranges, f64_param, finalize_row, grad_block, grad_coef,
                                          row_target, same_run, store_row)
from xent_triton.kernels.xent_forward import _row_partial


@triton.jit
def xent_step_kernel(
    X, sx_outer, sx_inner,
    Y, sy_outer, sy_inner,
    T, st_outer, st_inner,
    W, S, WROTE,
    LOSS, LSE, STATS, DX,
    n_rows, n_inner, V, n_classes, class_offset,
    ignore_index, smoothing, smoothing_lo, z_scale, z_scale_lo, softcap, softcap_lo,
    HARD: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, HAS_Z: tl.constexpr,
    SOFTCAP: tl.constexpr, Y_ALIGNED: tl.constexpr, DX_ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
    EPT: tl.constexpr, ACC: tl.constexpr, STAGES: tl.constexpr,
):
    """Loss, lse, statistics and dlogits = S * dloss/dlogits of rows pid, pid + P, ... (P programs).

    Addressing and row rules are those of xent_forward_kernel (SPLIT == 1) and
    xent_backward_kernel; DX is contiguous (n_rows, V). dlogits is written only
    if WROTE[0] != 0: the host copies the device's POLICY flag there before the
    launch, so every program sees the same value even if a backward on another
    stream clears the flag meanwhile.

    Both walks use the blocks of row_math.aligned_run (16-byte aligned from the logits row's
    address); *_ALIGNED say which other rows share that alignment (row_math.same_run). STAGES > 1
    pipelines the whole blocks' loads of both walks (see _row_partial): with a few programs per SM,
    one block in flight per program leaves HBM idle most of the time (perf/NOTES.md P17).
    """
    smoothing = f64_param(smoothing, smoothing_lo, ACC)
    z_scale = f64_param(z_scale, z_scale_lo, ACC)
    softcap = f64_param(softcap, softcap_lo, ACC)
    scale = tl.load(S).to(ACC)
    write = tl.load(WROTE) != 0
    for r in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row = tl.zeros([], tl.int64) + r  # int64 offsets; also under the interpreter, where r is an int
        outer = row // n_inner
        inner = row % n_inner
        X_row = X + outer * sx_outer + inner * sx_inner
        Y_row = Y + outer * sy_outer + inner * sy_inner
        DX_row = DX + row * V
        t, active, valid, tw = row_target(T, outer * st_outer + inner * st_inner, W, V, n_classes, class_offset,
                                          ignore_index, smoothing, HARD, HAS_WEIGHT, ACC)
        # Ignored rows read nothing: an empty first walk, and masked loads in the second.
        load_end = tl.where(active, V, 0)
        m, s, d, qsum, nnz = _row_partial(X_row, Y_row, W, 0, load_end, n_classes, t, tw, active, smoothing,
                                          softcap, HARD, HAS_WEIGHT, SMOOTH, SOFTCAP, Y_ALIGNED, BLOCK, EPT,
                                          ACC, "evict_last", STAGES)
        loss, lse, m, log_s, qsum = finalize_row(m, s, d, qsum, nnz, active, valid, z_scale, HAS_Z)
        store_row(LOSS, LSE, STATS, row, loss, lse, m, log_s, qsum, None)
        coef = grad_coef(m, log_s, qsum, z_scale, active, valid, HAS_Z)
        g = tl.where(active, scale, 0.0)
        # The blocks of the first walk (the same frame): the whole ones, last first, then the partial
        # ones. Re-reading the partial ones first (the first walk loads them last) measured 58 -> 99
        # registers (bf16, 2048/8 warps, sm_90) for at most two blocks of the row.
        Xb, lead = aligned_run(X_row, BLOCK)
        Yb = same_run(Y_row, lead, Y_ALIGNED, BLOCK)
        DXb = same_run(DX_row, lead, DX_ALIGNED, BLOCK)
        n, k0, k1, e0, e1, e_step = block_ranges(0, V, lead, active, BLOCK)
        n_full = tl.where(write, (k1 - k0) // BLOCK, 0)
        e1 = tl.where(write, e1, e0)
        for i in tl.range(0, n_full, num_stages=STAGES):
            offs = k1 - (i + 1) * BLOCK + tl.arange(0, BLOCK)
            grad_block(Xb + offs, Yb + offs, DXb + offs, DXb + offs, W, offs - lead, None, n_classes, t, tw, active,
                       smoothing, softcap, m, log_s, coef, g, HARD, HAS_WEIGHT, SMOOTH, SOFTCAP, True, False, ACC,
                       "evict_first", ".cs", True)
        for k in range(e0, e1, e_step):
            offs = k + tl.arange(0, BLOCK)
            grad_block(Xb + offs, Yb + offs, DXb + offs, DXb + offs, W, offs - lead, (offs >= lead) & (offs < n),
                       n_classes, t, tw, active, smoothing, softcap, m, log_s, coef, g, HARD, HAS_WEIGHT, SMOOTH,
                       SOFTCAP, True, False, ACC, "evict_first", ".cs", False)
