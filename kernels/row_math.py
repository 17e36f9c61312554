"""Per-element and per-row math shared by the forward and backward kernels.

Notation, for one row of logits x (after the optional softcap) and one row of
"target mass" q:
  soft labels y:  q_c = w_c * ((1 - eps) * y_c + eps / V)
  class index t:  q_c = (1 - eps) * w_t * [c == t] + eps / V * w_c
  loss  = sum(q * (lse - x)) + z * lse**2  (computed relative to the row max)
  dloss/dx_c = softmax_c * (sum(q) + 2 * z * lse) - q_c      ("coef" = sum(q) + 2 z lse)
With no weights, no smoothing and no z-loss this is TF's soft cross entropy,
and its gradient is softmax * sum(labels) - labels.

Every row keeps its lse as two numbers, the row max m and log_s = log(sum(exp(x - m))), and
every quantity that needs lse - x forms it as log_s - (x - m): softmax_c = exp((x_c - m) - log_s).
The rounded sum m + log_s loses log_s once the float spacing near m exceeds it (logits of 1e8 in
fp32): exp(x - lse) then rounds the softmax of two equal logits to 1, not 1/2.
"""
import triton
import triton.language as tl


@triton.jit
def f64_param(hi, lo, ACC: tl.constexpr):
    """A host float passed as hi + lo: Triton passes Python floats as fp32, so an
    fp64 run would otherwise compute with a rounded label_smoothing or z scale."""
    return (tl.zeros([], ACC) + hi) + lo


@triton.jit
def divided_grad(g, DEN, DIVIDE: tl.constexpr, ACC: tl.constexpr):
    """The upstream gradient of a row, divided (DIVIDE) by a ``mean``'s denominator: one element at DEN (a
    count or a weight sum, on the device). Rounded as torch's tensor-by-tensor division (autograd's
    division of the composition loss.sum() / denominator gives these bits): fp32 division is otherwise
    approximate on the GPU."""
    if DIVIDE:
        den = tl.load(DEN).to(ACC)
        if ACC == tl.float64:
            g = g / den
        else:
            g = tl.math.div_rn(g, den)
    return g


@triton.jit
def to_store(v, PTR):
    """Cast v for a store through PTR. fp64 -> half goes through fp32: the Triton
    interpreter mis-converts fp64 to bf16 directly (it only arises for fp64
    labels with half logits, or the reverse)."""
    dst = PTR.dtype.element_ty
    if dst != tl.float64:
        v = v.to(tl.float32)
    return v.to(dst)


@triton.jit
def softcap_tanh(x, softcap):
    # tanh(x / c) through exp(-2|u|): never overflows, and keeps -inf at -1 so
    # masked logits stay masked after the cap (see load_logits).
    u = x / softcap
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    # 1 - e cancels for small |u|: there the series u - u^3/3 + 2u^5/15 is exact to rounding.
    a2 = a * a
    t = tl.where(a < 0.01, a * (1.0 - a2 * (1.0 / 3.0 - a2 * (2.0 / 15.0))), t)
    return tl.where(u < 0, -t, t)


@triton.jit
def cap_logits(x, softcap):
    """(softcap * tanh(x / softcap) with -inf kept, tanh(x / softcap)); the second is for the chain rule."""
    th = softcap_tanh(x, softcap)
    return tl.where(x == float("-inf"), x, softcap * th), th


@triton.jit
def aligned_run(row_ptr, BLOCK: tl.constexpr):
    """(base, lead): base = row_ptr - lead elements is the 16-byte boundary at or before row_ptr.

    Blocks laid out from base start on 16-byte boundaries, so the blocks that lie wholly inside
    the row load and store as unmasked vectors, whatever the row stride. Without this, a stride
    that Triton cannot prove divisible by 16 (V = 50257, or 1000) makes every access of the row a
    scalar one. The address itself is read, so the hint holds for any storage offset. Blocks of
    under 16 bytes gain nothing: there lead is 0 and nothing is hinted.
    """
    ITEM: tl.constexpr = row_ptr.dtype.element_ty.primitive_bitwidth // 8
    if BLOCK * ITEM >= 16:
        lead = (row_ptr.to(tl.int64) % 16) // ITEM
        base = tl.multiple_of(row_ptr - lead, 16)
    else:
        lead = tl.zeros([], tl.int64)
        base = row_ptr
    return base, lead


