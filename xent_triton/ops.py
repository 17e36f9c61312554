"""The ``torch.library`` custom ops, for the calls the dispatcher must see.

torch.compile, torch.export, fake and traced tensors, tensor subclasses and torch.func transforms need
ops with schemas (prepare.direct tells which calls). These are them:

* ``xent_triton::forward`` returns the per-row loss and lse, and the O(rows) statistics the backward
  reads (layout.stats_shape). Its autograd formula (registered here) calls
* ``xent_triton::backward``: (dlogits, dlabels).

Both have fake implementations, so torch.compile traces them without a graph break, and both choose
their backend (Triton or the torch fallback) when they run, from xent_triton.config. They run the same
backends, reductions and double backward as the eager route (function.CrossEntropyFunction).

:func:`loss` is the public functions' route through them. :func:`forward` and :func:`backward` are the
calls the package's own autograd Functions make (linear.py, distributed.py): the implementation itself
for direct calls, the op otherwise.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import prepare
from .dtypes import acc_dtype, dlabels_dtype, row_loss_dtype
from .function import mean_denominator, reduce, second_order, to_inputs
from .layout import batch_shape, check_inplace, grad_buffer_shape, make_rows, stats_shape


def _on_device(device: torch.device, fn, *args):
    """Run ``fn`` with ``device`` the current CUDA device: Triton launches on the current device, not on
    the tensors', whose addresses would be read in another GPU's context (torch's own ops guard the
    same way; prepare sends such calls here)."""
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            return fn(*args)
    return fn(*args)


def _forward_impl(
    logits: Tensor, labels: Optional[Tensor], target: Optional[Tensor], weight: Optional[Tensor],
    axis: int, ignore_index: int, label_smoothing: float, lse_square_scale: float, softcap: float,
    loss_fp32: bool, class_offset: int = 0, n_classes: int = -1,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row (loss, lse) of the logits' batch shape, and the (rows, 3) statistics. ``class_offset``/
    ``n_classes`` describe a vocabulary shard."""
    layout, x, y, t, w = make_rows(logits, labels, target, weight, axis, class_offset, n_classes)
    backend = prepare.backend_for(logits.device)
    options = (ignore_index, label_smoothing, lse_square_scale, softcap)
    plan = backend.plan_forward(layout, options, (x.dtype, None if y is None else y.dtype),
                                row_loss_dtype(logits.dtype, None if labels is None else labels.dtype, loss_fp32),
                                t is not None, w is not None, logits.device)
    loss, lse, stats = _on_device(logits.device, backend.forward, plan, x, y, t, w)
    if len(layout.batch_shape) != 1:
        loss, lse = loss.view(layout.batch_shape), lse.view(layout.batch_shape)
    return loss, lse, stats


xent_forward = torch.library.custom_op("xent_triton::forward", mutates_args=())(_forward_impl)


@xent_forward.register_fake
def _(logits, labels, target, weight, axis, ignore_index, label_smoothing, lse_square_scale, softcap, loss_fp32,
      class_offset=0, n_classes=-1):
    shape = batch_shape(logits.shape, axis)
    stat = acc_dtype(logits.dtype, labels.dtype if labels is not None else logits.dtype)
    loss_dtype = row_loss_dtype(logits.dtype, None if labels is None else labels.dtype, loss_fp32)
    return (logits.new_empty(shape, dtype=loss_dtype), logits.new_empty(shape, dtype=stat),
            logits.new_empty(stats_shape(math.prod(shape)), dtype=stat))


def _backward_impl(
    grad: Tensor, logits: Tensor, labels: Optional[Tensor], target: Optional[Tensor], weight: Optional[Tensor],
    stats: Tensor, axis: int, ignore_index: int, label_smoothing: float, lse_square_scale: float,
    softcap: float, need_dlogits: bool, need_dlabels: bool, class_offset: int = 0, n_classes: int = -1,
) -> Tuple[Tensor, Tensor]:
    """(dlogits, dlabels) from the forward's ``stats``; a gradient not asked for comes back as an empty tensor."""
    layout, x, y, t, w = make_rows(logits, labels, target, weight, axis, class_offset, n_classes)
    backend = prepare.backend_for(logits.device)
    options = (ignore_index, label_smoothing, lse_square_scale, softcap)
    plan = backend.plan_backward(layout, options, (x.dtype, None if y is None else y.dtype), t is not None,
                                 w is not None, need_dlogits, need_dlabels,
                                 dlabels_dtype(logits, labels) if need_dlabels else None, False, False,
                                 logits.device)
    # The op's statistics come back contiguous, as the kernels read them, unless a compiler laid them out anew.
    dx, dy = _on_device(logits.device, backend.backward, plan, x, y, t, w, grad, stats.contiguous())
    dx, dy = to_inputs(dx, dy, logits, labels, axis)
    return (logits.new_empty(0) if dx is None else dx), (logits.new_empty(0) if dy is None else dy)


xent_backward = torch.library.custom_op("xent_triton::backward", mutates_args=())(_backward_impl)


