"""The public functional API."""
import torch

from . import validation as v
from . import launch_config
from .function import FusedStepCrossEntropy, InplaceGradCrossEntropy
from .layout import check_inplace, make_rows
from .ops import loss_dtype_of

# An ignore_index that no class index can equal: TF's sparse loss ignores nothing.
_NEVER = -(2**63)


def _autocast_on(t: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(t.device.type)


def _per_row(logits, labels, target, weight, axis, ignore_index, label_smoothing, lse_square_scale, softcap,
             loss_fp32, inplace_backward, step_scale=None):
    """(loss, lse) per row through the custom op, the in-place mode, or (``step_scale`` given) the fused step."""
    args = (logits, labels, target, weight, axis, int(ignore_index), float(label_smoothing),
            float(lse_square_scale), float(softcap or 0.0), loss_fp32)
    if step_scale is not None:
        return FusedStepCrossEntropy.apply(*args, step_scale)
    if inplace_backward and torch.is_grad_enabled() and logits.requires_grad:
        base = logits._base if logits._base is not None else logits
        if base.is_leaf:
            # torch's own rule for in-place ops: the gradient would overwrite a leaf's values.
            raise RuntimeError("inplace_backward: a leaf Variable that requires grad (or a view of one) cannot "
                               "hold its own gradient; pass the output of an op, e.g. the lm head's logits")
        check_inplace(make_rows(logits, labels, target, weight, axis), logits, axis)
        return InplaceGradCrossEntropy.apply(*args)
    loss, lse, _qsum = torch.ops.xent_triton.forward(*args)
    return loss, lse


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
    v.check_logits(logits)
    axis = v.normalize_axis(axis, logits.dim())
    v.check_soft_labels(labels, logits, axis)
    v.check_same_device(labels=labels, logits=logits)
    v.check_classes(logits, axis)
    loss, _ = _per_row(logits, labels, None, None, axis, -100, 0.0, 0.0, None, _autocast_on(logits),
                       inplace_backward)
    return loss


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
    v.check_logits(logits)
    axis = logits.dim() - 1
    v.check_index_target(labels, logits, axis, name="labels")
    v.check_same_device(labels=labels, logits=logits)
    v.check_classes(logits, axis)
    loss, _ = _per_row(logits, None, labels, None, axis, _NEVER, 0.0, 0.0, None, _autocast_on(logits),
                       inplace_backward)
    return loss


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
                  lse_square_scale=0.0, softcap=None, return_lse=False, inplace_backward=False):
    r"""A drop-in for :func:`torch.nn.functional.cross_entropy`, fused.

    Same arguments and results as torch: ``input`` is ``(C,)``, ``(N, C)`` or
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
    axis, hard = v.check_cross_entropy_target(input, target, ignore_index)
    v.check_same_device(input=input, target=target, weight=weight)
    v.check_classes(input, axis, "input")
    C = input.shape[axis]
    v.check_weight(weight, C)
    v.check_options(reduction, label_smoothing, softcap)

    autocast = _autocast_on(input)
    out_dtype = loss_dtype_of(input, autocast)
    # Reductions sum the fp32 per-row losses and round once.
    loss_fp32 = autocast or reduction != "none"
    index_target = target if hard else None
    n_rows = input.numel() // C if C else 0
    denom = _mean_denominator(n_rows, index_target, ignore_index, weight) if reduction == "mean" else None
    step_scale = None
    if _takes_fused_step(input, None if hard else target, n_rows, C, reduction, inplace_backward):
        loss_dtype = loss_dtype_of(input, loss_fp32)
        # The gradient autograd will hand each row when the reduced loss gets gradient 1:
        # the same division as in reduce_rows, so that the two compare equal.
        step_scale = torch.ones((), dtype=loss_dtype, device=input.device)
        if denom is not None:
            step_scale = step_scale / (denom.to(loss_dtype) if isinstance(denom, torch.Tensor) else denom)
    loss, lse = _per_row(input, None if hard else target, index_target, weight, axis, ignore_index,
                         label_smoothing, lse_square_scale, softcap, loss_fp32, inplace_backward, step_scale)
    loss = reduce_rows(loss, reduction, index_target, ignore_index, weight, denom)
    loss = loss.to(out_dtype)
    return (loss, lse.detach()) if return_lse else loss


def _takes_fused_step(input, soft_target, n_rows, V, reduction, inplace_backward) -> bool:
    """The fused step (dlogits written by the forward) pays off only when the upstream gradient is
    known in advance (a reduced loss), and runs in eager mode only: a compiled graph gets the
    two custom ops, which it can schedule and capture freely."""
    launch_config.fused_step_mode()  # a bad XENT_TRITON_FUSED_STEP raises on every call, not only here
    if reduction == "none" or inplace_backward or not (torch.is_grad_enabled() and input.requires_grad):
        return False
    if soft_target is not None and soft_target.requires_grad:
        return False
    if torch.compiler.is_compiling() or _saved_tensor_hooks_active():
        return False
    return launch_config.use_fused_step(n_rows, V, input.element_size(), input.device, hard=soft_target is None)


def _saved_tensor_hooks_active() -> bool:
    """Under activation checkpointing (non-reentrant) or ``save_on_cpu``, saved tensors are freed or
    moved, but the fused step's dlogits is held on ctx, outside those hooks: it would stay on the
    device for the whole forward, and a checkpoint's recompute would write it again for nothing.
    torch has no public query; without the private one, assume hooks are active."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, TypeError, RuntimeError):
        return True


def _mean_denominator(n_rows, target, ignore_index, weight):
    """torch's ``mean`` divisor: the sum of ``weight[target]`` over non-ignored rows for class
    indices (their count without weights), a device tensor computed without a host sync; the
    number of rows (an int) for probabilities."""
    if target is None:
        return n_rows
    active = target != ignore_index
    if weight is None:
        return active.sum()
    # Clamp only to gather safely; out-of-range rows are already NaN.
    C = weight.shape[0]
    w_t = weight.gather(0, target.long().clamp(0, C - 1).reshape(-1)).view(target.shape)
    return (w_t * active).sum()


def reduce_rows(loss, reduction, target=None, ignore_index=-100, weight=None, denom=None):
    """torch's reductions of a per-row loss (see _mean_denominator). No host sync."""
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    if denom is None:
        denom = _mean_denominator(loss.numel(), target, ignore_index, weight)
    return loss.sum() / (denom.to(loss.dtype) if isinstance(denom, torch.Tensor) else denom)
