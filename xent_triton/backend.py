"""Which implementation runs a call: the Triton kernels or the torch fallback.

``XENT_TRITON_BACKEND`` = ``auto`` (default) | ``triton`` | ``torch``:

* ``auto``: CUDA tensors use Triton; CPU tensors use the torch fallback, or the
  Triton interpreter when ``TRITON_INTERPRET=1`` is set.
* ``triton``: always the kernels. A CPU tensor needs ``TRITON_INTERPRET=1``
  (set before the first import of triton); otherwise this raises, it never falls
  back silently.
* ``torch``: always the fallback, on any device.

The variable is read at each call, inside the custom op, so a compiled graph
follows it too.
"""
import functools
import importlib.util
import os

import torch

_CHOICES = ("auto", "triton", "torch")
BACKEND_ENV = "XENT_TRITON_BACKEND"


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    # Asked on every call; whether triton is installed does not change while the process runs.
    return importlib.util.find_spec("triton") is not None


def choose(device: torch.device) -> str:
    mode = os.environ.get(BACKEND_ENV, "auto").strip().lower()
    if mode not in _CHOICES:
        raise ValueError(f"XENT_TRITON_BACKEND must be one of {_CHOICES}, got {mode!r}")
    if mode == "torch":
        return "torch"
    runnable = triton_available() and (device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()))
    if mode == "triton" and not runnable:
        if not triton_available():
            why = "triton is not installed"
        elif device.type == "cpu":
            why = "tensors are on the CPU and TRITON_INTERPRET=1 is not set"
        else:
            why = f"device type {device.type!r} is not supported by the kernels"
        raise RuntimeError(f"XENT_TRITON_BACKEND=triton, but the Triton kernels cannot run: {why}")
    return "triton" if runnable else "torch"
