"""``nn.Module`` wrappers."""
from torch import nn
from torch.nn import _reduction

from . import functional as F


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
        return F.cross_entropy(input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
                               lse_square_scale=self.lse_square_scale, softcap=self.softcap,
                               inplace_backward=self.inplace_backward)


class SoftmaxCrossEntropyWithLogits(nn.Module):
    r"""Module form of :func:`xent_triton.softmax_cross_entropy_with_logits` (per-example loss)."""

    def __init__(self, axis=-1, *, inplace_backward=False):
        super().__init__()
        self.axis = axis
        self.inplace_backward = inplace_backward

    def forward(self, labels, logits):
        return F.softmax_cross_entropy_with_logits(labels, logits, self.axis, inplace_backward=self.inplace_backward)
