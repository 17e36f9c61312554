"""Launch configuration by (rows, classes, element size, device): a table, not autotuning.

No autotuning happens at the first call (it would time kernels inside a
user's step and break CUDA graph capture). The block sizes come from the
H100/H200 measurements in ../shared/ANCHORS.md: the naive one-row-per-program
forward ran at 91-100% of copy bandwidth with 1024-2048 element blocks and 8-16
warps, and at 4% with 16384/4 (register spills). Re-measure with perf/sweep.py
before changing them.
"""
import functools
from dataclasses import dataclass

import torch
import triton

# Programs per SM we aim for before splitting a row across programs.
_PROGRAMS_PER_SM = 2
_MAX_SPLIT = 64
# The Triton interpreter has no SMs; a small nominal count makes small-N tests
# exercise the split-row path that real GPUs take.
_INTERPRETER_SMS = 4

FORCE_SPLIT = None  # tests only: force the forward split factor


@dataclass(frozen=True)
class Launch:
    block: int
    num_warps: int
    split: int  # programs per row
    cols_per_prog: int


@functools.lru_cache(maxsize=None)
def _sm_count(device_type: str, index) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index).multi_processor_count
    return _INTERPRETER_SMS


def _block(n_cols: int, itemsize: int) -> int:
    cap = {1: 4096, 2: 2048, 4: 1024}.get(itemsize, 512)
    return min(triton.next_power_of_2(max(n_cols, 1)), cap)


def _launch(n_rows, n_cols, itemsize, device, split=None) -> Launch:
    block = _block(n_cols, itemsize)
    num_warps = max(1, min(16, block // 128))
    if split is None:
        want = _PROGRAMS_PER_SM * _sm_count(device.type, device.index)
        split = 1
        if n_rows < want:
            # Split only into parts of several blocks each: a part's partial
            # statistics cost a write, a read and a second launch.
            split = max(1, min(triton.cdiv(want, max(n_rows, 1)), triton.cdiv(n_cols, 4 * block), _MAX_SPLIT))
    cols = triton.cdiv(triton.cdiv(n_cols, split), block) * block
    return Launch(block=block, num_warps=num_warps, split=triton.cdiv(n_cols, cols), cols_per_prog=cols)


def forward_launch(n_rows, n_cols, itemsize, device) -> Launch:
    return _launch(n_rows, n_cols, itemsize, device, split=FORCE_SPLIT)


def backward_launch(n_rows, n_cols, itemsize, device) -> Launch:
    # The backward needs no reduction, so a row splits freely.
    return _launch(n_rows, n_cols, itemsize, device)
