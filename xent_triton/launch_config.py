"""Launch configuration by (rows, classes, element size, device): a table, not autotuning.

No autotuning happens at the first call (it would time kernels inside a
user's step and break CUDA graph capture). The block sizes come from the
H100/H200 anchor measurements summarized in perf/NOTES.md: the naive one-row-per-program
forward ran at 91-100% of copy bandwidth with 1024-2048 element blocks and 8-16
warps, and at 4% with 16384/4 (register spills).

A measured table overrides that heuristic: ``perf/tune_tiles.py`` times every
(BLOCK, num_warps, stages) candidate on a GPU and writes a table into ``tiles.json``
beside this file, keyed by the GPU's name and Triton's minor version: tiles that a
compiler version and a chip were measured with say nothing about another. The file is
read once, at the first launch; a device without a table of its own gets the heuristic.
Rows count as measured for the class counts (V) and, for the few-row forward, the row
counts (N) that it times.

Tests and tuning tools force tiles through ``xent_triton.config.overrides`` (``split``,
``tile``, ``rows``), read here at each choice.
"""
import functools
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

from . import config

# Programs per SM we aim for before splitting a row across programs.
_PROGRAMS_PER_SM = 2
_MAX_SPLIT = 64
# The Triton interpreter has no SMs; a small nominal count makes small-N tests
# exercise the split-row path that real GPUs take.
_INTERPRETER_SMS = 4

