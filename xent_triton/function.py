"""The loss's one ``torch.autograd.Function``, its reductions and its double backward.

:class:`CrossEntropyFunction` runs a prepared call (xent_triton/prepare.py): the per-row forward,
torch's reduction of it, and the backward, all through ``call.backend``. It serves every eager
call of the public functions, per-row or reduced, with the in-place mode as a flag. The custom ops
(xent_triton/ops.py) serve the calls the dispatcher must see, with the same backends, reductions
and double backward.

Saved for backward: the inputs and the O(rows) statistics (layout.stats_shape), never an N x V
intermediate.
"""
import torch
from torch import Tensor

from . import prepare


def mean_denominator(n_rows, target, ignore_index, weight):
    """torch's ``mean`` divisor: the sum of ``weight[target]`` over non-ignored rows for class indices
    (their count without weights), a device tensor computed without a host sync; the number of rows
    (an int) for probabilities."""
    if target is None:
        return n_rows
    active = target != ignore_index
    if weight is None:
        return active.sum()
    # Clamp only to gather safely; out-of-range rows are already NaN.
    w_t = weight.gather(0, target.long().clamp(0, weight.shape[0] - 1).reshape(-1)).view(target.shape)
    return (w_t * active).sum()


def divide(total, denom, out_dtype=None):
    """``total / denom`` in ``total``'s dtype, as if ``denom`` were cast first, rounded to ``out_dtype``
    (default: ``total``'s). Type promotion already gives ``total``'s dtype for a count or a narrower
    weight sum; a wider one (float64 weights with a float32 loss) is cast."""
    if isinstance(denom, Tensor) and denom.is_floating_point() and denom.dtype.itemsize > total.dtype.itemsize:
        denom = denom.to(total.dtype)
    if out_dtype is None or out_dtype == total.dtype:
        return total / denom
    if torch.is_grad_enabled():
        return (total / denom).to(out_dtype)
    # Outside autograd (CrossEntropyFunction.forward) the rounding is the division's own store: one kernel.
    return torch.div(total, denom, out=torch.empty((), dtype=out_dtype, device=total.device))


def reduce(loss, reduction, denom, out_dtype):
    """torch's ``reduction`` of the per-row ``loss``, with the ``mean``'s ``denom``, rounded once to
    ``out_dtype``."""
    if reduction == "sum":
        total = loss.sum()
    elif reduction == "mean":
        return divide(loss.sum(), denom, out_dtype)
    else:
        total = loss
    return total if total.dtype == out_dtype else total.to(out_dtype)


def row_grads(grad, reduction, denom, n_rows, dtype):
    """The per-row gradient a reduced loss's ``grad`` gives, as autograd of the composition would:
    cast, divided by the ``mean``'s denominator, expanded."""
    if reduction == "none":
        return grad
    g = grad.to(dtype)
    return (divide(g, denom) if reduction == "mean" else g).expand(n_rows)


def to_inputs(dx, dy, logits, labels, axis):
    """The kernels' class-last gradients as gradients of ``logits`` and ``labels``: the class axis
    moved back, and dlabels summed over the axes the labels were broadcast along."""
    if dx is not None and axis != logits.dim() - 1:
        dx = dx.movedim(-1, axis)
    if dy is not None:
        if axis != logits.dim() - 1:
            dy = dy.movedim(-1, axis)
        if tuple(labels.shape) != tuple(logits.shape):
            dy = dy.sum_to_size(labels.shape).to(labels.dtype)
    return dx, dy


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


def second_order(first, grad_rows, logits, labels, target, weight, axis, options):
    """(dlogits, dlabels) for ``create_graph=True``: the values of ``first`` (the kernels' gradients,
    None where not asked for), differentiable with respect to the inputs and the per-row upstream
    gradient ``grad_rows``, so that a second derivative (a gradient penalty, a Hessian-vector product)
    goes through them. The per-row loss is computed again in the torch fallback's ops, the same
    formulas, and autograd differentiates it."""
    from . import torch_backend
    from .layout import make_rows

    wanted = [t for t, value in zip((logits, labels), first) if value is not None]
    with torch.enable_grad(), torch.autocast(logits.device.type, enabled=False):
        layout, x, y, t, w = make_rows(logits, labels, target, weight, axis)
        rows = torch_backend.Rows(layout, x, y, t, w)
        loss = torch_backend.forward_rows(rows, *options, layout.acc)[0]
        if layout.n_rows == 0:
            diffs = [u * 0 for u in wanted]  # empty: nothing to differentiate, but a graph to go through
        else:
            diffs = torch.autograd.grad(loss, wanted, grad_rows.reshape(-1).to(layout.acc), create_graph=True,
                                        materialize_grads=True)
    diffs = iter(diffs)
    return tuple(None if value is None else _KernelValues.apply(value, next(diffs).to(value.dtype))
                 for value in first)