@triton.jit
def same_run(ptr, lead, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """ptr - lead: a second tensor's row in the block frame of aligned_run. ALIGNED: the host showed
    that this tensor's rows sit at the same offset from a 16-byte boundary as the logits' rows (same
    element size, base addresses and strides congruent), so aligned_run's hint holds here too."""
    p = ptr - lead
    ITEM: tl.constexpr = ptr.dtype.element_ty.primitive_bitwidth // 8
    if ALIGNED and BLOCK * ITEM >= 16:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def block_ranges(col_begin, col_end, lead, active, BLOCK: tl.constexpr):
    """The blocks of columns [col_begin, col_end) in aligned_run's frame (column col_begin - lead + j
    is lane j of the frame), as n, range(k0, k1, BLOCK) and range(e0, e1, e_step).

    n counts the frame's columns up to col_end (0 for an empty range). The first range holds the
    blocks wholly inside the row: unmasked, aligned loads and stores. The second holds the partial
    ones, masked: the head (when lead > 0, which is under one block) and the tail (when n is not a
    multiple of BLOCK), each once. Inactive rows (ignored class indices) get no full blocks and
    every block as a partial one, so that they load nothing through the masks and write zeros.
    """
    n = tl.where(col_end > col_begin, col_end - col_begin + lead, 0)
    k1 = (n // BLOCK) * BLOCK
    head = (lead > 0) & (n > 0)
    k0 = tl.where(head, BLOCK, 0)
    tail = (k1 < n) & ~(head & (k1 == 0))
    e0 = tl.where(head, 0, k1)
    e1 = tl.where(tail, k1 + 1, tl.where(head, 1, 0))
    e_step = tl.where(head & tail, k1, BLOCK)
    # Ignored rows: no full block; every block is a partial one.
    k1 = tl.where(active, k1, k0)
    e0 = tl.where(active, e0, 0)
    e1 = tl.where(active, e1, n)
    e_step = tl.where(active, e_step, BLOCK)
    return n, k0, k1, e0, e1, e_step


@triton.jit
def load_block(ptrs, mask, other, EVICT: tl.constexpr, FULL: tl.constexpr):
    """A block load: unmasked when FULL (every lane inside the row; mask is not used, and may be None),
    else masked, with ``other`` on the masked lanes. EVICT is the L2 hint."""
    if FULL:
        v = tl.load(ptrs, eviction_policy=EVICT)
    else:
        v = tl.load(ptrs, mask=mask, other=other, eviction_policy=EVICT)
    return v


@triton.jit
def store_block(ptrs, v, mask, CACHE: tl.constexpr, FULL: tl.constexpr):
    """A block store, unmasked when FULL (see load_block). CACHE is the cache modifier."""
    if FULL:
        tl.store(ptrs, v, cache_modifier=CACHE)
    else:
        tl.store(ptrs, v, mask=mask, cache_modifier=CACHE)


@triton.jit
def load_logits(ptrs, mask, softcap, SOFTCAP: tl.constexpr, ACC: tl.constexpr, EVICT: tl.constexpr,
                FULL: tl.constexpr):
    """A block of logits in ACC (see load_block for FULL)."""
    # Padding lanes load -inf, never 0: exp(0) would add 1 to the row's sum.
    x = load_block(ptrs, mask, float("-inf"), EVICT, FULL).to(ACC)
    if SOFTCAP:
        x, _ = cap_logits(x, softcap)
    return x


@triton.jit
def row_target(T, t_off, W, V, n_classes, class_offset, ignore_index, smoothing,
               HARD: tl.constexpr, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """Class index of a hard-label row, whether it is ignored / in range, and (1-eps)*w_t.

    The row holds classes [class_offset, class_offset + V) of n_classes (a shard
    of the vocabulary, or all of it). The returned index is local to the row;
    tw is 0 when the target class lives in another shard.
    """
    if HARD:
        t_global = tl.load(T + t_off).to(tl.int64)
        # ignore_index -2**63 ignores nothing (TF's sparse loss: validation.IGNORE_NOTHING), so that a class
        # index of that value is out of range (NaN), as every other negative one. (tl.where: the interpreter
        # turns a scalar bool combined with a vector into integers.)
        ignored = ignore_index + tl.zeros([], tl.int64)  # int64 whatever Triton specialized it to
        active = tl.where(ignored == -9223372036854775808, t_global == t_global, t_global != ignored)
        valid = (t_global >= 0) & (t_global < n_classes)
        t = t_global - class_offset
        here = active & (t >= 0) & (t < V)
        tw = (1.0 - smoothing) + tl.zeros([], ACC)
        if HAS_WEIGHT:
            # Only a local index is dereferenced (local class 0 always exists).
            tw = tw * tl.load(W + tl.where(here, t, 0)).to(ACC)
        tw = tl.where(here, tw, 0.0)
    else:
        t = tl.zeros([], tl.int64) - 1
        active = t < 0  # always true for soft labels
        valid = active
        tw = tl.zeros([], ACC)
    return t, active, valid, tw


@triton.jit
def target_mass(y_ptrs, W, cols, cmask, n_classes, t, tw, active, smoothing,
                HARD: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, ACC: tl.constexpr,
                EVICT: tl.constexpr, FULL: tl.constexpr):
    """q for one block of columns (zero on padding lanes). y_ptrs: the label row's block (soft labels);
    EVICT is its L2 hint. FULL: every lane is inside the row, and cmask is not used."""
    if HAS_WEIGHT and (SMOOTH or not HARD):
        # Class indices without smoothing need only w_t (row_target): no weight row is read.
        w = load_block(W + cols, cmask, 0.0, "", FULL).to(ACC)
    if HARD:
        q = tl.where(cols == t, tw, 0.0).to(ACC)
        if SMOOTH:
            if HAS_WEIGHT:
                q += (smoothing / n_classes) * w
            else:
                q += smoothing / n_classes
        q = tl.where(active, q, 0.0)
    else:
        q = load_block(y_ptrs, cmask, 0.0, EVICT, FULL).to(ACC)
        if SMOOTH:
            q = q * (1.0 - smoothing) + smoothing / n_classes
        if HAS_WEIGHT:
            q = q * w
    if not FULL:
        # Masked lanes carry no mass: the smoothing's, and the target's where a lane holds a column of
        # the row's neighbouring part (the head and tail blocks of a split row): that part counts it.
        q = tl.where(cmask, q, 0.0)
    return q


@triton.jit
def tie_to_logits(q, x):
    """``q`` itself, as a value that depends on the logits ``x`` of the same lanes.

    Class indices' q depends on no load of its block. Summed on its own (sum(q), its nonzero count),
    Triton gave it a register layout of its own: q computed twice, its sums reduced across threads
    and moved between layouts through shared memory, every block (sm_90 code, perf/NOTES.md P21).
    Tied to the logits it takes their layout. A NaN logit's lane gets q = 0: its row's sum of exp,
    lse and loss are NaN anyway."""
    return tl.where(x == x, q, 0.0)


@triton.jit
def dlogits_block(x, th, q, m, log_s, coef, g, active, SOFTCAP: tl.constexpr):
    """g * (softmax * coef - q) for one block, times the softcap's chain rule (th = tanh(x_raw / c))."""
    # A -inf logit has softmax 0, also on a row with no softmax (log_s = -inf), where the exp is NaN.
    p = tl.where(x == float("-inf"), 0.0, tl.exp((x - m) - log_s))
    dx = g * (p * coef - q)
    if SOFTCAP:
        dx = dx * (1.0 - th * th)
    return tl.where(active, dx, 0.0)


@triton.jit
def grad_block(x_ptrs, y_ptrs, dx_ptrs, dy_ptrs, W, cols, cmask, n_classes, t, tw, active, smoothing, softcap,
               m, log_s, coef, g, HARD: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
               SOFTCAP: tl.constexpr, NEED_DX: tl.constexpr, NEED_DY: tl.constexpr, ACC: tl.constexpr,
               EVICT: tl.constexpr, CACHE: tl.constexpr, FULL: tl.constexpr):
    """dlogits (and dlabels) of one block: load the logits (and labels), store the gradients.

    FULL: every lane is inside the row and the row is active; cmask is not used. Otherwise lanes
    outside cmask are neither loaded nor stored, and an inactive row loads nothing and stores
    zeros. EVICT is the L2 hint of the loads, CACHE the cache modifier of the dlogits stores.
    """
    lmask = cmask
    if not FULL:
        # tl.where, not &: the interpreter turns a scalar bool combined with a vector into integers.
        lmask = tl.where(active, cmask, cmask != cmask)
    xr = load_block(x_ptrs, lmask, float("-inf"), EVICT, FULL).to(ACC)
    x = xr
    th = xr
    if SOFTCAP:
        x, th = cap_logits(xr, softcap)
    if NEED_DX:
        q = target_mass(y_ptrs, W, cols, cmask, n_classes, t, tw, active, smoothing, HARD, HAS_WEIGHT, SMOOTH,
                        ACC, EVICT, FULL)
        store_block(dx_ptrs, to_store(dlogits_block(x, th, q, m, log_s, coef, g, active, SOFTCAP), dx_ptrs),
                    cmask, CACHE, FULL)
    if NEED_DY:
        dy = g * (log_s - (x - m))
        if SMOOTH:
            dy = dy * (1.0 - smoothing)
        if HAS_WEIGHT:
            dy = dy * load_block(W + cols, cmask, 0.0, "", FULL).to(ACC)
        store_block(dy_ptrs, to_store(dy, dy_ptrs), cmask, "", FULL)


@triton.jit
def grad_coef(m, log_s, qsum, z_scale, active, valid, HAS_Z: tl.constexpr):
    """coef = sum(q) + 2 z lse, with the row rules of finalize_row."""
    coef = qsum
    if HAS_Z:
        coef += 2.0 * z_scale * (m + log_s)
    # No softmax (all logits -inf): no softmax term in the gradient either.
    coef = tl.where(log_s == float("-inf"), 0.0, coef)
    coef = tl.where(active, coef, 0.0)
    return tl.where(valid | (~active), coef, float("nan"))


@triton.jit
def finalize_row(m, s, d, qsum, nnz, active, valid, z_scale, HAS_Z: tl.constexpr):
    """Loss, lse and the row statistics the backward reads (m, log_s, sum(q)), from the row's combined
    online statistics.

    m is the row max with -inf replaced by 0 (so that exp(x - m) never sees
    -inf - -inf), s = sum(exp(x - m)), d = sum(q * (x - m)). The loss
    sum(q * (lse - x)) = log(s) * sum(q) - d involves only differences from
    the max, so it keeps its precision when the logits are huge. lse = m + log_s is
    rounded: only the z-loss and the caller's return_lse use it (see the module docstring).
    """
    log_s = tl.log(s)
    lse = m + log_s
    loss = log_s * qsum - d
    if HAS_Z:
        loss += z_scale * lse * lse
    # A row whose logits are all -inf has no softmax. It costs nothing when it
    # carries no label mass; otherwise log(0) * qsum - d is already NaN or inf.
    loss = tl.where((log_s == float("-inf")) & (nnz == 0), 0.0, loss)
    # Ignored hard-label rows cost nothing and report lse = 0 (their statistics are 0 too); out-of-range
    # indices are a NaN, never a silent number.
    loss = tl.where(active, loss, 0.0)
    lse = tl.where(active, lse, 0.0)
    m = tl.where(active, m, 0.0)
    log_s = tl.where(active, log_s, 0.0)
    qsum = tl.where(active, qsum, 0.0)
    loss = tl.where(valid | (~active), loss, float("nan"))
    return loss, lse, m, log_s, qsum


@triton.jit
def store_row(LOSS, LSE, STATS, row, loss, lse, m, log_s, qsum, mask):
    """Store a row's (or a [ROWS] vector of rows') loss, lse and statistics: STATS is (rows, 3), contiguous,
    holding m, log_s and sum(q) of each row (finalize_row), so that any range of rows is a contiguous slice."""
    tl.store(LOSS + row, to_store(loss, LOSS), mask=mask)
    tl.store(LSE + row, lse, mask=mask)
    tl.store(STATS + 3 * row, m, mask=mask)
    tl.store(STATS + 3 * row + 1, log_s, mask=mask)
    tl.store(STATS + 3 * row + 2, qsum, mask=mask)


@triton.jit
def load_row(STATS, row, ACC: tl.constexpr):
    """(m, log_s, sum(q)) of a row (or a vector of rows), as store_row left them."""
    return (tl.load(STATS + 3 * row).to(ACC), tl.load(STATS + 3 * row + 1).to(ACC),
            tl.load(STATS + 3 * row + 2).to(ACC))
