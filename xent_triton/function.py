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
    """Loss whose forward overwrites the logits with the unscaled dlogits.

    The backward scales that buffer by the incoming gradient and returns it, so a
    training step needs O(rows) extra memory instead of a dlogits tensor.
    ``mark_dirty`` bumps the logits' version counter: an upstream op that saved
    the logits for its own backward then raises autograd's in-place error
    instead of computing with gradients in place of logits.
    """

    @staticmethod
    def forward(ctx, logits, labels, target, weight, axis, ignore_index, label_smoothing, lse_square_scale,
                softcap, loss_fp32):
        loss, lse = torch.ops.xent_triton.forward_grad_inplace(
            logits, labels, target, weight, axis, ignore_index, label_smoothing, lse_square_scale, softcap,
            loss_fp32)
        ctx.mark_dirty(logits)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits)
        ctx.axis = axis
        ctx.consumed = False
        return loss, lse, logits

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse, grad_logits):
        if grad_logits is not None:
            raise RuntimeError("inplace_backward overwrote the logits with gradients; they cannot be used after "
                               "the loss")
        if ctx.consumed:
            raise RuntimeError("inplace_backward: the gradient buffer was already used by an earlier backward "
                               "(retain_graph=True is not supported in this mode)")
        ctx.consumed = True
        (dlogits,) = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * 10
        torch.ops.xent_triton.scale_rows_(dlogits, grad_loss, ctx.axis)
        return (dlogits,) + (None,) * 9