@xent_backward.register_fake
def _(grad, logits, labels, target, weight, stats, axis, ignore_index, label_smoothing, lse_square_scale,
      softcap, need_dlogits, need_dlabels, class_offset=0, n_classes=-1):
    shape = grad_buffer_shape(logits.shape, axis)
    dx = torch.empty(shape, dtype=logits.dtype, device=logits.device) if need_dlogits else None
    dy = torch.empty(shape, dtype=dlabels_dtype(logits, labels), device=logits.device) if need_dlabels else None
    dx, dy = to_inputs(dx, dy, logits, labels, axis)
    return (logits.new_empty(0) if dx is None else dx), (logits.new_empty(0) if dy is None else dy)


def _setup_context(ctx, inputs, output):
    logits, labels, target, weight, axis, ignore_index, label_smoothing, z, softcap, _fp32, offset, n_classes = inputs
    _loss, lse, stats = output
    ctx.save_for_backward(logits, labels, target, weight, stats)
    ctx.params = (axis, ignore_index, label_smoothing, z, softcap)
    ctx.shard = (offset, n_classes)
    ctx.mark_non_differentiable(lse, stats)


def _backward_formula(ctx, grad_loss, _grad_lse, _grad_stats):
    logits, labels, target, weight, stats = ctx.saved_tensors
    need_dx, need_dy = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_loss is None or not (need_dx or need_dy):
        return (None,) * 12
    if torch.is_grad_enabled():  # create_graph=True
        if ctx.shard[1] != -1:  # a vocabulary shard's loss is not the loss: its second derivative is not ours
            raise RuntimeError("xent_triton: double backward (create_graph=True through the vocabulary-parallel "
                               "loss) is not supported")
        with torch.no_grad():
            first = _backward_formula(ctx, grad_loss.detach(), None, None)[:2]
        axis, *options = ctx.params
        return second_order(first, grad_loss, logits, labels, target, weight, axis, options) + (None,) * 10
    dlogits, dlabels = backward(grad_loss, logits, labels, target, weight, stats, *ctx.params, need_dx, need_dy,
                                *ctx.shard)
    return (dlogits if need_dx else None, dlabels if need_dy else None) + (None,) * 10


torch.library.register_autograd("xent_triton::forward", _backward_formula, setup_context=_setup_context)


_functorch_stack = getattr(getattr(torch._C, "_functorch", None), "get_interpreter_stack", None)


def _refuse_forward_ad(*tensors):
    """Raise under forward-mode AD, which has no formula here. The eager route's autograd.Function raises
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


def loss(call, input, target, weight):
    """(loss, lse) of a prepared ``call`` (prepare.Call) through the custom ops: the route of the calls
    the dispatcher must see. The in-place mode does not apply here (the ops compute dlogits out of
    place, with the same values)."""
    labels, index = (None, target) if call.hard else (target, None)
    _refuse_forward_ad(input, labels)
    per_row, lse, _ = torch.ops.xent_triton.forward(input, labels, index, weight, call.axis, *call.options,
                                                    call.loss_fp32)
    denom = None
    if call.reduction == "mean":
        denom = mean_denominator(per_row.numel(), index, call.options[0], weight)
    return reduce(per_row, call.reduction, denom, call.out_dtype), lse


def forward(logits, labels, target, weight, axis, ignore_index, label_smoothing, lse_square_scale, softcap,
            loss_fp32, class_offset=0, n_classes=-1):
    """``xent_triton::forward``, for the package's own autograd Functions (no autograd of its own in
    eager mode): per-row (loss, lse) and the statistics."""
    args = (logits, labels, target, weight, axis, ignore_index, label_smoothing, lse_square_scale, softcap,
            loss_fp32, class_offset, n_classes)
    if prepare.direct(logits, labels, target, weight):
        return _forward_impl(*args)
    return torch.ops.xent_triton.forward(*args)


def backward(grad, logits, labels, target, weight, stats, axis, ignore_index, label_smoothing,
             lse_square_scale, softcap, need_dlogits, need_dlabels, class_offset=0, n_classes=-1):
    """``xent_triton::backward``: (dlogits, dlabels)."""
    args = (grad, logits, labels, target, weight, stats, axis, ignore_index, label_smoothing,
            lse_square_scale, softcap, need_dlogits, need_dlabels, class_offset, n_classes)
    if prepare.direct(grad, logits, labels, target, weight, stats):
        return _backward_impl(*args)
    return torch.ops.xent_triton.backward(*args)


def backward_inplace(grad, logits, labels, target, weight, stats, axis, ignore_index, label_smoothing,
                     lse_square_scale, softcap):
    """dlogits written over ``logits`` (eager only: linear.py's chunks, which it owns)."""
    layout, x, y, t, w = make_rows(logits, labels, target, weight, axis)
    check_inplace(x, logits, axis)
    backend = prepare.backend_for(logits.device)
    plan = backend.plan_backward(layout, (ignore_index, label_smoothing, lse_square_scale, softcap),
                                 (x.dtype, None if y is None else y.dtype), t is not None, w is not None, True, False,
                                 None, False, True, logits.device)
    _on_device(logits.device, backend.backward, plan, x, y, t, w, grad, stats)
    torch.autograd.graph.increment_version(logits)
