"""``nn.Module`` wrappers."""
import math

from torch import nn
from torch.nn import _reduction

from . import functional as F
from . import validation as v


class CrossEntropyLoss(nn.Module):
    r"""Drop-in for :class:`torch.nn.CrossEntropyLoss`; see :func:`xent_triton.cross_entropy`.

    Takes torch's constructor arguments plus the keyword-only ``lse_square_scale``,
    ``softcap`` and ``inplace_backward``.
    """

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                 label_smoothing=0.0, *, lse_square_scale=0.0, softcap=None, inplace_backward=False):
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = _reduction.legacy_get_string(size_average, reduce)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.inplace_backward = inplace_backward

    def forward(self, input, target):
        return F.cross_entropy(input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                               label_smoothing=self.label_smoothing, lse_square_scale=self.lse_square_scale,
                               softcap=self.softcap, inplace_backward=self.inplace_backward)


class SoftmaxCrossEntropyWithLogits(nn.Module):
    r"""Module form of :func:`xent_triton.softmax_cross_entropy_with_logits` (per-example loss)."""

    def __init__(self, axis=-1, *, inplace_backward=False):
        super().__init__()
        self.axis = axis
        self.inplace_backward = inplace_backward

    def forward(self, labels, logits):
        return F.softmax_cross_entropy_with_logits(labels, logits, self.axis, inplace_backward=self.inplace_backward)


class LinearCrossEntropyLoss(nn.Module):
    r"""A linear layer and the cross entropy of its output: drop-in for torch's
    ``torch.nn.LinearCrossEntropyLoss`` (torch >= 2.13, same constructor, same ``state_dict``);
    see :func:`xent_triton.linear_cross_entropy`.

    ``self.linear`` is an :class:`nn.Linear` of ``num_classes * prod(out_features)`` outputs, viewed
    as ``(num_classes, *out_features, in_features)``. Takes the keyword-only extras
    ``lse_square_scale``, ``softcap``, ``chunk_size`` and ``accum_dtype``.
    """

    def __init__(self, in_features, num_classes, *, out_features=(), bias=False, device=None, dtype=None,
                 reduction="mean", weight=None, ignore_index=None, label_smoothing=0.0, options=None,
                 lse_square_scale=0.0, softcap=None, chunk_size=None, accum_dtype=None):
        super().__init__()
        v.check_weight(weight, num_classes)
        v.check_options(reduction, label_smoothing, softcap, -100 if ignore_index is None else ignore_index,
                        lse_square_scale)
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        self.linear = nn.Linear(in_features, math.prod(self.out_features, start=num_classes), bias=bias,
                                device=device, dtype=dtype)
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.options = options
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.accum_dtype = accum_dtype

    def forward(self, input, target):
        shape = (self.num_classes, *self.out_features)
        bias = self.linear.bias.view(shape) if self.linear.bias is not None else None
        return F.linear_cross_entropy(
            input, self.linear.weight.view(*shape, self.linear.in_features), target, linear_bias=bias,
            weight=self.weight, reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, lse_square_scale=self.lse_square_scale, softcap=self.softcap,
            chunk_size=self.chunk_size, accum_dtype=self.accum_dtype, options=self.options)

    def extra_repr(self):
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
                f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, options={self.options}")
