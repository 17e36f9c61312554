"""The public functional API. Each function prepares its call (xent_triton/prepare.py) and runs it:
through function.CrossEntropyFunction in eager mode, through the custom ops (xent_triton/ops.py)
where the dispatcher must see the call."""
import math

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch.nn import _reduction

from . import ops, prepare
from . import validation as v
from .dtypes import INDEX_DTYPES, linear_compute_dtype
from .function import CrossEntropyFunction, run_forward
from .linear import LinearCrossEntropyFunction, default_chunk_rows


def softmax_cross_entropy_with_logits(labels, logits, axis=-1, *, inplace_backward=False):
    r"""Softmax cross entropy between ``logits`` and soft ``labels``, per example.

    The PyTorch counterpart of TensorFlow's ``tf.nn.softmax_cross_entropy_with_logits``:
    ``loss = -sum(labels * log_softmax(logits, axis), axis)``, fused into one pass.

    Args:
        labels (Tensor): floating tensor of the logits' shape, or broadcastable to it
            along non-class axes (e.g. ``(1, C)`` against ``(N, C)``; read with stride 0).
            Labels need not sum to 1 and may be negative; they receive a gradient when
            they require one.
        logits (Tensor): float16, bfloat16, float32 or float64 tensor of rank >= 1.
        axis (int): the class axis. Default: -1.
        inplace_backward (bool): write the gradient over ``logits`` in the backward pass,
            saving a dlogits tensor of memory (see the README). Default: False.

    Returns:
        Tensor of the logits' shape without ``axis`` (a scalar for rank-1 logits), in the
        logits' dtype (float32 under autocast), accumulated in float32 (float64 for
        float64 inputs).

    The gradient is the exact ``softmax * sum(labels) - labels``; TensorFlow's fused kernel
    returns ``softmax - labels``, which differs when the labels do not sum to 1.
    """
    call = prepare.softmax_cross_entropy_with_logits(labels, logits, axis, inplace_backward)
    return _run(call, logits, labels, None)[0]


def _run(call, input, target, weight, apply=CrossEntropyFunction.apply):
    """(loss, lse) of a prepared call: eager calls through the one autograd Function (``apply``), or without
    autograd where no gradient is asked for; the dispatcher's calls through the custom ops."""
    if not call.direct:
        return ops.loss(call, input, target, weight)
    if call.backward_plan is None and forward_ad._current_level < 0:
        return run_forward(call, input, target, weight)[:2]  # (dual tensors get the Function's error)
    return apply(input, target, weight, call)


class SoftmaxCrossEntropyFunction(CrossEntropyFunction):
    """``loss = SoftmaxCrossEntropyFunction.apply(labels, logits, axis)``: TF's soft-label loss as a
    ``torch.autograd.Function``, the same as :func:`softmax_cross_entropy_with_logits` (the one Function,
    with TF's argument order)."""

    @classmethod
    def apply(cls, labels, logits, axis=-1):
        call = prepare.softmax_cross_entropy_with_logits(labels, logits, axis, False)
        return _run(call, logits, labels, None, super().apply)[0]


