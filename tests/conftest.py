"""Shared fixtures: every test runs on each backend, with poisoned outputs.

Without CUDA, the Triton kernels run under the Triton interpreter; that must be
switched on before triton is first imported, hence the environment set here.
On a CUDA machine the same suite runs the kernels on the GPU.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import xent_triton  # noqa: E402,F401
from xent_triton import _alloc  # noqa: E402
from helpers import set_config  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["torch", "triton"]
POISON = 12345.0


def _check_alignment_hints():
    """Under the interpreter, make every tl.multiple_of hint a checked claim: the kernels hint that
    block pointers are 16-byte aligned (kernels/row_math.aligned_run, same_run), and a false hint
    would be a misaligned-address fault on a GPU that no CPU run could otherwise see."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter.TensorHandle.set_attr

    def set_attr(self, key, value):
        if key == "tt.divisibility":
            div = int(value[0])
            data = np.asarray(self.data).astype(np.int64)
            if (data % div).any():
                raise AssertionError(f"false tl.multiple_of({div}) hint: values {data.ravel()[:8].tolist()}")
        return original(self, key, value)

    interpreter.TensorHandle.set_attr = set_attr


_check_alignment_hints()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")
    config.addinivalue_line("markers", "slow: large inputs")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Force one implementation (xent_triton.config's backend)."""
    set_config(monkeypatch, backend=request.param)
    return request.param


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every output buffer starts as POISON, so an unwritten element cannot pass."""
    monkeypatch.setattr(_alloc, "POISON", POISON)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["one_row", "row_tiles"])
def row_kernels(request, monkeypatch):
    """Short rows on the one-row-per-program kernels, and on the row-tile kernels (kernels/xent_rows.py)
    with as many rows per program as the tile holds, so that tail rows past the batch are exercised too.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("row_kernels")``."""
    set_config(monkeypatch, rows=1 if request.param == "one_row" else "max")
    return request.param