TILES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiles.json")


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for host integers. Triton's is a constexpr function, whose wrapper cost ~8 us a
    call on the host (cProfile, triton 3.9): launches are chosen on every call, so it showed."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """``triton.next_power_of_2`` for host integers (see cdiv)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def slice_width(block: int, num_warps: int, itemsize: int) -> int:
    """EPT of the row loops that keep statistics per slice (kernels/xent_forward._row_partial): one
    16-byte vector per thread, or fewer elements where the block has fewer per thread (a wider slice
    would leave threads holding copies)."""
    return max(1, min(16 // itemsize, block // (32 * num_warps)))


@dataclass(frozen=True)
class Launch:
    block: int
    num_warps: int
    split: int  # programs per row
    cols_per_prog: int
    stages: int = 1  # pipeline depth of the forward's loads (kernels/xent_forward._row_partial); 1: none


@functools.lru_cache(maxsize=None)
def _sm_count(device_type: str, index) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index).multi_processor_count
    return _INTERPRETER_SMS


@functools.lru_cache(maxsize=None)
def _tile_tables():
    """{(gpu name, Triton major.minor): {pass: {itemsize: rows}}} from TILES_FILE, read once."""
    if not os.path.isfile(TILES_FILE):
        return {}
    with open(TILES_FILE) as f:
        tables = json.load(f)["tables"]
    return {(t["gpu"], t["triton"]): {p: {int(k): sorted(v) for k, v in by_size.items()}
                                      for p, by_size in t["tiles"].items()} for t in tables}


def triton_minor() -> str:
    import triton

    return ".".join(triton.__version__.split(".")[:2])


def device_name(device: torch.device) -> str:
    """The name a tile table is keyed by: the GPU's, or "cpu" for the interpreter (tests' tables)."""
    return torch.cuda.get_device_name(device.index) if device.type == "cuda" else device.type


@functools.lru_cache(maxsize=None)
def _device_tiles(device_type: str, index) -> dict:
    name = device_name(torch.device(device_type, index))
    return _tile_tables().get((name, triton_minor()), {})


def reload_tiles():
    """Read TILES_FILE again at the next choice (tests and tuning tools that write it). The configuration
    is renewed with it, so no call prepared with the old tiles is used again."""
    _tile_tables.cache_clear()
    _device_tiles.cache_clear()
    config.renew()


def measured_tiles(device: torch.device) -> dict:
    """The tuned table of ``device`` under this Triton, {pass: {itemsize: [[max_cols, block,
    num_warps(, stages)], ...]}}, or {} where none was measured.

    Rows are sorted by max_cols; a problem uses the first row whose max_cols >= V. A row without
    stages (tables written before they were tuned) means 1.
    """
    return _device_tiles(device.type, device.index)


def _fit(block: int, warps: int, n_cols: int):
    """A measured (BLOCK, num_warps) for a row shorter than BLOCK: the block shrinks to the row's next power
    of two, and the warps with it (128 elements per warp at least)."""
    p2 = next_pow2(max(n_cols, 1))
    return min(block, p2), (warps if block <= p2 else max(1, min(warps, p2 // 128)))


def _tile(pass_name: str, n_cols: int, itemsize: int, device, forced):
    """(BLOCK, num_warps, stages): forced, measured, or the anchors' heuristic (no pipelining)."""
    if forced is not None:
        return (*forced, 1)[:3]
    for max_cols, block, warps, *stages in measured_tiles(device).get(pass_name, {}).get(itemsize, []):
        if n_cols <= max_cols:
            return (*_fit(block, warps, n_cols), (stages or [1])[0])
    cap = {1: 4096, 2: 2048, 4: 1024}.get(itemsize, 512)
    block = min(next_pow2(max(n_cols, 1)), cap)
    return block, max(1, min(16, block // 128)), 1


def _launch(pass_name, n_rows, n_cols, itemsize, device, split=None, tile=None) -> Launch:
    block, num_warps, stages = _tile(pass_name, n_cols, itemsize, device, tile)
    if split is None:
        want = _PROGRAMS_PER_SM * _sm_count(device.type, device.index)
        split = 1
        if n_rows < want:
            # Split only into parts of several blocks each: a part's partial
            # statistics cost a write, a read and a second launch.
            split = max(1, min(cdiv(want, max(n_rows, 1)), cdiv(n_cols, 4 * block), _MAX_SPLIT))
    cols = cdiv(cdiv(n_cols, split), block) * block
    return Launch(block=block, num_warps=num_warps, split=cdiv(n_cols, cols), cols_per_prog=cols, stages=stages)


# Short rows (kernels/xent_rows.py): V up to this many classes is loaded as whole rows, ROWS at a time,
# in tiles of _ROWS_TILE elements, 4 per thread up to 16 warps. Registers per thread of the backward
# (sm_90 cubin): 16 elements per thread took 146-254 for tiles of many short rows (32 x 128: 242); 8 per
# thread still 126 (16 x 128) and 220 (128 x 2, soft labels with dlabels); 4 per thread 64 and 66.
# Rows of 1024 classes take 4096-element tiles (4 rows, 16 warps, 8 elements per thread): on an H100
# (perf/rows_probe.py, 32768 x 1024 bf16, graph-replayed) 2 rows per program moved 50% of copy in the soft
# forward and 73-113% in the backward, 4 rows 84% and 101-121% (perf/NOTES.md P11).
_ROWS_MAX_V = 1024
_ROWS_TILE = 2048
_ROWS_TILE_1024 = 4096
_ROWS_PER_THREAD = 4
_ROWS_MAX = 256


@dataclass(frozen=True)
class RowsLaunch:
    rows: int  # rows per program (a power of 2)
    block: int  # >= V
    num_warps: int


def rows_launch(n_rows, n_cols, device, hard_forward: bool = False) -> Optional[RowsLaunch]:
    """Launch of the short-row kernels, or None where a row per program (or a split row) is the better fit.

    They need V <= _ROWS_MAX_V, and enough rows that each of 2 x SMs programs gets at least two:
    with fewer rows, more programs (one row each) keep more SMs busy. The forward with class indices
    (``hard_forward``) keeps one row per program unless a test forces the tiles: on an H100 it ran at
    14-18% of copy in row tiles of any size against 46% per row at 32768 x 1024 (a tie at 131072 x 128;
    perf/NOTES.md P11, cause not found).
    """
    forced = config.current().rows
    if n_cols > _ROWS_MAX_V or forced == 1 or (hard_forward and forced is None):
        return None
    block = next_pow2(max(n_cols, 1))
    rows = min(_ROWS_MAX, max(1, (_ROWS_TILE_1024 if block >= 1024 else _ROWS_TILE) // block))
    if forced is None:
        per_program = n_rows // (_PROGRAMS_PER_SM * _sm_count(device.type, device.index))
        rows = min(rows, 1 << (max(per_program, 1).bit_length() - 1))
    elif forced != "max":
        rows = forced
    if rows < 2:
        return None
    return RowsLaunch(rows=rows, block=block, num_warps=max(1, min(16, rows * block // (32 * _ROWS_PER_THREAD))))


def _few_rows_tile(n_rows, n_cols, itemsize, device):
    """(BLOCK, num_warps, stages) of one program per row for a forward that the split rule would split,
    where perf/tune_tiles.py measured that tile no slower than the split (a "forward_few" row of
    tiles.json: [max_cols, max_rows, block, num_warps, stages], covering the class counts up to
    max_cols like the forward's rows, and up to max_rows rows); else None.

    A split row costs a second launch (the combine, 15-50 us of host time) and a partial buffer; with
    pipelined loads one program can keep enough bytes in flight by itself (perf/NOTES.md P18)."""
    for max_cols, max_rows, block, warps, stages in measured_tiles(device).get("forward_few", {}).get(itemsize, []):
        if n_cols <= max_cols:
            return (*_fit(block, warps, n_cols), stages) if n_rows <= max_rows else None
    return None


def forward_launch(n_rows, n_cols, itemsize, device) -> Launch:
    forced = config.current()
    launch = _launch("forward", n_rows, n_cols, itemsize, device, forced.split, forced.tile)
    if launch.split > 1 and forced.split is None and forced.tile is None:
        few = _few_rows_tile(n_rows, n_cols, itemsize, device)
        if few is not None:
            block, num_warps, stages = few
            return Launch(block=block, num_warps=num_warps, split=1, cols_per_prog=cdiv(n_cols, block) * block,
                          stages=stages)
    return launch


def backward_launch(n_rows, n_cols, itemsize, device) -> Launch:
    # The backward needs no reduction, so a row splits freely.
    return _launch("backward", n_rows, n_cols, itemsize, device, tile=config.current().tile)
