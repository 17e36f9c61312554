"""Public ``torch.autograd.Function`` classes.

``SoftmaxCrossEntropyWithLogits`` wires the forward and backward kernels for
TF's soft-label loss; the functional API reaches the same kernels through the
custom op's autograd (``ops.forward``: the op itself under torch.compile, a direct call in eager).
``InplaceGradCrossEntropy`` is the in-place memory mode, and
``FusedStepCrossEntropy`` the fused training step of reduced losses.
"""
import torch

from . import ops
from .ops import loss_dtype_of


class SoftmaxCrossEntropyWithLogits(torch.autograd.Function):
    """``loss = SoftmaxCrossEntropyWithLogits.apply(labels, logits, axis)``.

    Inputs are assumed validated (see :func:`xent_triton.softmax_cross_entropy_with_logits`);
    ``axis`` may be negative. Under autocast the loss is float32, as in the functional API.
    """

    @staticmethod
    def forward(ctx, labels, logits, axis):
        axis = axis % logits.dim()
        fp32 = torch.is_autocast_enabled(logits.device.type)
        loss, _lse, stats = ops.forward(logits, labels, None, None, axis, -100, 0.0, 0.0, 0.0, fp32)
        ctx.save_for_backward(labels, logits, stats)
        ctx.axis = axis
        return loss.to(loss_dtype_of(logits, fp32))

    @staticmethod
    def backward(ctx, grad):
        labels, logits, stats = ctx.saved_tensors
        need_dy, need_dx = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():  # create_graph=True: a gradient that can be differentiated again
            with torch.no_grad():
                first = SoftmaxCrossEntropyWithLogits.backward(ctx, grad.detach())
            dlogits, dlabels = ops._second_order((first[1], first[0]), grad, logits, labels, None, None, ctx.axis,
                                                 -100, 0.0, 0.0, 0.0, need_dx, need_dy)
            return dlabels, dlogits, None
        dlogits, dlabels = ops.backward(
            grad, logits, labels, None, None, stats, ctx.axis, -100, 0.0, 0.0, 0.0, need_dx, need_dy)
        return (dlabels if need_dy else None), (dlogits if need_dx else None), None


class InplaceGradCrossEntropy(torch.autograd.Function):
    """Cross entropy whose backward writes dlogits over the logits' storage.

    A training step then needs O(rows) extra memory instead of a dlogits tensor,
    and moves the same bytes as the default path. The forward bumps the logits'
    version counter at once, so an upstream op that saved the logits (or the
    tensor they view) for its own backward raises autograd's in-place error
    instead of later reading gradients in place of logits (Liger #272,
    Megatron-LM #1627). ``mark_dirty`` is not used: it forbids returning more
    than one output when the logits are a view (``logits.view(-1, V)``).
    """

    @staticmethod
    def forward(ctx, logits, labels, target, weight, axis, ignore_index, label_smoothing, lse_square_scale,
                softcap, loss_fp32):
        loss, lse, stats = ops.forward(
            logits, labels, target, weight, axis, ignore_index, label_smoothing, lse_square_scale, softcap,
            loss_fp32)
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(labels, target, weight, stats)
        # Held directly, not saved: saving would make our own backward trip on the version bump below.
        ctx.logits = logits
        torch.autograd.graph.increment_version(logits)
        ctx.params = (axis, ignore_index, label_smoothing, lse_square_scale, softcap)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        if torch.is_grad_enabled():
            raise RuntimeError("xent_triton: double backward (create_graph=True) is not supported with "
                               "inplace_backward=True: the backward overwrites the logits it would need")
        logits = ctx.logits
        if logits is None:
            raise RuntimeError("inplace_backward: the logits were already overwritten by an earlier backward "
                               "(retain_graph=True is not supported in this mode)")
        ctx.logits = None
        labels, target, weight, stats = ctx.saved_tensors
        need_dy = ctx.needs_input_grad[1]
        dlabels = ops.backward_inplace(
            grad_loss, logits, labels, target, weight, stats, *ctx.params, need_dy)
        return (logits, dlabels if need_dy else None) + (None,) * 8


class FusedStepCrossEntropy(torch.autograd.Function):
    """Cross entropy whose forward also writes dlogits (kernels/xent_step.py).

    The forward does not know the upstream gradient, so it writes dlogits for
    ``scale``, the gradient each row gets when the reduced loss itself is
    backpropagated with gradient 1 (1 for ``sum``, 1/denominator for ``mean``).
    The backward keeps those rows and recomputes any other (a scaled loss, a
    GradScaler), so the result is always exact; after such a backward the
    forward stops writing dlogits on that device (kernels/xent_step.py).

    dlogits is held on ``ctx``, not saved: handing autograd the only reference
    lets it become ``.grad`` without a copy. A second backward through a retained
    graph recomputes it from the saved logits.
    """

    @staticmethod
    def forward(ctx, logits, labels, target, weight, axis, ignore_index, label_smoothing, lse_square_scale,
                softcap, loss_fp32, scale):
        params = (axis, ignore_index, label_smoothing, lse_square_scale, softcap)
        loss, lse, stats, dlogits, written = ops.step(logits, labels, target, weight, *params, loss_fp32, scale)
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(logits, labels, target, weight, stats, scale, written)
        ctx.dlogits = dlogits
        ctx.params = params
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        logits, labels, target, weight, stats, scale, written = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient that can be differentiated again
            with torch.no_grad():
                first = FusedStepCrossEntropy.backward(ctx, grad_loss.detach(), None)[0]
            dlogits = ops._second_order((first, None), grad_loss, logits, labels, target, weight, *ctx.params,
                                        True, False)[0]
            return (dlogits,) + (None,) * 10
        dlogits, ctx.dlogits = ctx.dlogits, None
        if dlogits is None:
            dlogits, _ = ops.backward(grad_loss, logits, labels, target, weight, stats, *ctx.params, True, False)
        else:
            ops.backward_scaled(grad_loss, logits, labels, target, weight, stats, scale, written, dlogits,
                                *ctx.params)
        return (dlogits,) + (None,) * 10
