"""The ``torch.library`` custom ops behind every public entry point.

``xent_triton::forward`` returns the per-row loss and lse, and the O(rows)
statistics the backward reads (layout.stats_shape: the row max, the log of the
sum of exp and the label mass, one (rows, 3) tensor); its autograd formula calls
``xent_triton::backward``. The fused step (function.FusedStepCrossEntropy,
eager only) uses ``xent_triton::step`` and ``xent_triton::backward_scaled``.
Both have fake implementations, so torch.compile traces them without a graph
break, and both pick their backend (Triton or the torch fallback) at run time,
inside the op.

Saved for backward: the inputs themselves and the O(rows) statistics, never
an N x V intermediate (the fused step's dlogits, written by its forward, is
the gradient itself, which the backward hands on).
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backend
from ._alloc import new_output
from .layout import acc_dtype, batch_shape, check_inplace, grad_buffer_shape, make_rows, stats_shape
from .reduction import divide, reduce_rows


def _impl(device: torch.device):
    if backend.choose(device) == "triton":
        from . import triton_backend as impl
    else:
        from . import torch_backend as impl
    return impl


def _run(device: torch.device, method: str, *args, **kwargs):
    """Call the backend's ``method`` on ``device`` (made the current CUDA device) with autocast off: both
    backends choose their own precision, and autocast would round the fallback's reductions
    (``linalg.vecdot`` is on CPU autocast's bf16 list)."""
    fn = getattr(_impl(device), method)
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        # Triton launches on the current device, not on the tensors': their addresses would be read in
        # another GPU's context. torch's own ops guard the same way.
        with torch.cuda.device(device):
            return _run(device, method, *args, **kwargs)
    if not torch.is_autocast_enabled(device.type):
        return fn(*args, **kwargs)  # entering an autocast context costs more host time than the check
    with torch.autocast(device.type, enabled=False):
        return fn(*args, **kwargs)


def loss_dtype_of(logits: Tensor, loss_fp32: bool, labels: Optional[Tensor] = None) -> torch.dtype:
    """The per-row loss dtype: the logits', or when asked for (``loss_fp32``) the accumulation
    dtype: fp32, fp64 where the logits or labels are fp64."""
    return _stat_dtype(logits, labels) if loss_fp32 else logits.dtype


def torch_result_dtype(logits_dtype: torch.dtype, labels: Optional[Tensor], weight: Optional[Tensor],
                       autocast: bool) -> torch.dtype:
    """The dtype torch's ``cross_entropy`` returns: the logits' (fp32 under autocast, which leaves fp64
    alone), promoted with probability targets' (``labels``) and, with them, the class weights'."""
    dtype = logits_dtype
    if autocast and dtype != torch.float64:
        dtype = torch.float32
    if labels is not None:
        dtype = torch.promote_types(dtype, labels.dtype)
        if weight is not None:
            dtype = torch.promote_types(dtype, weight.dtype)
    return dtype


def _stat_dtype(logits: Tensor, labels: Optional[Tensor]) -> torch.dtype:
    return acc_dtype(logits.dtype, labels.dtype if labels is not None else logits.dtype)


def _forward_impl(
    logits: Tensor, labels: Optional[Tensor], target: Optional[Tensor], weight: Optional[Tensor],
    axis: int, ignore_index: int, label_smoothing: float, lse_square_scale: float, softcap: float,
    loss_fp32: bool, class_offset: int = 0, n_classes: int = -1,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row (loss, lse) of the logits' batch shape, and the (rows, 3) statistics. ``class_offset``/``n_classes``
    describe a vocabulary shard."""
    rows = make_rows(logits, labels, target, weight, axis, class_offset, n_classes)
    loss, lse, stats = _run(logits.device, "forward", rows, ignore_index, label_smoothing, lse_square_scale,
                            softcap, loss_dtype_of(logits, loss_fp32, labels))
    if len(rows.batch_shape) != 1:
        loss, lse = loss.view(rows.batch_shape), lse.view(rows.batch_shape)
    return loss, lse, stats


xent_forward = torch.library.custom_op("xent_triton::forward", mutates_args=())(_forward_impl)


@xent_forward.register_fake
def _(logits, labels, target, weight, axis, ignore_index, label_smoothing, lse_square_scale, softcap, loss_fp32,
      class_offset=0, n_classes=-1):
    shape = batch_shape(logits.shape, axis)
    stat = _stat_dtype(logits, labels)
    return (logits.new_empty(shape, dtype=loss_dtype_of(logits, loss_fp32, labels)),
            logits.new_empty(shape, dtype=stat), logits.new_empty(stats_shape(math.prod(shape)), dtype=stat))


def _fake_alloc(shape, dtype, device):
    """Allocation for the fake implementations: never poisoned, never read."""
    return torch.empty(shape, dtype=dtype, device=device)


def _grad_buffers(logits, labels, axis, need_dlogits, need_dlabels, alloc):
    """Class-last contiguous buffers (or None) for dlogits and dlabels.

    Broadcast labels get an fp32/fp64 buffer: it is summed over the broadcast axes
    and rounded to the labels' dtype once, after the sum.
    """
    shape = grad_buffer_shape(logits.shape, axis)
    dx = alloc(shape, logits.dtype, logits.device) if need_dlogits else None
    dy = None
    if need_dlabels:
        broadcast = tuple(labels.shape) != tuple(logits.shape)
        dy = alloc(shape, _stat_dtype(logits, labels) if broadcast else labels.dtype, logits.device)
    return dx, dy


def _as_grads(dx, dy, logits, labels, axis):
    """Move the class axis back; reduce dlabels over the axes labels were broadcast along."""
    last = axis == logits.dim() - 1
    dlogits = (dx if last else dx.movedim(-1, axis)) if dx is not None else logits.new_empty(0)
    if dy is None:
        return dlogits, logits.new_empty(0)
    dlabels = dy if last else dy.movedim(-1, axis)
    if tuple(labels.shape) != tuple(logits.shape):
        dlabels = dlabels.sum_to_size(labels.shape).to(labels.dtype)
    return dlogits, dlabels


def _backward_impl(
    grad: Tensor, logits: Tensor, labels: Optional[Tensor], target: Optional[Tensor], weight: Optional[Tensor],
    stats: Tensor, axis: int, ignore_index: int, label_smoothing: float, lse_square_scale: float,
    softcap: float, need_dlogits: bool, need_dlabels: bool, class_offset: int = 0, n_classes: int = -1,
) -> Tuple[Tensor, Tensor]:
    """(dlogits, dlabels) from the forward's ``stats``; a gradient not asked for comes back as an empty tensor."""
    # The op's statistics come back contiguous, as the kernels read them, unless a compiler laid them out anew.
    return _backward_rows(grad, logits, labels, target, weight, stats.contiguous(), axis, ignore_index,
                          label_smoothing, lse_square_scale, softcap, need_dlogits, need_dlabels, class_offset,
                          n_classes)


def _backward_rows(grad, logits, labels, target, weight, stats, axis, ignore_index, label_smoothing,
                   lse_square_scale, softcap, need_dlogits, need_dlabels, class_offset=0, n_classes=-1, denom=None):
    """_backward_impl, with the upstream gradient divided by ``denom`` (a mean's, a device tensor) first."""
    rows = make_rows(logits, labels, target, weight, axis, class_offset, n_classes)
    dx, dy = _grad_buffers(logits, labels, axis, need_dlogits, need_dlabels, new_output)
    _run(logits.device, "backward", rows, grad, stats, ignore_index, label_smoothing, lse_square_scale, softcap,
         dx, dy, denom=denom)
    return _as_grads(dx, dy, logits, labels, axis)


xent_backward = torch.library.custom_op("xent_triton::backward", mutates_args=())(_backward_impl)


@xent_backward.register_fake
def _(grad, logits, labels, target, weight, stats, axis, ignore_index, label_smoothing, lse_square_scale,
      softcap, need_dlogits, need_dlabels, class_offset=0, n_classes=-1):
    dx, dy = _grad_buffers(logits, labels, axis, need_dlogits, need_dlabels, _fake_alloc)
    return _as_grads(dx, dy, logits, labels, axis)


def _setup_context(ctx, inputs, output):
    logits, labels, target, weight, axis, ignore_index, label_smoothing, z, softcap, _fp32, offset, n_classes = inputs
    _loss, lse, stats = output
    ctx.save_for_backward(logits, labels, target, weight, stats)
    ctx.params = (axis, ignore_index, label_smoothing, z, softcap)
    ctx.shard = (offset, n_classes)
    ctx.mark_non_differentiable(lse, stats)


def _refuse_double_backward():
    if torch.is_grad_enabled():
        raise RuntimeError(
            "xent_triton: double backward (create_graph=True through the cross-entropy loss) is not supported")


class _KernelValues(torch.autograd.Function):
    """The kernels' gradient (``values``), with the derivatives of ``differentiable``, the same function
    computed in differentiable ops: a second backward gets the derivatives, and the first-order values
    stay the kernels' bits, with their NaN and inf rules."""

    @staticmethod
    def forward(ctx, values, differentiable):
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def _second_order(first, grad_rows, logits, labels, target, weight, axis, ignore_index, label_smoothing,
                  lse_square_scale, softcap, need_dx, need_dy):
    """(dlogits, dlabels) for ``create_graph=True``: the values of ``first`` (the kernels' gradients),
    differentiable with respect to the inputs and the per-row upstream gradient, so that a second
    derivative (a gradient penalty, a Hessian-vector product) goes through them. The per-row loss is
    computed again in the torch fallback's ops, the same formulas, and autograd differentiates it."""
    from . import torch_backend
    wanted = [t for t, need in ((logits, need_dx), (labels, need_dy)) if need]
    with torch.enable_grad(), torch.autocast(logits.device.type, enabled=False):
        rows = make_rows(logits, labels, target, weight, axis)
        loss = torch_backend.forward(rows, ignore_index, label_smoothing, lse_square_scale, softcap, rows.acc)[0]
        if rows.n_rows == 0:
            diffs = [t * 0 for t in wanted]  # empty: nothing to differentiate, but a graph to go through
        else:
            diffs = torch.autograd.grad(loss, wanted, grad_rows.reshape(-1).to(rows.acc), create_graph=True,
                                        materialize_grads=True)
    diffs = iter(diffs)
    return tuple(_KernelValues.apply(value, next(diffs).to(value.dtype)) if need else value
                 for value, need in zip(first, (need_dx, need_dy)))


def _backward(ctx, grad_loss, _grad_lse, _grad_stats):
    logits, labels, target, weight, stats = ctx.saved_tensors
    need_dx, need_dy = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    # grad_loss is None when the direct path does not materialize gradients and the loss went unused.
    if grad_loss is None or not (need_dx or need_dy):
        return (None,) * 12
    if torch.is_grad_enabled():
        if ctx.shard[1] != -1:  # a vocabulary shard's loss is not the loss: its second derivative is not ours
            _refuse_double_backward()
        with torch.no_grad():
            first = _backward(ctx, grad_loss.detach(), None, None)[:2]
        return _second_order(first, grad_loss, logits, labels, target, weight, *ctx.params, need_dx,
                             need_dy) + (None,) * 10
    dlogits, dlabels = backward(
        grad_loss, logits, labels, target, weight, stats, *ctx.params, need_dx, need_dy, *ctx.shard)
    return (dlogits if need_dx else None, dlabels if need_dy else None) + (None,) * 10


torch.library.register_autograd("xent_triton::forward", _backward, setup_context=_setup_context)


class _ForwardFunction(torch.autograd.Function):
    """The autograd formula of ``xent_triton::forward`` (the same two functions) for direct calls.

    ``forward(ctx, ...)`` rather than a ``setup_context``: that form binds the arguments through
    ``inspect.signature`` on every call."""

    @staticmethod
    def forward(ctx, *args):
        out = _forward_impl(*args)
        _setup_context(ctx, args, out)
        # lse and stats never get a gradient: materializing zeros for them cost two kernels per backward.
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads)


class _PlannedForwardFunction(torch.autograd.Function):
    """``_ForwardFunction`` for a call signature seen before: the per-row (loss, lse, stats) through its
    call_plans.RowPlan, whose metadata and launches were worked out once. Five arguments, not twelve:
    Function.apply walks them on every call."""

    @staticmethod
    def forward(ctx, logits, labels, target, weight, plan):
        loss, lse, stats = plan.forward(logits, labels, target, weight)
        ctx.save_for_backward(logits, labels, target, weight, stats)
        ctx.plan = plan
        ctx.mark_non_differentiable(lse, stats)
        ctx.set_materialize_grads(False)
        return loss, lse, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse, _grad_stats):
        need_dx, need_dy = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_loss is None or not (need_dx or need_dy):
            return (None,) * 5
        logits, labels, target, weight, stats = ctx.saved_tensors
        plan = ctx.plan
        if torch.is_grad_enabled():  # create_graph=True
            with torch.no_grad():
                first = _PlannedForwardFunction.backward(ctx, grad_loss.detach(), None, None)[:2]
            return _second_order(first, grad_loss, logits, labels, target, weight, plan.axis, *plan.options,
                                 need_dx, need_dy) + (None,) * 3
        planned = None
        if _direct(grad_loss, logits, labels, target, weight, stats):
            planned = plan.backward(grad_loss, logits, labels, target, weight, stats, need_dx, need_dy, None)
        if planned is not None:
            dlogits, dlabels = planned
        else:  # the general path: compiled autograd, fake tensors and subclasses need the custom op
            dlogits, dlabels = backward(grad_loss, logits, labels, target, weight, stats, plan.axis,
                                        *plan.options, need_dx, need_dy)
        return (dlogits if need_dx else None), (dlabels if need_dy else None), None, None, None


