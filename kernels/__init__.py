"""Triton device code for xent_triton (installed as ``xent_triton.kernels``).

Only ``@triton.jit`` functions live here: no autograd, no torch-level logic.
Feature flags are ``tl.constexpr`` so that unused features compile out.
"""
from .xent_forward import xent_forward_kernel, xent_combine_kernel
from .xent_backward import xent_backward_kernel
from .xent_rows import xent_rows_backward_kernel, xent_rows_forward_kernel

__all__ = ["xent_forward_kernel", "xent_combine_kernel", "xent_backward_kernel",
           "xent_rows_forward_kernel", "xent_rows_backward_kernel"]
