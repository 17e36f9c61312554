"""xent_triton: fused softmax cross entropy for PyTorch, in Triton.

Soft labels (TensorFlow's ``softmax_cross_entropy_with_logits``) and class
indices (a drop-in for ``torch.nn.functional.cross_entropy``), with a torch
fallback on the CPU.
"""
import os as _os

# kernels/ is installed as xent_triton.kernels (pyproject's package-dir). Imported
# straight from a source checkout (PYTHONPATH, or a checkout that shadows an
# install of another tree), find it beside this package, so that the host code
# and the kernels always come from the same tree.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isdir(_os.path.join(_root, "kernels")):
    __path__.append(_root)

from . import config, ops  # noqa: E402,F401  (ops registers the torch.library custom ops)
from .config import get_backend, set_backend  # noqa: E402
from .functional import (  # noqa: E402
    SoftmaxCrossEntropyFunction, cross_entropy, linear_cross_entropy, softmax_cross_entropy_with_logits,
    sparse_softmax_cross_entropy_with_logits)
from .linear import LinearCrossEntropyFunction  # noqa: E402
from .modules import CrossEntropyLoss, LinearCrossEntropyLoss, SoftmaxCrossEntropyWithLogits  # noqa: E402
from .torch_patch import TorchPatch, patch_torch  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "softmax_cross_entropy_with_logits",
    "sparse_softmax_cross_entropy_with_logits",
    "cross_entropy",
    "CrossEntropyLoss",
    "linear_cross_entropy",
    "LinearCrossEntropyLoss",
    "LinearCrossEntropyFunction",
    "SoftmaxCrossEntropyWithLogits",
    "SoftmaxCrossEntropyFunction",
    "patch_torch",
    "TorchPatch",
    "set_backend",
    "get_backend",
    "config",
]
