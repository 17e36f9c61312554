"""Call plans: what an eager call's metadata decides, worked out once per call signature.

For small problems a training step takes as long as its host work (perf/NOTES.md P14, P19). Most of
that work depends only on metadata: the argument checks, the result dtype, whether the fused step or
the in-place mode applies, which backend runs, the row view's geometry, and the launch configuration
of each kernel. Before these plans, each call did it again, across some thirty Python functions. A
hand-written autograd.Function that allocates the same buffers and runs the same torch ops took
about a third of that host time (perf/NOTES.md P20).

``cross_entropy`` and ``softmax_cross_entropy_with_logits`` look up their call signature here first:

* the tensors' shapes, strides, dtypes, devices and requires_grad;
* the option values;
* the grad and autocast modes;
* the environment variables that choose a path;
* launch_config's state: the forced tiles, the SM count and the tiles table (by identity; each plan holds
  the table it was made with, so a table read again or swapped in gets new plans).

A key's first call runs the same checks and helpers as the general path and keeps their results.
Later calls of that key only compute the mean's denominator, allocate, and launch. A call whose
signature needs the general path (see ``_cross_entropy_plan``) gets None and takes it; that answer is
kept too.
Calls that don't fit eager mode never use a plan: torch.compile, tracing, tensor subclasses,
dispatch modes and torch.func (``ops._direct``), and tensors on a CUDA device other than the
current one. A backward whose backend or launch settings changed since its plan was made takes the
general path too.

A plan holds no tensor. The cache keeps at most ``MAX_PLANS`` signatures and is emptied when it
would outgrow that, so a run whose shapes keep changing stays bounded.
"""
import os
from typing import Optional

import torch

from . import backend, launch_config, ops
from . import validation as v
from ._alloc import new_output
from .layout import Rows, batch_shape, make_rows
from .reduction import mean_denominator

ENABLED = True  # False: every call takes the general path (perf/host_overhead.py compares the two)
MAX_PLANS = 256
_PLANS = {}
_ENV = (backend.BACKEND_ENV, "TRITON_INTERPRET", launch_config.FUSED_STEP_ENV)
try:
    # os.environ's own mapping, read without decoding: 3 reads took ~5 us through os.environ.get, ~0.3 here.
    # os.environ's setters and deleters update it; where it is missing or different, the public reads.
    _ENV_DATA = os.environ._data
    _ENV_KEYS = tuple(os.environ.encodekey(k) for k in _ENV)
    if any(_ENV_DATA.get(k) != (None if os.environ.get(n) is None else os.environ.encodevalue(os.environ[n]))
           for k, n in zip(_ENV_KEYS, _ENV)):
        raise LookupError("os.environ._data does not mirror os.environ")
except Exception:
    _ENV_DATA, _ENV_KEYS = os.environ, _ENV
_OPTION_TYPES = (int, float)
_DEVICES = ("cuda", "cpu")  # where the kernels run (CPU: the interpreter); others take the general path


class RowPlan:
    """A row view's metadata, its forward launches and (by the gradients asked for) its backward launches.

    ``rows`` rebuilds the view around a call's tensors: the plan is only made where make_rows takes the
    tensors as they are (class axis last with stride 1, contiguous weight, a 1-D class-index target)."""

    __slots__ = ("geometry", "grad_shape", "batch_shape", "axis", "options", "forward_plan", "backward_plans",
                 "impl", "state")

    def __init__(self, rows: Rows, axis: int, options, loss_dtype: torch.dtype, impl, state):
        self.geometry = (rows.batch_shape, rows.n_rows, rows.n_inner, rows.n_cols, rows.x_strides, rows.y_strides,
                         rows.acc, rows.n_classes, rows.class_offset)
        self.grad_shape = (*rows.batch_shape, rows.n_cols)
        # Outputs of several batch dims are views of the kernels' flat (rows,) buffers, as in ops._forward_impl.
        self.batch_shape = rows.batch_shape if len(rows.batch_shape) != 1 else None
        self.axis, self.options, self.impl = axis, options, impl
        self.forward_plan = impl.forward_plan(rows, *options, loss_dtype)
        self.backward_plans = {}
        self.state = state  # _backend_state() when the plan was made (its table held): the backward assumes it

    def rows(self, logits, labels, target, weight) -> Rows:
        return Rows(logits, labels, target, weight, *self.geometry)

    def forward(self, logits, labels, target, weight):
        """Per-row (loss, lse, stats), as ops' forward implementation gives them."""
        loss, lse, stats = self.impl.run_forward(self.forward_plan, self.rows(logits, labels, target, weight))
        if self.batch_shape is not None:
            loss, lse = loss.view(self.batch_shape), lse.view(self.batch_shape)
        return loss, lse, stats

    def backward(self, grad, logits, labels, target, weight, stats, need_dx, need_dy, denom):
        """(dlogits or None, dlabels or None), as ops' backward of the same row view gives them; None where
        the backend or launch settings changed since the plan was made (the general path then chooses)."""
        if _backend_state()[0] != self.state[0]:
            return None
        rows = self.rows(logits, labels, target, weight)
        which = (need_dx, need_dy, denom is not None)
        plan = self.backward_plans.get(which)
        if plan is None:
            plan = self.backward_plans[which] = self.impl.backward_plan(rows, *self.options, *which)
        dev = logits.device
        dx = new_output(self.grad_shape, logits.dtype, dev) if need_dx else None
        dy = new_output(self.grad_shape, labels.dtype, dev) if need_dy else None
        if dev.type == "cuda" and dev.index != torch.cuda.current_device():
            with torch.cuda.device(dev):
                self.impl.run_backward(plan, rows, grad, stats, dx, dy, denom=denom)
        else:
            self.impl.run_backward(plan, rows, grad, stats, dx, dy, denom=denom)
        return dx, dy