def run_forward(call, logits, target, weight):
    """The forward of a prepared ``call`` (prepare.Call), outside autograd: (loss reduced as
    ``call.reduction`` says, per-row lse, row statistics, the ``mean``'s denominator or None). A call
    that needs no gradient runs this alone; CrossEntropyFunction's forward runs it for the others."""
    labels, index = (None, target) if call.hard else (target, None)
    if call.as_is:
        x, y, t, w = logits, labels, index, weight
    else:
        x, y, t, w = call.views(logits, labels, index, weight)
    loss, lse, stats = call.backend.forward(call.forward_plan, x, y, t, w)
    if call.batch_view is not None:
        loss, lse = loss.view(call.batch_view), lse.view(call.batch_view)
    denom = None
    if call.reduction == "mean":
        denom = mean_denominator(call.layout.n_rows, t, call.options[0], w)
    return reduce(loss, call.reduction, denom, call.out_dtype), lse, stats, denom


class CrossEntropyFunction(torch.autograd.Function):
    """``loss, lse = CrossEntropyFunction.apply(logits, target, weight, call)``: the loss of a prepared
    ``call`` (prepare.Call), reduced as ``call.reduction`` says, and the per-row lse (not
    differentiable). ``target`` holds class indices or the soft labels (``call.hard``).

    In the in-place mode (``call.inplace``) the backward writes dlogits over the logits' storage: a
    training step then needs O(rows) extra memory instead of a dlogits tensor. The forward bumps the
    logits' version counter at once, so an upstream op that saved the logits (or the tensor they view)
    for its own backward raises autograd's in-place error instead of later reading gradients in place
    of logits (Liger #272, Megatron-LM #1627). ``mark_dirty`` is not used: it forbids returning more
    than one output when the logits are a view (``logits.view(-1, V)``).
    """

    @staticmethod
    def forward(ctx, logits, target, weight, call):
        out, lse, stats, denom = run_forward(call, logits, target, weight)
        ctx.call = call
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse)
        if call.backward_plan is None:
            return out, lse
        if call.inplace:
            base = logits._base if logits._base is not None else logits
            if base.is_leaf:
                # torch's own rule for in-place ops: the gradient would overwrite a leaf's values.
                raise RuntimeError("inplace_backward: a leaf Variable that requires grad (or a view of one) cannot "
                                   "hold its own gradient; pass the output of an op, e.g. the lm head's logits")
            # Held directly, not saved: saving would make our own backward trip on the version bump below.
            ctx.logits = logits
            torch.autograd.graph.increment_version(logits)
            ctx.save_for_backward(None, target, weight, stats, denom if isinstance(denom, Tensor) else None)
        else:
            ctx.save_for_backward(logits, target, weight, stats, denom if isinstance(denom, Tensor) else None)
        ctx.host_denom = denom if not isinstance(denom, Tensor) else None
        return out, lse

    @staticmethod
    def backward(ctx, grad, _grad_lse):
        call = ctx.call
        need_dx, need_dy = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and not call.hard
        if grad is None or not (need_dx or need_dy):
            return None, None, None, None
        logits, target, weight, stats, denom = ctx.saved_tensors
        if call.inplace:
            logits, ctx.logits = ctx.logits, None
            if logits is None:
                raise RuntimeError("inplace_backward: the logits were already overwritten by an earlier backward "
                                   "(retain_graph=True is not supported in this mode)")
        if denom is None:
            denom = ctx.host_denom
        labels, index = (None, target) if call.hard else (target, None)
        if torch.is_grad_enabled():  # create_graph=True: a gradient that can be differentiated again
            return _differentiable_backward(ctx, call, grad, logits, labels, index, weight, stats, denom,
                                            need_dx, need_dy)
        if not prepare.direct(grad, logits, target, weight, stats):
            # Compiled autograd, fake tensors and subclasses need the custom op.
            g = row_grads(grad, call.reduction, denom, stats.shape[0], stats.dtype)
            dx, dy = torch.ops.xent_triton.backward(g, logits, labels, index, weight, stats, call.axis,
                                                    *call.options, need_dx, need_dy)
            return (dx if need_dx else None), (dy if need_dy else None), None, None
        if call.as_is:
            x, y, t, w = logits, labels, index, weight
        else:
            x, y, t, w = call.views(logits, labels, index, weight)
        if call.reduction == "mean" and not call.hard:
            # A row count is a host number: the composition's gradient, as autograd divides by it.
            grad, denom = divide(grad.to(stats.dtype), denom), None
        dx, dy = call.backend.backward(call.backward_plan, x, y, t, w, grad, stats, denom)
        if call.inplace:
            torch.autograd.graph.increment_version(logits)  # as an in-place op's write does
            dx = logits  # written through its own strides: no axis to move back
            if dy is not None:
                dy = to_inputs(None, dy, logits, labels, call.axis)[1]
        elif call.axis != logits.dim() - 1 or (dy is not None and labels.shape != logits.shape):
            dx, dy = to_inputs(dx, dy, logits, labels, call.axis)
        return (dx if need_dx else None), (dy if need_dy else None), None, None


def _differentiable_backward(ctx, call, grad, logits, labels, index, weight, stats, denom, need_dx, need_dy):
    if call.inplace:
        raise RuntimeError("xent_triton: double backward (create_graph=True) is not supported with "
                           "inplace_backward=True: the backward overwrites the logits it would need")
    with torch.no_grad():
        first = CrossEntropyFunction.backward(ctx, grad.detach(), None)[:2]
    g = row_grads(grad, call.reduction, denom, stats.shape[0], stats.dtype)
    first = (first[0] if need_dx else None, first[1] if need_dy else None)
    dx, dy = second_order(first, g, logits, labels, index, weight, call.axis, call.options)
    return dx, dy, None, None
