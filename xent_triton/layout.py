"""Shape and axis normalization shared by the Triton and torch backends.

Both backends see a problem as rows of V classes with unit class stride. Rows
are indexed by (outer, inner) with one stride each, which covers contiguous
tensors and the common strided views (``logits[:, :-1]``, sliced batches)
without a copy. Two cases are copied, once, and documented in the README:
a class axis whose stride is not 1 (e.g. ``axis=1`` of an (N, C, L) tensor),
and batch dimensions that no two strides can describe (only the tensor that
needs it is copied).
"""
from dataclasses import dataclass
from typing import Tuple

import torch

from .dtypes import acc_dtype


def batch_shape(shape, axis: int) -> Tuple[int, ...]:
    return tuple(s for i, s in enumerate(shape) if i != axis)


@dataclass(frozen=True)
class Layout:
    """How the kernels address a problem's rows (see module docstring): metadata only, so that a
    prepared call can keep it. The tensors it describes are the views make_rows returns."""

    batch_shape: Tuple[int, ...]
    n_rows: int
    n_inner: int
    n_cols: int  # V: classes held here
    x_strides: Tuple[int, int]  # (outer, inner) of the logits
    y_strides: Tuple[int, int]  # of the labels, (0, 0) without them
    t_strides: Tuple[int, int]  # of the class indices, (0, 0) without them
    acc: torch.dtype
    n_classes: int  # classes of the whole vocabulary (> n_cols for a shard)
    class_offset: int  # first class this view holds

    def as_3d(self, t: torch.Tensor, strides) -> torch.Tensor:
        """(n_outer, n_inner, V) strided view of ``t`` (a tensor of this layout)."""
        n_outer = self.n_rows // self.n_inner if self.n_inner else 0
        return t.as_strided((n_outer, self.n_inner, self.n_cols), (strides[0], strides[1], 1), t.storage_offset())

    @property
    def contiguous_strides(self):
        """(outer, inner) strides of a contiguous (*batch, V) buffer: the gradients'."""
        return self.n_inner * self.n_cols, self.n_cols


def _two_strides(shape, tensors):
    """Merge batch dims into at most (outer, inner); None if that is impossible."""
    dims = []
    for i, size in enumerate(shape):
        if size == 1:
            continue
        strides = [t.stride(i) for t in tensors]
        if dims and all(ps == s * size for ps, s in zip(dims[-1][1], strides)):
            dims[-1] = (dims[-1][0] * size, strides)
        else:
            dims.append((size, strides))
    if len(dims) > 2:
        return None
    if not dims:
        return 1, [(0, 0) for _ in tensors]
    if len(dims) == 1:
        return dims[0][0], [(0, s) for s in dims[0][1]]
    (_, outer), (n_inner, inner) = dims
    return n_inner, [(o, i) for o, i in zip(outer, inner)]


def class_last(t: torch.Tensor, axis: int) -> torch.Tensor:
    """Move ``axis`` last; copy only when the class stride is not 1."""
    if axis != t.dim() - 1:
        t = t.movedim(axis, -1)
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    return t


def make_rows(logits, labels, target, weight, axis: int, class_offset: int = 0, n_classes: int = -1):
    """The row view: ``(layout, logits, labels, target, weight)``, the tensors as the kernels read
    them (class axis last with stride 1, a 1-D target, a contiguous weight). ``axis`` must already
    be normalized (non-negative).

    ``class_offset``/``n_classes`` describe a vocabulary shard: these logits hold classes
    [class_offset, class_offset + V) of n_classes (-1: just V). ``weight``, when given, has the
    shard's V entries.
    """
    V = logits.shape[axis]
    x = class_last(logits, axis)
    y = None
    if labels is not None:
        y = class_last(labels if labels.shape == logits.shape else labels.expand(logits.shape), axis)
    bshape = tuple(x.shape[:-1])
    n_rows = 1
    for s in bshape:
        n_rows *= s
    views = [x] if y is None else [x, y]
    plan = _two_strides(bshape, views) if n_rows else (1, [(0, 0)] * len(views))
    if plan is None:
        # Copy as little as possible: the logits, else the labels, else both.
        options = [(True,)] if len(views) == 1 else [(True, False), (False, True), (True, True)]
        for copy in options:
            tried = [v.contiguous() if c else v for v, c in zip(views, copy)]
            plan = _two_strides(bshape, tried)
            if plan is not None:
                break
        x = tried[0]
        y = tried[1] if y is not None else None
    n_inner, strides = plan
    t_strides = (0, 0)
    if target is not None:
        if target.dim() != 1:
            target = target.reshape(n_rows)
        st = target.stride(0) if n_rows else 1
        t_strides = (st * n_inner, st)
    if weight is not None:
        weight = weight.contiguous()
    layout = Layout(
        batch_shape=bshape, n_rows=n_rows, n_inner=n_inner, n_cols=V, x_strides=tuple(strides[0]),
        y_strides=tuple(strides[1]) if y is not None else (0, 0), t_strides=t_strides,
        acc=acc_dtype(logits.dtype, labels.dtype if labels is not None else logits.dtype),
        n_classes=V if n_classes < 0 else n_classes, class_offset=class_offset)
    return layout, x, y, target, weight


def stats_shape(n_rows: int) -> Tuple[int, int]:
    """Shape of the per-row statistics every forward returns and every backward reads: one contiguous
    (rows, 3) tensor in the accumulation dtype (a range of rows is then a contiguous slice), holding each
    row's max m (-inf replaced by 0), log_s = log(sum(exp(x - m))) and label mass sum(q)
    (kernels/row_math.py). The rounded
    lse = m + log_s loses log_s beside a huge m; the two kept apart give softmax = exp((x - m) - log_s)
    and lse - x exactly at any magnitude."""
    return (n_rows, 3)


def grad_buffer_shape(logits_shape, axis: int):
    """Shape of the class-last contiguous buffer a dlogits/dlabels is written into."""
    return batch_shape(logits_shape, axis) + (logits_shape[axis],)


def check_inplace(view: torch.Tensor, logits: torch.Tensor, axis: int):
    """The in-place mode writes dlogits through the row view: it must be the logits, not a copy."""
    if view.data_ptr() != logits.data_ptr():
        raise ValueError(
            f"inplace_backward needs logits whose class axis has stride 1 and whose batch dims two strides "
            f"describe; got shape {tuple(logits.shape)} with strides {logits.stride()} and axis {axis}")
