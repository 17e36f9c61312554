"""xent_triton: fused softmax cross entropy for PyTorch, in Triton.

Soft labels (TensorFlow's ``softmax_cross_entropy_with_logits``) and class
indices (a drop-in for ``torch.nn.functional.cross_entropy``), with a torch
fallback on the CPU.
"""
from . import ops  # noqa: F401  (registers the torch.library custom ops)
from .function import InplaceGradCrossEntropy, SoftmaxCrossEntropyWithLogits as SoftmaxCrossEntropyFunction
from .functional import cross_entropy, softmax_cross_entropy_with_logits, sparse_softmax_cross_entropy_with_logits
from .modules import CrossEntropyLoss, SoftmaxCrossEntropyWithLogits

__version__ = "0.1.0"

__all__ = [
    "softmax_cross_entropy_with_logits",
    "sparse_softmax_cross_entropy_with_logits",
    "cross_entropy",
    "CrossEntropyLoss",
    "SoftmaxCrossEntropyWithLogits",
    "SoftmaxCrossEntropyFunction",
    "InplaceGradCrossEntropy",
]