def sparse_softmax_cross_entropy_with_logits(labels, logits, *, inplace_backward=False):
    r"""TensorFlow's ``tf.nn.sparse_softmax_cross_entropy_with_logits``.

    Args:
        labels (Tensor): int64 or int32 class indices of shape ``logits.shape[:-1]``.
        logits (Tensor): floating tensor ``(..., C)``.

    Returns:
        The per-example loss, of shape ``labels.shape``. An index outside ``[0, C)`` gives
        NaN for its row on the Triton path (as TF on GPU) and raises IndexError on the
        torch fallback (as TF on CPU).
    """
    call = prepare.sparse_softmax_cross_entropy_with_logits(labels, logits, inplace_backward)
    return _run(call, logits, labels, None)[0]


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                  label_smoothing=0.0, *, lse_square_scale=0.0, softcap=None, return_lse=False,
                  inplace_backward=False):
    r"""A drop-in for :func:`torch.nn.functional.cross_entropy`, fused.

    Same signature and results as torch (the deprecated ``size_average`` and ``reduce``
    included, in the same positions): ``input`` is ``(C,)``, ``(N, C)`` or
    ``(N, C, d1, ...)``; ``target`` holds class indices (int64 or int32, the input's shape
    without the class dim) or class probabilities (the input's shape). ``weight``,
    ``ignore_index`` (class indices only, as in torch) and ``label_smoothing`` follow torch's
    formulas, including its ``mean`` rule.

    Extra keyword arguments:
        lse_square_scale (float): adds the z-loss ``lse_square_scale * lse**2`` to each
            non-ignored row (PaLM). Default: 0.
        softcap (float, optional): apply ``softcap * tanh(input / softcap)`` to the logits
            first (Gemma 2); ``-inf`` stays ``-inf``. Default: None.
        return_lse (bool): also return the per-row log-sum-exp (detached; 0 on ignored rows).
        inplace_backward (bool): write the gradient over ``input`` in the backward pass,
            saving a dlogits tensor of memory (see the README). Default: False.

    Class indices outside ``[0, C)`` (other than ``ignore_index``) give NaN for their row
    on the Triton path and raise IndexError on the torch fallback.
    """
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)  # torch's rule, and its warning
    call = prepare.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale,
                                 softcap, inplace_backward)
    loss, lse = _run(call, input, target, weight)
    return (loss, lse.detach()) if return_lse else loss


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                         ignore_index=None, label_smoothing=0.0, lse_square_scale=0.0, softcap=None,
                         chunk_size=None, accum_dtype=None, options=None):
    r"""``cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` without the whole logits.

    A drop-in for torch's ``torch.nn.functional.linear_cross_entropy`` (torch >= 2.13: same
    arguments, values and dtypes; bad input gets this package's errors), that also runs on older
    torch. The rows are processed ``chunk_size`` at a time, so only one chunk's logits (and, in
    training, its gradient, written over them) is ever in memory; see ``xent_triton/linear.py``.

    Args:
        input (Tensor): ``(in_features,)``, ``(N, in_features)``, or ``(*, in_features)`` (any
            leading batch dims; torch's own accepts at most one).
        linear_weight (Tensor): ``(C, in_features)``, or ``(C, d1, ..., dK, in_features)`` for a
            K-dimensional loss (computed unchunked, through :func:`cross_entropy`).
        target (Tensor): class indices (int64 or int32) of shape ``input.shape[:-1]``, or class
            probabilities of shape ``input.shape[:-1] + (C,)`` (no gradient).
        linear_bias (Tensor, optional): ``(C,)`` (``(C, d1, ..., dK)`` for a K-dimensional loss).
        weight, reduction, label_smoothing: as in :func:`cross_entropy`.
        ignore_index (int, optional): as in :func:`cross_entropy`; ``None`` means -100 for class
            indices, and must be ``None`` for probabilities (as torch). Default: None.
        lse_square_scale, softcap: the extras of :func:`cross_entropy`.
        chunk_size (int, optional): rows per chunk. Default: the larger of 1024 and
            ``next_pow2(ceil(N / ceil(C / in_features)))`` (a chunk's logits the input's size); see
            ``linear.default_chunk_rows`` for why.
        accum_dtype (torch.dtype, optional): the dtype the weight gradient is summed over chunks
            in: the linear layer's dtype, or float32 for a half one. Default: float32 for
            half-precision weights (a ``(C, in_features)`` float32 buffer), else the weight's dtype.
            Pass the half dtype to sum in place. The bias gradient is always summed in float32
            (float64 for float64 weights).
        options: torch's ``LinearCrossEntropyOptions``; only its ``batch_chunk_size`` is used
            (xent_triton always chunks). Default: None.

    Returns:
        The loss: a scalar, or for ``reduction='none'`` one per row of shape ``input.shape[:-1]``;
        in the linear layer's dtype promoted with the probabilities' (float32 under autocast), as torch.

    Under ``torch.compile`` (and with fake tensors, tensor subclasses or torch.func) the loss is
    computed unchunked, as ``cross_entropy(F.linear(...))`` through the custom ops, so it compiles
    without a graph break. Gradients flow to ``input``, ``linear_weight`` and
    ``linear_bias``; double backward, and ``retain_graph=True`` with ``mean``/``sum``, raise.
    """
    v.check_float("input", input)
    v.check_float("linear_weight", linear_weight)
    v.check_tensor("target", target)
    if input.dim() < 1 or linear_weight.dim() < 2:
        raise ValueError(f"linear_cross_entropy needs input of at least 1 dim and linear_weight of at least 2, "
                         f"got input {tuple(input.shape)} and linear_weight {tuple(linear_weight.shape)}")
    in_features, C, out_features = input.shape[-1], linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    if linear_weight.shape[-1] != in_features:
        raise ValueError(f"input shape {tuple(input.shape)} and linear_weight shape {tuple(linear_weight.shape)} "
                         f"must end in the same in_features, got {in_features} and {linear_weight.shape[-1]}")
    if linear_bias is not None:
        v.check_float("linear_bias", linear_bias)
        if tuple(linear_bias.shape) != (C, *out_features):
            raise ValueError(f"linear_bias shape {tuple(linear_bias.shape)} must be {(C, *out_features)} "
                             f"for linear_weight shape {tuple(linear_weight.shape)}")
    v.check_same_device(input=input, linear_weight=linear_weight, target=target, linear_bias=linear_bias,
                        weight=weight)
    batch = tuple(input.shape[:-1])
    logits_shape = (*batch, C, *out_features)
    probabilities = tuple(target.shape) == logits_shape
    if probabilities and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    ignore_index = -100 if ignore_index is None else ignore_index
    v.check_options(reduction, label_smoothing, softcap, ignore_index, lse_square_scale)

    if out_features:
        # A K-dimensional loss softmaxes over C at each position: the chunked path does not apply.
        if len(batch) != 1:
            raise ValueError(f"a K-dimensional loss (linear_weight shape {tuple(linear_weight.shape)}) needs "
                             f"input of shape (N, {in_features}), got {tuple(input.shape)}")
        logits = F.linear(input, linear_weight.flatten(0, -2),
                          linear_bias.flatten() if linear_bias is not None else None).view(logits_shape)
        return cross_entropy(logits, target, weight, ignore_index=ignore_index, reduction=reduction,
                             label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, softcap=softcap)

    # Class last: the checks are those of cross_entropy on (rows, C) logits.
    if probabilities:
        v.check_float("target", target)
    else:
        if target.dtype.is_floating_point and tuple(target.shape) == batch:
            raise v.float_class_indices(target, input.shape, logits_shape)
        if target.dtype.is_floating_point:
            raise ValueError(f"probability target shape {tuple(target.shape)} must equal the logits' shape "
                             f"{logits_shape} (input shape {tuple(input.shape)}, {C} classes)")
        if target.dtype not in INDEX_DTYPES:
            raise TypeError(f"class-index target must be int64 or int32, got {target.dtype}")
        if tuple(target.shape) != batch:
            raise ValueError(f"target shape {tuple(target.shape)} does not match input shape "
                             f"{tuple(input.shape)}: expected {batch} (class indices) or {logits_shape} "
                             f"(probabilities)")
    v.check_weight(weight, C)
    if probabilities and target.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("linear_cross_entropy: gradients with respect to probability targets are not "
                                  "supported; pass target.detach()")
    cd = linear_compute_dtype(input, linear_weight, linear_bias)
    allowed = (None, cd) + ((torch.float32,) if cd in (torch.float16, torch.bfloat16) else ())
    if accum_dtype not in allowed:
        raise ValueError(f"accum_dtype must be None, the linear layer's dtype {cd}, or float32 for a half one; "
                         f"got {accum_dtype}")
    if chunk_size is None and options is not None:
        chunk_size = getattr(options, "batch_chunk_size", None)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")

    n = math.prod(batch)
    x = input.reshape(n, in_features)
    t = target.reshape(n, C) if probabilities else target.reshape(n)
    if not prepare.direct(x, linear_weight, linear_bias, t, weight):
        # torch.compile, fake tensors, subclasses: the unchunked composition, through the custom ops.
        loss = cross_entropy(F.linear(x, linear_weight, linear_bias), t, weight, ignore_index=ignore_index,
                             reduction=reduction, label_smoothing=label_smoothing,
                             lse_square_scale=lse_square_scale, softcap=softcap)
    else:
        chunk = chunk_size or default_chunk_rows(n, C, in_features)
        params = (int(ignore_index), reduction, float(label_smoothing), float(lse_square_scale), softcap, chunk,
                  accum_dtype, torch.is_grad_enabled())
        loss = LinearCrossEntropyFunction.apply(x, linear_weight, linear_bias, t, weight, params)
    return loss.view(batch) if reduction == "none" else loss