class _ReducedFunction(torch.autograd.Function):
    """``mean`` or ``sum`` of the per-row loss, cast to the result dtype, as one autograd node (direct calls).

    Composed of ops (the per-row loss, a sum, a division and a cast), a training step also ran three
    more autograd nodes and five more small kernels in the backward (the cast back, the division, the
    expand, zero gradients for lse and the statistics), each costing host time, which sets the time of small
    problems (perf/NOTES.md P14). Here the backward kernel reads the one-element upstream gradient with
    zero strides and divides it by a device denominator (class indices' count or weight sum) itself,
    rounded as torch's division (kernels/row_math.divided_grad): the same gradient bits as the
    composition, which the custom ops still use (torch.compile fuses those small ops itself; compiled
    autograd gets it from backward).

    ``params`` is (axis, ignore_index, label_smoothing, lse_square_scale, softcap, reduction, out_dtype), one
    argument rather than seven: Function.apply walks its arguments on every call. ``plan``, when given, is
    the call signature's call_plans.RowPlan: the row view's metadata and launches worked out once.
    """

    @staticmethod
    def forward(ctx, logits, labels, target, weight, params, denom, plan=None):
        axis, ignore_index, label_smoothing, lse_square_scale, softcap, reduction, out_dtype = params
        if plan is None:
            loss, lse, stats = _forward_impl(logits, labels, target, weight, axis, ignore_index, label_smoothing,
                                             lse_square_scale, softcap, True)
        else:
            loss, lse, stats = plan.forward(logits, labels, target, weight)
        total = reduce_rows(loss, reduction, denom=denom, out_dtype=out_dtype)
        dev_denom = denom if isinstance(denom, Tensor) else None
        ctx.save_for_backward(logits, labels, target, weight, stats, dev_denom)
        ctx.host_denom = denom if dev_denom is None else None
        ctx.params, ctx.plan = params, plan
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return total, lse

    @staticmethod
    def backward(ctx, grad, _grad_lse):
        need_dx, need_dy = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad is None or not (need_dx or need_dy):
            return (None,) * 7
        logits, labels, target, weight, stats, dev_denom = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            with torch.no_grad():
                first = _ReducedFunction.backward(ctx, grad.detach(), None)[:2]
            g = grad.to(stats.dtype)
            denom = dev_denom if dev_denom is not None else ctx.host_denom
            g = (divide(g, denom) if denom is not None else g).expand(stats.shape[0])
            return _second_order(first, g, logits, labels, target, weight, *ctx.params[:5], need_dx,
                                 need_dy) + (None,) * 5
        direct = _direct(grad, logits, labels, target, weight, stats, dev_denom)
        inputs = (logits, labels, target, weight, stats, *ctx.params[:5], need_dx, need_dy)
        if direct and ctx.host_denom is None:
            # The one-element gradient as it is: the backends read it for every row (zero strides), and
            # divide it by a device denominator themselves.
            g, denom = grad, dev_denom
        else:
            # The composition's gradient: autograd's cast, then its division. A row count (probabilities) is a
            # host number, which autograd on CUDA divides by as a multiply by its reciprocal, not the
            # kernel's division; compiled autograd, fake tensors and subclasses need the custom op.
            g = grad.to(stats.dtype)
            denom = dev_denom if dev_denom is not None else ctx.host_denom
            if denom is not None:
                g = divide(g, denom)
            if not direct:
                dlogits, dlabels = backward(g.expand(stats.shape[0]), *inputs)
                return (dlogits if need_dx else None), (dlabels if need_dy else None), None, None, None, None, None
            denom = None
        planned = None if ctx.plan is None else ctx.plan.backward(g, logits, labels, target, weight, stats, need_dx,
                                                                 need_dy, denom)
        if planned is not None:
            return (*planned, None, None, None, None, None)
        dlogits, dlabels = _backward_rows(g, *inputs, denom=denom)
        return (dlogits if need_dx else None), (dlabels if need_dy else None), None, None, None, None, None


