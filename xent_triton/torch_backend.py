"""The torch fallback: same semantics as the kernels, in plain torch ops.

Rows are processed in chunks so that temporaries stay bounded (about
``CHUNK_ELEMENTS`` elements per temporary) whatever the input size. Half
precision inputs are accumulated in fp32, fp64 in fp64. Out-of-range class
indices raise IndexError here (the kernels give that row NaN instead, to keep
host syncs off the GPU path).
"""
from dataclasses import dataclass
from typing import Optional

import torch

from ._alloc import new_output
from .layout import Layout, stats_shape
from .validation import IGNORE_NOTHING

CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class Plan:
    """What a pass needs besides its tensors (the Triton backend's plan has launches too)."""
    layout: Layout
    options: tuple  # (ignore_index, label_smoothing, lse_square_scale, softcap)
    loss_dtype: Optional[torch.dtype]  # the forward's
    gradients: tuple = ()  # the backward's (need_dx, inplace, dlabels dtype or None)


def plan_forward(layout, options, dtypes, loss_dtype, hard, weighted, device) -> Plan:
    return Plan(layout, options, loss_dtype)


def plan_backward(layout, options, dtypes, hard, weighted, need_dx, need_dy, dy_dtype, divide, inplace,
                  device) -> Plan:
    return Plan(layout, options, None, (need_dx, inplace, dy_dtype))


class Rows:
    """A layout with the row views it describes: the fallback reads them together."""

    def __init__(self, layout: Layout, x, y, t, w):
        self.layout, self.logits, self.labels, self.target, self.weight = layout, x, y, t, w

    def __getattr__(self, name):
        return getattr(self.layout, name)


