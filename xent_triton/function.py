"""Public ``torch.autograd.Function`` classes.

``SoftmaxCrossEntropyWithLogits`` wires the forward and backward kernels for
TF's soft-label loss; the functional API reaches the same kernels through the
custom op (with its registered autograd), which torch.compile can trace.
``InplaceGradCrossEntropy`` is the in-place memory mode.
"""
import torch


class SoftmaxCrossEntropyWithLogits(torch.autograd.Function):
    """``loss = SoftmaxCrossEntropyWithLogits.apply(labels, logits, axis)``.

    Inputs are assumed validated (see :func:`xent_triton.softmax_cross_entropy_with_logits`)
    and ``axis`` non-negative.
    """

    @staticmethod
    def forward(ctx, labels, logits, axis):
        loss, lse, qsum = torch.ops.xent_triton.forward(logits, labels, None, None, axis, -100, 0.0, 0.0, 0.0, False)
        ctx.save_for_backward(labels, logits, lse, qsum)
        ctx.axis = axis
        return loss

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError("xent_triton: double backward is not supported")
        labels, logits, lse, qsum = ctx.saved_tensors
        need_dy, need_dx = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dlogits, dlabels = torch.ops.xent_triton.backward(
            grad, logits, labels, None, None, lse, qsum, ctx.axis, -100, 0.0, 0.0, 0.0, need_dx, need_dy)
        return (dlabels if need_dy else None), (dlogits if need_dx else None), None


class InplaceGradCrossEntropy(torch.autograd.Function):
    """Cross entropy whose backward writes dlogits over the logits' storage.

    A training step then needs O(rows) extra memory instead of a dlogits tensor,
    and moves the same bytes as the default path. The forward marks the logits
    dirty: that bumps their version counter now, so an upstream op that saved
    the logits for its own backward raises autograd's in-place error instead of
    later reading gradients in place of logits (Liger #272, Megatron-LM #1627).
    """

    @staticmethod
    def forward(ctx, logits, labels, target, weight, axis, ignore_index, label_smoothing, lse_square_scale,
                softcap, loss_fp32):
        loss, lse, qsum = torch.ops.xent_triton.forward(
            logits, labels, target, weight, axis, ignore_index, label_smoothing, lse_square_scale, softcap,
            loss_fp32)
        ctx.mark_dirty(logits)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, labels, target, weight, lse, qsum)
        ctx.params = (axis, ignore_index, label_smoothing, lse_square_scale, softcap)
        ctx.consumed = False
        return loss, lse, logits

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse, grad_logits):
        if grad_logits is not None:
            raise RuntimeError("inplace_backward: the logits are overwritten by their gradient in the backward "
                               "pass, so they cannot be used after the loss")
        if ctx.consumed:
            raise RuntimeError("inplace_backward: the logits were already overwritten by an earlier backward "
                               "(retain_graph=True is not supported in this mode)")
        ctx.consumed = True
        logits, labels, target, weight, lse, qsum = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * 10
        need_dy = ctx.needs_input_grad[1]
        dlabels = torch.ops.xent_triton.backward_inplace(
            grad_loss, logits, labels, target, weight, lse, qsum, *ctx.params, need_dy)
        return (logits, dlabels if need_dy else None) + (None,) * 8