def _backward_inplace_impl(
    grad: Tensor, logits: Tensor, labels: Optional[Tensor], target: Optional[Tensor], weight: Optional[Tensor],
    stats: Tensor, axis: int, ignore_index: int, label_smoothing: float, lse_square_scale: float,
    softcap: float, need_dlabels: bool,
) -> Tensor:
    """Like ``backward``, but dlogits is written over ``logits`` (the in-place memory mode).

    Returns dlabels (an empty tensor unless ``need_dlabels``).
    """
    rows = make_rows(logits, labels, target, weight, axis)
    check_inplace(rows, logits, axis)
    _, dy = _grad_buffers(logits, labels, axis, False, need_dlabels, new_output)
    _run(logits.device, "backward", rows, grad, stats.contiguous(), ignore_index, label_smoothing, lse_square_scale,
         softcap, rows.logits, dy)
    return _as_grads(None, dy, logits, labels, axis)[1]


xent_backward_inplace = torch.library.custom_op("xent_triton::backward_inplace",
                                                mutates_args=("logits",))(_backward_inplace_impl)


@xent_backward_inplace.register_fake
def _(grad, logits, labels, target, weight, stats, axis, ignore_index, label_smoothing, lse_square_scale,
      softcap, need_dlabels):
    _, dy = _grad_buffers(logits, labels, axis, False, need_dlabels, _fake_alloc)
    return _as_grads(None, dy, logits, labels, axis)[1]