def _chunks(rows: Rows):
    """Yield (r0, r1, logits_chunk, labels_chunk) over contiguous ranges of rows."""
    n_outer = rows.n_rows // rows.n_inner if rows.n_inner else 0
    x3 = rows.as_3d(rows.logits, rows.x_strides)
    y3 = rows.as_3d(rows.labels, rows.y_strides) if rows.labels is not None else None
    per_row = max(rows.n_cols, 1)
    inner_step = max(1, min(rows.n_inner, CHUNK_ELEMENTS // per_row))
    outer_step = max(1, CHUNK_ELEMENTS // (per_row * rows.n_inner)) if inner_step == rows.n_inner else 1
    for o0 in range(0, n_outer, outer_step):
        o1 = min(o0 + outer_step, n_outer)
        for i0 in range(0, rows.n_inner, inner_step):
            i1 = min(i0 + inner_step, rows.n_inner)
            r0, r1 = o0 * rows.n_inner + i0, (o1 - 1) * rows.n_inner + i1
            x = x3[o0:o1, i0:i1].reshape(-1, rows.n_cols)
            y = y3[o0:o1, i0:i1].reshape(-1, rows.n_cols) if y3 is not None else None
            yield r0, r1, x, y


def _row_block(t3, rows: Rows, r0, r1):
    """Rows [r0, r1) of a (outer, inner, V) view, as the (outer, inner, V) block _chunks made them from."""
    o0, i0 = divmod(r0, rows.n_inner)
    o1 = (r1 - 1) // rows.n_inner + 1
    i1 = r1 - (o1 - 1) * rows.n_inner
    return t3[o0:o1, i0:i1]


def _write_rows(t3, rows: Rows, r0, r1, values):
    """Write values (r1 - r0, V) into rows [r0, r1) of a (outer, inner, V) view."""
    block = _row_block(t3, rows, r0, r1)
    block.copy_(values.reshape(block.shape))


def _capped(x_raw, softcap):
    if not softcap:
        return x_raw, None
    th = torch.tanh(x_raw / softcap)
    return torch.where(x_raw == float("-inf"), x_raw, softcap * th), th


def _row_target(rows: Rows, r0, r1, ignore_index, smoothing):
    """Local class index, activity and (1 - eps) * w_t of rows [r0, r1) (see kernels/row_math.py)."""
    t = rows.target[r0:r1].long()
    # IGNORE_NOTHING ignores nothing: a class index of that value is out of range, as in the kernels.
    active = t != ignore_index if ignore_index != IGNORE_NOTHING else torch.ones_like(t, dtype=torch.bool)
    bad = active & ((t < 0) | (t >= rows.n_classes))
    if bool(bad.any()):
        # TF's sparse loss has no ignore_index (it ignores nothing): its message names none.
        ignoring = "" if ignore_index == IGNORE_NOTHING else f" (ignore_index={ignore_index})"
        raise IndexError(f"class index {int(t[bad][0])} is out of range for {rows.n_classes} classes{ignoring}")
    local = t - rows.class_offset
    here = active & (local >= 0) & (local < rows.n_cols)
    local = torch.where(here, local, 0)
    tw = torch.full(t.shape, 1.0 - smoothing, dtype=rows.acc, device=t.device)
    if rows.weight is not None:
        tw = tw * rows.weight.to(rows.acc)[local]
    return local, active, tw * here


class _Target:
    """The target mass q of rows [r0, r1) (see kernels/row_math.py), without building a
    one-hot matrix for class indices."""

    def __init__(self, rows: Rows, y, r0, r1, ignore_index, smoothing):
        acc = rows.acc
        self.w = rows.weight.to(acc) if rows.weight is not None else None
        self.eps = smoothing / rows.n_classes  # smoothing mass per class
        self.hard = rows.target is not None
        self.active = None
        if not self.hard:
            q = y.to(acc)
            if smoothing:
                q = q * (1.0 - smoothing) + self.eps
            self.q = q * self.w if self.w is not None else q
            return
        self.t, self.active, self.tw = _row_target(rows, r0, r1, ignore_index, smoothing)
        # The smoothing mass of a class: eps * w_c on active rows.
        self.smooth = None
        if smoothing:
            self.smooth = self.eps * (self.w if self.w is not None else torch.ones(rows.n_cols, dtype=acc,
                                                                                   device=self.tw.device))

    def sums(self, x_rel):
        """(sum(q * x_rel), sum(q), count of nonzero q) per row; x_rel = x - max."""
        if not self.hard:
            q = self.q
            nz = q != 0
            # Only a zero label on a -inf logit is left out (0 * -inf): elsewhere a zero label keeps its
            # derivative, x_rel, for a backward that differentiates this (function.second_order).
            kept = nz | (x_rel != float("-inf"))
            return torch.linalg.vecdot(q, torch.where(kept, x_rel, 0.0)), q.sum(1), nz.sum(1)
        x_t = x_rel.gather(1, self.t[:, None])[:, 0]
        d = torch.where(self.tw != 0, self.tw * x_t, 0.0)
        qsum, nnz = self.tw.clone(), (self.tw != 0).long()
        if self.smooth is not None:
            on = self.active.to(x_rel.dtype)
            d = d + on * torch.where(self.smooth != 0, self.smooth * x_rel, 0.0).sum(1)
            qsum = qsum + on * self.smooth.sum()
            nnz = nnz + self.active.long() * int((self.smooth != 0).sum())
        return d, qsum, nnz

    def subtract_from(self, dx, g):
        """dx -= g * q, in place."""
        if not self.hard:
            dx -= g[:, None] * self.q
            return dx
        dx.scatter_add_(1, self.t[:, None], -(g * self.tw)[:, None])
        if self.smooth is not None:
            dx -= (g * self.active)[:, None] * self.smooth
        return dx


def _grad_coef(m, log_s, qsum, z_scale, active):
    coef = qsum + 2.0 * z_scale * (m + log_s)
    coef = torch.where(log_s == float("-inf"), 0.0, coef)
    return torch.where(active, coef, 0.0) if active is not None else coef


def _dlogits(x_rel, th, target: _Target, log_s, coef, g, softcap):
    """dlogits from x_rel = x - m (m the row max): softmax is exp(x_rel - log_s), not exp(x - lse) (see
    layout.stats_shape). A -inf logit has softmax 0, also on a row with no softmax (log_s = -inf), where
    the exp is NaN."""
    p = torch.where(x_rel == float("-inf"), 0.0, torch.exp(x_rel - log_s[:, None]))
    dx = target.subtract_from(g[:, None] * p * coef[:, None], g)
    if softcap:
        dx = dx * (1.0 - th * th)
    if target.active is not None:
        dx = torch.where(target.active[:, None], dx, 0.0)
    return dx


def forward(plan: Plan, x, y, t, w):
    """Per-row loss and lse, and the (rows, 3) statistics (layout.stats_shape); see
    triton_backend.forward."""
    with _no_autocast(x.device.type):
        return forward_rows(Rows(plan.layout, x, y, t, w), *plan.options, plan.loss_dtype)


def _no_autocast(device_type):
    # The fallback chooses its own precision: autocast would round its reductions (``linalg.vecdot`` is on
    # CPU autocast's bf16 list).
    return torch.autocast(device_type, enabled=False)


def forward_rows(rows: Rows, ignore_index: int, smoothing: float, z_scale: float, softcap: float,
                 loss_dtype: torch.dtype):
    """``forward`` of a Rows (also what double backward differentiates: function.second_order)."""
    dev = rows.logits.device
    loss_out = new_output((rows.n_rows,), loss_dtype, dev)
    lse_out = new_output((rows.n_rows,), rows.acc, dev)
    stats_out = new_output(stats_shape(rows.n_rows), rows.acc, dev)
    for r0, r1, x_raw, y in _chunks(rows):
        x, _ = _capped(x_raw.to(rows.acc), softcap)
        target = _Target(rows, y, r0, r1, ignore_index, smoothing)
        m = x.amax(dim=1)
        m = torch.where(m == float("-inf"), 0.0, m)
        x_rel = x - m[:, None]
        s = torch.exp(x_rel).sum(dim=1)
        # log(0) = -inf on a row of -inf logits, through a double where: its derivative is then 0, not NaN.
        log_s = torch.where(s > 0, torch.log(torch.where(s > 0, s, 1.0)), float("-inf"))
        lse = m + log_s
        # sum(q * (lse - x)) relative to the max: no cancellation for huge logits.
        d, qsum, nnz = target.sums(x_rel)
        loss = log_s * qsum - d + z_scale * lse * lse
        loss = torch.where((lse == float("-inf")) & (nnz == 0), 0.0, loss)
        if target.active is not None:
            loss, lse, m, log_s, qsum = (torch.where(target.active, v, 0.0) for v in (loss, lse, m, log_s, qsum))
        loss_out[r0:r1] = loss
        lse_out[r0:r1] = lse
        stats_out[r0:r1] = torch.stack((m, log_s, qsum), dim=1)
    return loss_out, lse_out, stats_out


def backward(plan: Plan, x, y, t, w, grad, stats, denom=None):
    """See triton_backend.backward."""
    need_dx, inplace, dy_dtype = plan.gradients
    shape = (*plan.layout.batch_shape, plan.layout.n_cols)
    dx = (x if inplace else new_output(shape, x.dtype, x.device)) if need_dx else None
    dy = new_output(shape, dy_dtype, x.device) if dy_dtype is not None else None
    with _no_autocast(x.device.type):
        _backward(Rows(plan.layout, x, y, t, w), grad, stats, *plan.options, dx, dy, denom)
    return dx, dy


def _backward(rows: Rows, grad, stats, ignore_index, smoothing, z_scale, softcap, dx_buf, dy_buf, denom):
    """``backward`` into the given buffers; ``dx_buf`` may be ``rows.logits`` (the in-place mode)."""
    g_all = (grad.expand(rows.n_rows) if grad.dim() == 0 else grad.reshape(rows.n_rows)).to(rows.acc)
    if denom is not None:
        # As autograd's division of the composition would: the denominator in the gradient's dtype.
        g_all = g_all / denom.to(rows.acc)
    contiguous = rows.contiguous_strides
    dx3 = None
    if dx_buf is not None:
        dx3 = rows.as_3d(dx_buf, rows.x_strides if dx_buf is rows.logits else contiguous)
    dy3 = rows.as_3d(dy_buf, contiguous) if dy_buf is not None else None
    m_all, log_s_all, qsum_all = stats.unbind(1)
    for r0, r1, x_raw, y in _chunks(rows):
        # x may alias dx_buf: dlabels and dlogits are computed in full before dlogits is written.
        x, th = _capped(x_raw.to(rows.acc), softcap)
        g, m, log_s = g_all[r0:r1], m_all[r0:r1], log_s_all[r0:r1]
        x_rel = x - m[:, None]  # the max is finite (-inf replaced by 0): -inf logits stay -inf
        if dy3 is not None:
            dy = g[:, None] * (log_s[:, None] - x_rel)
            if smoothing:
                dy = dy * (1.0 - smoothing)
            if rows.weight is not None:
                dy = dy * rows.weight.to(rows.acc)
            _write_rows(dy3, rows, r0, r1, dy)
        if dx3 is not None:
            target = _Target(rows, y, r0, r1, ignore_index, smoothing)
            if target.active is not None:
                g = torch.where(target.active, g, 0.0)
            coef = _grad_coef(m, log_s, qsum_all[r0:r1], z_scale, target.active)
            dx = _dlogits(x_rel, th, target, log_s, coef, g, softcap)
            _write_rows(dx3, rows, r0, r1, dx)