class ReducedPlan:
    """A ``mean`` or ``sum`` cross entropy of one call signature (ops._ReducedFunction with a RowPlan)."""

    __slots__ = ("row_plan", "params", "hard", "mean")

    def __init__(self, row_plan: RowPlan, params, hard: bool):
        self.row_plan, self.params, self.hard = row_plan, params, hard
        self.mean = params[5] == "mean"

    def __call__(self, input, target, weight):
        labels, index = (None, target) if self.hard else (target, None)
        denom = mean_denominator(self.row_plan.geometry[1], index, self.params[1], weight) if self.mean else None
        return ops._ReducedFunction.apply(input, labels, index, weight, self.params, denom, self.row_plan)


class PerRowPlan:
    """A per-row loss of one call signature (ops._PlannedForwardFunction), cast to ``cast`` when it is set."""

    __slots__ = ("row_plan", "hard", "cast")

    def __init__(self, row_plan: RowPlan, hard: bool, cast: Optional[torch.dtype]):
        self.row_plan, self.hard, self.cast = row_plan, hard, cast

    def __call__(self, input, target, weight):
        labels, index = (None, target) if self.hard else (target, None)
        loss, lse, _ = ops._PlannedForwardFunction.apply(input, labels, index, weight, self.row_plan)
        return (loss if self.cast is None else loss.to(self.cast)), lse


def _meta(t):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.requires_grad)


def _backend_state():
    """(state, tiles table): what the backend choice and launch_config's choices depend on besides their
    arguments. The backend and interpreter variables; the forced tiles, SM count and tiles table that tests
    and perf tools set. The table is keyed by identity, and each plan holds it, so that a table read again
    (``measured_tiles.cache_clear()``) or swapped in never meets a plan made with another one."""
    lc = launch_config
    table = lc.measured_tiles()
    return (_ENV_DATA.get(_ENV_KEYS[0]), _ENV_DATA.get(_ENV_KEYS[1]), lc.FORCE_SPLIT, lc.FORCE_TILE, lc.FORCE_STEP,
            lc.FORCE_ROWS, lc._sm_count, lc.measured_tiles, id(table)), table


def _lookup(key, table, build, *args):
    """The plan kept for ``key`` (None: the general path), made by ``build(*args)`` on a miss."""
    kept = _PLANS.get(key)
    if kept is None:
        kept = build(*args), table  # the plan holds the table: no other table can take its id meanwhile
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = kept
    return kept[0]


def _key(dev, *args):
    """A call's key: ``args`` (its tensors' metadata and options), the grad and autocast modes and the fused
    step's variable, the backend state; and the tiles table. Raises where the call cannot be keyed."""
    state, table = _backend_state()
    key = (*args, torch.is_grad_enabled(), torch.is_autocast_enabled(dev.type), _ENV_DATA.get(_ENV_KEYS[2]), state)
    hash(key)  # a setting that cannot be hashed (a list as FORCE_TILE) raises here
    return key, table


def _current(dev) -> bool:
    return dev.type != "cuda" or dev.index == torch.cuda.current_device()


def cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale,
                  softcap) -> Optional[tuple]:
    """(loss, lse) of ``functional.cross_entropy`` (without ``inplace_backward``) through its call
    signature's plan, or None where the call takes the general path."""
    if not (ENABLED and input is not None and target is not None and ops._direct(input, target, weight)):
        return None
    if (type(ignore_index) is not int or type(label_smoothing) not in _OPTION_TYPES
            or type(lse_square_scale) not in _OPTION_TYPES or not (softcap is None or type(softcap) in _OPTION_TYPES)
            or type(reduction) is not str or lse_square_scale != lse_square_scale):
        return None  # an option the key could not hold by value (a tensor, a numpy scalar, a NaN)
    dev = input.device
    if dev.type not in _DEVICES:
        return None
    try:
        key, table = _key(dev, "cross_entropy", _meta(input), _meta(target), _meta(weight), ignore_index,
                          reduction, label_smoothing, lse_square_scale, softcap)
    except Exception:  # sparse tensors, unhashable settings, an unreadable tiles table: the general path tells
        return None
    plan = _lookup(key, table, _cross_entropy_plan, input, target, weight, ignore_index, reduction,
                   label_smoothing, lse_square_scale, softcap, (key[-1], table))
    return None if plan is None or not _current(dev) else plan(input, target, weight)


def softmax_cross_entropy_with_logits(labels, logits, axis) -> Optional[tuple]:
    """(loss, lse) of ``functional.softmax_cross_entropy_with_logits`` (without ``inplace_backward``)
    through its call signature's plan, or None where the call takes the general path."""
    if not (ENABLED and labels is not None and logits is not None and ops._direct(labels, logits)
            and type(axis) is int):
        return None
    dev = logits.device
    if dev.type not in _DEVICES:
        return None
    try:
        key, table = _key(dev, "softmax_cross_entropy_with_logits", _meta(labels), _meta(logits), axis)
    except Exception:
        return None
    plan = _lookup(key, table, _soft_plan, labels, logits, axis, (key[-1], table))
    return None if plan is None or not _current(dev) else plan(logits, labels, None)


def _row_plan(logits, labels, index, weight, axis, options, loss_dtype, state) -> Optional[RowPlan]:
    """The RowPlan of a checked call, or None where the kernels are not the backend or make_rows would
    build the row view from copies, reshapes or broadcasts."""
    if backend.choose(logits.device) != "triton":
        return None
    rows = make_rows(logits, labels, index, weight, axis)
    if rows.logits is not logits or rows.labels is not labels or rows.target is not index or rows.weight is not weight:
        return None
    from . import triton_backend

    return RowPlan(rows, axis, options, loss_dtype, triton_backend, state)


def _cross_entropy_plan(input, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap,
                        state):
    """The plan of a ``cross_entropy`` signature, or None where it needs the general path: the fused step,
    or a row view that _row_plan refuses. Bad arguments raise as in the general path."""
    from . import functional

    axis, hard = v.check_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                                       lse_square_scale, softcap)
    C = input.shape[axis]
    labels, index = (None, target) if hard else (target, None)
    if functional._takes_fused_step(input, labels, input.numel() // C, C, reduction, False, call_state=False):
        return None  # whether it is taken also depends on the saved-tensor hooks of each call
    autocast = functional._autocast_on(input)
    out_dtype = ops.torch_result_dtype(input.dtype, labels, weight, autocast)
    options = (int(ignore_index), float(label_smoothing), float(lse_square_scale), float(softcap or 0.0))
    if reduction == "none":
        loss_dtype = ops.loss_dtype_of(input, autocast or out_dtype != input.dtype, labels)
        row_plan = _row_plan(input, labels, index, weight, axis, options, loss_dtype, state)
        return None if row_plan is None else PerRowPlan(row_plan, hard, None if out_dtype == loss_dtype else out_dtype)
    if len(batch_shape(input.shape, axis)) != 1:
        return None  # (C,) input: a 0-d target
    row_plan = _row_plan(input, labels, index, weight, axis, options, ops.loss_dtype_of(input, True, labels), state)
    return None if row_plan is None else ReducedPlan(row_plan, (axis, *options, reduction, out_dtype), hard)


def _soft_plan(labels, logits, axis, state):
    """The plan of a ``softmax_cross_entropy_with_logits`` signature (see _cross_entropy_plan)."""
    from . import functional

    axis = v.check_soft_cross_entropy(labels, logits, axis)
    autocast = functional._autocast_on(logits)
    loss_dtype = ops.loss_dtype_of(logits, autocast, labels)
    row_plan = _row_plan(logits, labels, None, None, axis, (-100, 0.0, 0.0, 0.0), loss_dtype, state)
    out_dtype = ops.loss_dtype_of(logits, autocast)
    return None if row_plan is None else PerRowPlan(row_plan, False, None if out_dtype == loss_dtype else out_dtype)


def clear():
    """Forget every plan (they are rebuilt on the next call of each signature)."""
    _PLANS.clear()