def _step_impl(
    logits: Tensor, labels: Optional[Tensor], target: Optional[Tensor], weight: Optional[Tensor],
    axis: int, ignore_index: int, label_smoothing: float, lse_square_scale: float, softcap: float,
    loss_fp32: bool, scale: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-row (loss, lse, stats), ``dlogits = scale * dloss/dlogits`` from one kernel (the fused step), and
    ``written`` (one int32): whether dlogits was written (the device's step policy may skip it).

    ``scale`` is a one-element tensor: the upstream gradient each row is expected to get.
    """
    rows = make_rows(logits, labels, target, weight, axis)
    dx, _ = _grad_buffers(logits, labels, axis, True, False, new_output)
    loss_dtype = loss_dtype_of(logits, loss_fp32, labels)
    loss, lse, stats, written = _run(logits.device, "step", rows, ignore_index, label_smoothing, lse_square_scale,
                                     softcap, loss_dtype, scale, dx)
    return (loss.view(rows.batch_shape), lse.view(rows.batch_shape), stats,
            _as_grads(dx, None, logits, labels, axis)[0], written)


xent_step = torch.library.custom_op("xent_triton::step", mutates_args=())(_step_impl)


@xent_step.register_fake
def _(logits, labels, target, weight, axis, ignore_index, label_smoothing, lse_square_scale, softcap, loss_fp32,
      scale):
    dx, _ = _grad_buffers(logits, labels, axis, True, False, _fake_alloc)
    return xent_forward(logits, labels, target, weight, axis, ignore_index, label_smoothing, lse_square_scale,
                        softcap, loss_fp32) + (_as_grads(dx, None, logits, labels, axis)[0],
                                               logits.new_empty((1,), dtype=torch.int32))


# The fused step's device flag (triton_backend.step_policy) is state these two ops share outside their
# schemas: xent_triton::step reads it, xent_triton::backward_scaled may clear it. It only decides whether
# dlogits is written early or recomputed, never a value, and the fused step runs in eager mode only
# (functional._takes_fused_step), so no compiled graph reorders them.
def _backward_scaled_impl(
    grad: Tensor, logits: Tensor, labels: Optional[Tensor], target: Optional[Tensor], weight: Optional[Tensor],
    stats: Tensor, scale: Tensor, written: Tensor, dlogits: Tensor, axis: int, ignore_index: int,
    label_smoothing: float, lse_square_scale: float, softcap: float,
) -> None:
    """Finish the dlogits of ``xent_triton::step``: if it was ``written`` for the upstream gradient
    ``scale``, rows whose ``grad`` equals ``scale`` are kept; every other row is recomputed (exactly,
    from the logits)."""
    rows = make_rows(logits, labels, target, weight, axis)
    _run(logits.device, "backward", rows, grad, stats.contiguous(), ignore_index, label_smoothing, lse_square_scale,
         softcap, dlogits.movedim(axis, -1), None, skip_scale=scale, written=written)


xent_backward_scaled = torch.library.custom_op("xent_triton::backward_scaled",
                                               mutates_args=("dlogits",))(_backward_scaled_impl)


@xent_backward_scaled.register_fake
def _(grad, logits, labels, target, weight, stats, scale, written, dlogits, axis, ignore_index, label_smoothing,
      lse_square_scale, softcap):
    return None


# ---------------------------------------------------------------------------------------------------
# Calls. Every caller in the package goes through these functions, not torch.ops.xent_triton.*: in
# eager mode, with plain tensors, they run the implementation directly. The dispatcher's round trip
# into a Python custom op (its autograd wrapper, argument defaults, dynamo guard) cost more host time
# than our own launch code (cProfile of a training step: 35%, perf/NOTES.md P14), and for small
# problems the host time is the time. Under torch.compile, fake or traced tensors (make_fx, export,
# torch.jit.trace), tensor subclasses or torch.func transforms they call the custom ops, which those need
# (torch.func.vmap runs through them; grad and vjp get torch's error, jvp ours: _refuse_forward_ad).

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None)
_functorch_level = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
_jit_tracing = getattr(torch._C, "_get_tracing_state", None)


def _direct(*tensors) -> bool:
    """Whether the implementation may run without the dispatcher (see above)."""
    if _dispatch_modes is None or _functorch_level is None or _jit_tracing is None:
        return False  # no way to tell; the custom op is always right
    # torch.jit.trace (and the TorchScript ONNX export) records ops: it must see the custom op, and under
    # it the implementation would get traced sizes where it expects ints.
    if torch.compiler.is_compiling() or _dispatch_modes() or _functorch_level() is not None or _jit_tracing():
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


_functorch_stack = getattr(getattr(torch._C, "_functorch", None), "get_interpreter_stack", None)


def _refuse_forward_ad(*tensors):
    """Raise under forward-mode AD, which has no formula here. The direct path's autograd.Function raises
    by itself; through the custom op, ``torch.func.jvp`` returned a zero tangent and ``forward_ad`` none."""
    if torch.compiler.is_compiling():
        return
    jvp = _functorch_stack is not None and any(
        i.key() == torch._C._functorch.TransformType.Jvp for i in (_functorch_stack() or ()))
    dual = torch.autograd.forward_ad._current_level >= 0 and any(
        t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    if jvp or dual:
        raise NotImplementedError("xent_triton: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is "
                                  "not supported; use reverse mode (loss.backward() or torch.autograd.grad)")


def forward(logits, labels, target, weight, axis, ignore_index, label_smoothing, lse_square_scale, softcap,
            loss_fp32, class_offset=0, n_classes=-1):
    """``xent_triton::forward``, differentiable: per-row (loss, lse) and the statistics (not differentiable)."""
    args = (logits, labels, target, weight, axis, ignore_index, label_smoothing, lse_square_scale, softcap,
            loss_fp32, class_offset, n_classes)
    if _direct(logits, labels, target, weight):
        return _ForwardFunction.apply(*args)
    _refuse_forward_ad(logits, labels)
    return torch.ops.xent_triton.forward(*args)


def forward_reduced(logits, labels, target, weight, axis, ignore_index, label_smoothing, lse_square_scale, softcap,
                    reduction, denom, out_dtype):
    """(``reduction`` of ``xent_triton::forward``'s fp32 loss cast to ``out_dtype``, per-row lse), differentiable.

    ``denom`` is the ``mean``'s denominator (reduction.mean_denominator), None for ``sum``."""
    if _direct(logits, labels, target, weight, denom if isinstance(denom, Tensor) else None):
        return _ReducedFunction.apply(logits, labels, target, weight, (axis, ignore_index, label_smoothing,
                                      lse_square_scale, softcap, reduction, out_dtype), denom)
    loss, lse, _qsum = forward(logits, labels, target, weight, axis, ignore_index, label_smoothing, lse_square_scale,
                               softcap, True)
    return reduce_rows(loss, reduction, denom=denom, out_dtype=out_dtype), lse


def backward(grad, logits, labels, target, weight, stats, axis, ignore_index, label_smoothing,
             lse_square_scale, softcap, need_dlogits, need_dlabels, class_offset=0, n_classes=-1):
    """``xent_triton::backward``: (dlogits, dlabels)."""
    args = (grad, logits, labels, target, weight, stats, axis, ignore_index, label_smoothing,
            lse_square_scale, softcap, need_dlogits, need_dlabels, class_offset, n_classes)
    if _direct(grad, logits, labels, target, weight, stats):
        return _backward_impl(*args)
    return torch.ops.xent_triton.backward(*args)


def backward_inplace(grad, logits, labels, target, weight, stats, axis, ignore_index, label_smoothing,
                     lse_square_scale, softcap, need_dlabels):
    """``xent_triton::backward_inplace``: dlogits over ``logits``; returns dlabels."""
    args = (grad, logits, labels, target, weight, stats, axis, ignore_index, label_smoothing,
            lse_square_scale, softcap, need_dlabels)
    if _direct(grad, logits, labels, target, weight, stats):
        out = _backward_inplace_impl(*args)
        torch.autograd.graph.increment_version(logits)  # as the op's declared mutation does
        return out
    return torch.ops.xent_triton.backward_inplace(*args)


def step(logits, labels, target, weight, axis, ignore_index, label_smoothing, lse_square_scale, softcap,
         loss_fp32, scale):
    """``xent_triton::step``: (loss, lse, stats, dlogits, written); not differentiable."""
    args = (logits, labels, target, weight, axis, ignore_index, label_smoothing, lse_square_scale, softcap,
            loss_fp32, scale)
    if _direct(logits, labels, target, weight, scale):
        return _step_impl(*args)
    return torch.ops.xent_triton.step(*args)


def backward_scaled(grad, logits, labels, target, weight, stats, scale, written, dlogits, axis, ignore_index,
                    label_smoothing, lse_square_scale, softcap):
    """``xent_triton::backward_scaled``: finishes the fused step's ``dlogits`` in place."""
    args = (grad, logits, labels, target, weight, stats, scale, written, dlogits, axis, ignore_index,
            label_smoothing, lse_square_scale, softcap)
    if _direct(grad, logits, labels, target, weight, stats, scale, written, dlogits):
        _backward_scaled_impl(*args)
        torch.autograd.graph.increment_version(dlogits)
        return None
    return torch.ops.xent_triton.backward_scaled(*args)
