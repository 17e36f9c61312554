"""Benchmark sweep: xent_triton against torch eager, torch.compile and Liger-Kernel.

Run from the repository root:

    python -m perf.sweep                     # default grid, bf16 + fp32, < 8 min on one H100/H200
    python -m perf.sweep --quick             # 7 shapes, bf16, < 3 min
    python -m perf.sweep --dtypes bf16,fp16,fp32 --points 8192x128256,1x128256 --passes step
    python -m perf.sweep --summary perf/results/<dir>/sweep.csv   # reprint the summary of a finished run
    python perf/sweep.py --help

What is measured (see perf/NOTES.md and ../shared/ANCHORS.md for the byte model):

* passes: ``forward`` (the loss only, under torch.no_grad), ``backward`` (the backward alone: one forward
  with grad, then ``torch.autograd.grad(loss, logits, retain_graph=True)`` is timed) and ``step``
  (forward + backward).
* labels: ``soft`` (a dense probability row per example) and ``hard`` (int64 class indices).
* methods: ``xent_triton`` (soft: softmax_cross_entropy_with_logits(...).sum(), hard: cross_entropy(...,
  reduction="sum")), ``xent_triton_inplace`` (step only, cross_entropy(..., inplace_backward=True)),
  ``torch_eager`` (F.cross_entropy, reduction="sum"), ``torch_seed_two_step`` (soft only,
  ``-(y * log_softmax(x)).sum()``), ``torch_compile`` (torch.compile(F.cross_entropy), static shapes) and
  ``liger`` (hard only, LigerCrossEntropyLoss; skipped with a note when liger_kernel is not installed).
* ms: median of ``triton.testing.do_bench`` (it flushes L2 before every call). gbps: the byte-model bytes
  over that time; pct_of_copy: gbps over the device-to-device copy bandwidth (bytes read + bytes written)
  of perf.common.copy_gbps: measured at the start of the run, or once for the whole perf/gpu_check.sh run
  ($XENT_COPY_GBPS), the number every probe counts against too. The fused step (one kernel for the
  forward and backward) is an experiment outside the package now: perf/fused_step/.
* peak_extra_mib: ``max_memory_allocated`` during one call of the pass minus what was allocated just
  before it (inputs, and for ``backward`` the retained forward graph, already present). The returned
  dlogits are counted, as in ANCHORS.md.
* check: every method is checked against a float64 reference before it is timed: the summed loss over
  all rows (relative error) and, for backward/step, dlogits on the first and last min(N, 64) rows
  (relative Frobenius error). Tolerance 2e-2 for bf16/fp16, 1e-4 for fp32. A failing method is still
  timed, and its rows say FAIL everywhere they appear (CSV, markdown, plots, summary).
* compile_s: wall seconds of the first call of a pass (preparation + first call + sync), outside ``ms``.
  For torch_compile it includes Dynamo/Inductor compilation of a graph not compiled before (the
  forward pass compiles the no-grad graph, the step pass the forward+backward graphs with AOTAutograd's
  default buffer donation; the backward pass, run last, recompiles them with donation off because it
  calls the backward repeatedly with retain_graph=True, which a donating backward refuses). For
  xent_triton it includes Triton JIT compilation when the kernel specialization is new.

Without CUDA this runs a small CPU comparison of the xent_triton torch fallback against torch eager
and says so plainly; it writes into a temporary directory unless ``--out`` is given.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import gc
import inspect
import math
import platform
import re
import signal
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .common import copy_gbps as run_copy_gbps, measure_copy_gbps

xt = None  # xent_triton, imported by main(): --help and --summary work while the package does not import

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOL = {"bf16": 2e-2, "fp16": 2e-2, "fp32": 1e-4}
LABELS = ("soft", "hard")
PASSES = ("forward", "backward", "step")
METHODS = ("xent_triton", "xent_triton_inplace", "torch_eager", "torch_seed_two_step", "torch_compile", "liger")
SHORT = {"xent_triton": "xt", "xent_triton_inplace": "xt_inpl", "torch_eager": "eager",
         "torch_seed_two_step": "seed2", "torch_compile": "compile", "liger": "liger"}

# Byte model of ../shared/ANCHORS.md, in units of N*V*b (b = element size). The step is counted against
# its single-touch floor: a design that reads the row twice pays for it in pct_of_copy.
BYTE_MODEL = {
    ("soft", "forward"): 2, ("soft", "backward"): 3, ("soft", "step"): 3,
    ("hard", "forward"): 1, ("hard", "backward"): 2, ("hard", "step"): 2,
}

# (N, V) points, most important first: the --max-minutes guard drops the tail.
# 8192 x 50257 (a stride no power of 2 divides): the aligned blocks of perf/NOTES.md P12.
QUICK_POINTS = [(8192, 128256), (8192, 32000), (2048, 256000), (64, 256000), (32768, 1024), (1, 128256),
                (8192, 50257)]
DEFAULT_POINTS = QUICK_POINTS + [
    (8192, 152064), (512, 50257), (8192, 1000), (8192, 256000),
    (65536, 2),
    (65536, 50257),  # 3.3e9 elements: past 2**31, the int32-offset trap (ANCHORS.md)
]
CPU_POINTS = [(64, 1000), (256, 8192), (8, 50257)]

# Time arithmetic (one H100/H200; "measurement" = one do_bench of one method/pass at one point):
#   per (point, dtype): soft 4 methods x 3 passes + the in-place step = 13, hard 3 x 3 + 1 = 10
#   (+ liger forward/step when installed) -> 23-25 measurements, plus 2 clone baselines for the in-place step.
#   torch.compile compiles 2 graphs per (point, dtype, labels) (no-grad forward; forward+backward),
#   about 2-4 s each once Inductor is warm, plus ~20 s for the first compile of the process; the
#   backward-alone pass recompiles forward+backward without buffer donation (Inductor's cache serves
#   most of it: ~0.3-1 s).
#   --quick:  7 points x bf16            = 175 measurements x ~0.2 s (warmup 25 + rep 100 ms, L2 flushes,
#             checks, peak-memory call) ~ 30 s; 24 compiles ~ 50-100 s; references, inputs, startup ~ 30 s
#             -> ~2-2.5 min (the first block pays ~30-45 s of Inductor start-up). Guard: 2.5 min, checked
#             before each (point, labels) block of ~10 s, so the run ends before 3 min.
#   default: 13 points x {bf16, fp32}    = 650 measurements x ~0.12 s (warmup 10 + rep 50 ms) ~ 75 s;
#             104 compiles ~ 210-310 s; references (fp64, chunked; the 65536 x 50257 point is the
#             largest), inputs and startup ~ 60 s -> ~6-7 min. Guard: 7.0 min, checked before each
#             (point, dtype, labels) block, and one block takes < 20 s, so the run ends under 8 min.
QUICK_GUARD_MIN = 2.5
DEFAULT_GUARD_MIN = 7.0
CPU_GUARD_MIN = 0.75

CSV_FIELDS = ["gpu", "method", "labels", "dtype", "N", "V", "pass", "ms", "gbps", "pct_of_copy",
              "peak_extra_mib", "compile_s", "check", "copy_gbps", "loss_err", "grad_err", "note"]


@dataclass(frozen=True)
class MethodSpec:
    labels: Tuple[str, ...]
    passes: Tuple[str, ...]
    mutates: bool  # writes gradients over the logits it is given (timed on a per-call copy)


SPECS = {
    "xent_triton": MethodSpec(LABELS, PASSES, False),
    # In-place mode: the forward writes dlogits over the logits; only a step is meaningful.
    "xent_triton_inplace": MethodSpec(LABELS, ("step",), True),
    "torch_eager": MethodSpec(LABELS, PASSES, False),
    "torch_seed_two_step": MethodSpec(("soft",), PASSES, False),
    "torch_compile": MethodSpec(LABELS, PASSES, False),
    # Liger computes the gradient inside its forward and its backward only rescales it, so a
    # "backward alone" time would be meaningless.
    "liger": MethodSpec(("hard",), ("forward", "step"), True),
}


# --------------------------------------------------------------------------------------------- logging

class Log:
    """Lines go to stdout (through tqdm.write while a bar is shown) and to log.txt as they happen."""

    def __init__(self):
        self.lines: List[str] = []
        self.path: Optional[Path] = None
        self.bar = None

    def open(self, path: Path):
        self.path = path
        with open(path, "w") as f:
            f.writelines(line + "\n" for line in self.lines)

    def __call__(self, msg: str):
        for line in str(msg).splitlines() or [""]:
            self.lines.append(line)
            if self.bar is not None and sys.stdout.isatty():
                self.bar.write(line)
            else:
                print(line, flush=True)
            if self.path is not None:
                with open(self.path, "a") as f:
                    f.write(line + "\n")


def progress(total: int, desc: str, log: Log):
    try:
        from tqdm import tqdm
    except Exception:  # tqdm missing: a no-op bar
        log("note: tqdm is not installed; no progress bar")

        class _Bar:
            def update(self, n=1):
                pass

            def set_postfix_str(self, s, refresh=True):
                pass

            def write(self, s):
                print(s, flush=True)

            def close(self):
                pass

        return _Bar()
    tty = sys.stdout.isatty()
    # Redirected to a log (gpu_check.sh tees it): redraw rarely so the log stays readable.
    return tqdm(total=total, desc=desc, unit="block", dynamic_ncols=tty, file=sys.stdout,
                mininterval=0.5 if tty else 20.0, ncols=None if tty else 100)


# --------------------------------------------------------------------------------------------- timing

def _do_bench_median():
    """triton.testing.do_bench returning the median in ms (return_mode where it exists, else quantiles)."""
    from triton.testing import do_bench

    params = inspect.signature(do_bench).parameters
    if "return_mode" in params:
        def bench(fn, warmup, rep):
            return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    else:
        def bench(fn, warmup, rep):
            r = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5])
            return float(r[0] if isinstance(r, (list, tuple)) else r)
    return bench


class Timer:
    def __init__(self, cuda: bool, warmup_ms: float, rep_ms: float):
        self.cuda = cuda
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms
        self._bench = _do_bench_median() if cuda else None

    def __call__(self, fn: Callable) -> float:
        """Median milliseconds of fn()."""
        if self.cuda:
            return self._bench(fn, self.warmup_ms, self.rep_ms)
        # CPU: time.perf_counter around each call, median over at least 5 calls / rep_ms.
        fn()
        times: List[float] = []
        budget = self.rep_ms / 1e3
        while len(times) < 5 or (sum(times) < budget and len(times) < 200):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------- methods

def _liger_class(log: Log):
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except Exception as e:  # ImportError, or a broken install
        log(f"note: liger is not installed (from liger_kernel.transformers import LigerCrossEntropyLoss "
            f"failed: {type(e).__name__}: {e}); skipping the liger method")
        return None
    return LigerCrossEntropyLoss


class Losses:
    """Loss callables (x, target) -> scalar sum, one per (method, labels).

    The torch.compile variants are made once per labels kind and reused for every point; compiling
    happens at their first call with each new shape/dtype/grad mode (dynamic=False: each shape gets
    its own static graph, as a training loop with fixed shapes would).
    """

    def __init__(self, liger_cls, smoothing: float = 0.0):
        self.compiled: Dict[str, Callable] = {}
        self.smoothing = smoothing  # label smoothing of the class-index rows (--label-smoothing)
        extra = dict(label_smoothing=smoothing) if smoothing else {}
        self.liger = liger_cls(reduction="sum", **extra) if liger_cls is not None else None

    def compiled_for(self, labels: str) -> Callable:
        if labels not in self.compiled:
            self.compiled[labels] = torch.compile(F.cross_entropy, dynamic=False)
        return self.compiled[labels]

    def get(self, method: str, labels: str) -> Callable:
        soft = labels == "soft"
        eps = 0.0 if soft else self.smoothing
        if method == "xent_triton":
            if soft:
                return lambda x, y: xt.softmax_cross_entropy_with_logits(y, x).sum()
            return lambda x, t: xt.cross_entropy(x, t, reduction="sum", label_smoothing=eps)
        if method == "xent_triton_inplace":
            return lambda x, tgt: xt.cross_entropy(x, tgt, reduction="sum", label_smoothing=eps,
                                                   inplace_backward=True)
        if method == "torch_eager":
            return lambda x, tgt: F.cross_entropy(x, tgt, reduction="sum", label_smoothing=eps)
        if method == "torch_seed_two_step":
            return lambda x, y: -(y * torch.log_softmax(x, -1)).sum()
        if method == "torch_compile":
            fn = self.compiled_for(labels)
            return lambda x, tgt: fn(x, tgt, reduction="sum", label_smoothing=eps)
        if method == "liger":
            liger = self.liger
            return lambda x, t: liger(x, t)
        raise ValueError(method)


def _configure_dynamo(log: Log):
    """Room for every static graph of a run (each block resets Dynamo anyway, see run_block)."""
    try:
        import torch._dynamo as dynamo
    except Exception as e:
        log(f"note: torch._dynamo unavailable ({e}); torch_compile will fail its rows")
        return
    for name, value in (("recompile_limit", 64), ("cache_size_limit", 64),
                        ("accumulated_recompile_limit", 4096), ("accumulated_cache_size_limit", 4096)):
        if hasattr(dynamo.config, name):
            try:
                setattr(dynamo.config, name, value)
            except Exception:
                pass


@dataclass
class Prepared:
    run: Callable[[], tuple]  # the timed call; returns (loss, dlogits or None)
    baseline: Optional[Callable]  # timed on its own and subtracted from run's time
    mem_pre: Optional[Callable]  # makes state outside the peak-memory window
    mem_run: Callable  # mem_run(state) -> outputs, inside the peak-memory window


def prepare(spec: MethodSpec, pas: str, loss_fn: Callable, x: torch.Tensor, tgt: torch.Tensor) -> Prepared:
    """Closures for one (method, pass). x is a leaf that requires grad; it is never modified."""
    if pas == "forward":
        # A method that writes gradients over its input gets a private copy (Liger may do so in forward).
        xin = x.detach().clone() if spec.mutates else x

        def fwd():
            with torch.no_grad():
                return loss_fn(xin, tgt), None

        return Prepared(fwd, None, None, lambda _state: fwd())

    if pas == "step":
        if spec.mutates:
            # The in-place modes overwrite the logits with dlogits, so every call needs fresh logits, and a
            # copy cannot be made outside do_bench's timed region cheaply. Each call therefore clones the
            # leaf x (a non-leaf copy: autograd allows the in-place write, and the gradient flows back to x
            # through the clone), and the time of that clone alone is measured the same way and
            # subtracted (Prepared.baseline). The clone leaves part of the copy in L2, so for rows that fit
            # in L2 (small N*V) the in-place step can look a little faster than from cold HBM. Peak memory
            # is measured after the clone, so the copy is not counted.
            def step_on(xm):
                loss = loss_fn(xm, tgt)
                (g,) = torch.autograd.grad(loss, x)
                return loss, g

            def copy():
                return x.clone()

            return Prepared(lambda: step_on(x.clone()), copy, copy, step_on)

        def step():
            loss = loss_fn(x, tgt)
            (g,) = torch.autograd.grad(loss, x)
            return loss, g

        return Prepared(step, None, None, lambda _state: step())

    if pas == "backward":
        if spec.mutates:
            raise ValueError("backward alone is not separable for an in-place method")
        loss = loss_fn(x, tgt)  # forward with grad, once; its graph is kept for every timed backward

        def bwd():
            (g,) = torch.autograd.grad(loss, x, retain_graph=True)
            return loss, g

        return Prepared(bwd, None, None, lambda _state: bwd())
    raise ValueError(pas)


# --------------------------------------------------------------------------------------------- data

def make_inputs(N: int, V: int, dtype: torch.dtype, labels: str, device: torch.device, seed: int):
    """Random normal logits * 2 (a leaf requiring grad), and softmax labels or int64 class indices."""
    torch.manual_seed(seed)
    x = torch.randn(N, V, device=device, dtype=dtype)
    x.mul_(2.0)
    x.requires_grad_(True)
    if labels == "soft":
        tgt = torch.randn(N, V, device=device, dtype=dtype).softmax(-1)
    else:
        tgt = torch.randint(0, V, (N,), device=device, dtype=torch.int64)
    return x, tgt


def check_rows(N: int, device) -> torch.Tensor:
    k = min(N, 64)
    idx = sorted(set(range(k)) | set(range(N - k, N)))
    return torch.tensor(idx, dtype=torch.int64, device=device)


@torch.no_grad()
def reference(x: torch.Tensor, tgt: torch.Tensor, labels: str, rows: torch.Tensor, smoothing: float = 0.0):
    """float64 reference: the summed loss over all rows (chunked), and dlogits of `rows`; class indices
    with ``smoothing`` target (1 - smoothing) one-hot + smoothing / V, as torch's label_smoothing."""
    xd = x.detach()
    N, V = xd.shape
    step = max(1, (1 << 24) // V)
    total = torch.zeros((), dtype=torch.float64, device=xd.device)
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        ls = torch.log_softmax(xd[r0:r1].double(), -1)
        if labels == "soft":
            total -= (tgt[r0:r1].double() * ls).sum()
        else:
            total -= (1.0 - smoothing) * ls.gather(1, tgt[r0:r1, None]).sum() + smoothing / V * ls.sum()
        del ls
    p = torch.softmax(xd[rows].double(), -1)
    if labels == "soft":
        yr = tgt[rows].double()
        g = p * yr.sum(-1, keepdim=True) - yr
    else:
        g = p - smoothing / V
        g[torch.arange(len(rows), device=g.device), tgt[rows]] -= 1.0 - smoothing
    return float(total), g


def check_result(out: tuple, ref_loss: float, ref_g: torch.Tensor, rows: torch.Tensor, tol: float):
    loss, g = out
    lv = float(loss.detach().double()) if isinstance(loss, torch.Tensor) else float(loss)
    loss_err = abs(lv - ref_loss) / max(abs(ref_loss), 1e-30)
    grad_err = None
    if g is not None:
        gr = g.detach()[rows].double()
        grad_err = float((gr - ref_g).norm() / ref_g.norm())
    ok = loss_err <= tol and (grad_err is None or grad_err <= tol)  # NaN compares False: FAIL
    return ok, loss_err, grad_err


def peak_extra_mib(prep: Prepared, cuda: bool) -> Optional[float]:
    if not cuda:
        return None
    state = prep.mem_pre() if prep.mem_pre is not None else None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = prep.mem_run(state)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out, state
    return peak / 2**20


def estimate_bytes(N: int, V: int, b: int, labels: str, methods: Sequence[str]) -> int:
    """Device memory one (point, dtype, labels) block may need at its peak."""
    nvb = N * V * b
    inputs = nvb * (2 if labels == "soft" else 1) + N * 8
    # Worst working set of one call, the returned dlogits included: torch eager's step takes 3 NVb extra
    # (ANCHORS.md: 6012 MiB = 3 x 2004 MiB at 8192 x 128256 bf16); the backward pass also keeps the
    # forward's saved tensors alive while it runs: 4 NVb.
    work = 4 * nvb
    # In-place methods work on a copy of the logits.
    copy = nvb if any(SPECS[m].mutates and labels in SPECS[m].labels for m in methods) else 0
    # fp64 reference chunks (2**24 elements, a few temporaries), do_bench's 256 MiB L2 flush buffer.
    fixed = 1 << 30
    return int((inputs + work + copy) * 1.1 + fixed)


# --------------------------------------------------------------------------------------------- sweep

@dataclass
class Ctx:
    cuda: bool
    device: torch.device
    gpu: str
    timer: Timer
    log: Log
    losses: Losses
    methods: List[str]
    passes: List[str]
    copy_gbps: float
    rows: List[dict]
    writer: object
    csv_file: object
    logged_skips: set


def _note_once(ctx: Ctx, key, msg: str):
    if key not in ctx.logged_skips:
        ctx.logged_skips.add(key)
        ctx.log(msg)


def _launch_note(N: int, V: int, b: int, device: torch.device, hard: bool = False) -> str:
    try:
        from xent_triton import launch_config as lc

        r = lc.rows_launch(N, V, device)
        if r is not None:
            fwd = "; the forward one row per program" if lc.rows_launch(N, V, device, hard_forward=hard) is None \
                else ""
            return f"row tiles: {r.rows} rows x BLOCK={r.block} per program, warps={r.num_warps}{fwd}"
        f = lc.forward_launch(N, V, b, device)
        g = lc.backward_launch(N, V, b, device)
        return (f"fwd BLOCK={f.block} warps={f.num_warps} split={f.split} stages={f.stages}; "
                f"bwd BLOCK={g.block} warps={g.num_warps} parts={g.split}")
    except Exception as e:  # informational only
        return f"launch config unavailable: {type(e).__name__}"


@contextlib.contextmanager
def _retain_graph_compile():
    """torch.compile for the backward-alone pass, which calls the backward repeatedly with retain_graph=True.

    AOTAutograd donates saved buffers to the backward by default (torch._functorch.config.donated_buffer),
    and such a backward refuses retain_graph=True (and, were the check skipped, would overwrite the
    tensors it needs for the next call). The step pass has already compiled this block's forward+backward
    graphs with donation, so Dynamo is reset and the graphs are recompiled with donation off.
    """
    import torch._dynamo as dynamo

    dynamo.reset()
    try:
        import torch._functorch.config as fconfig
    except Exception:
        fconfig = None
    if fconfig is not None and hasattr(fconfig, "donated_buffer"):
        with fconfig.patch(donated_buffer=False):
            yield
    else:
        yield


def _cleanup(cuda: bool):
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def _emit(ctx: Ctx, row: dict):
    ctx.rows.append(row)
    ctx.writer.writerow({k: _fmt_csv(row.get(k)) for k in CSV_FIELDS})
    ctx.csv_file.flush()


def _fmt_csv(v):
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.6g}"
    return v


def run_block(ctx: Ctx, N: int, V: int, dname: str, labels: str, seed: int) -> str:
    """All methods and passes at one (N, V, dtype, labels). Returns a short status for the bar."""
    dtype = DTYPES[dname]
    b = torch.finfo(dtype).bits // 8
    tol = TOL[dname]
    methods = [m for m in ctx.methods if labels in SPECS[m].labels]
    if not methods:
        return "no method"
    if ctx.cuda:
        _cleanup(True)
        free, total = torch.cuda.mem_get_info()
        need = estimate_bytes(N, V, b, labels, methods)
        margin = (2 << 30) + total // 20
        if need > free - margin:
            ctx.log(f"skip {N}x{V} {dname} {labels}: needs ~{need / 2**30:.1f} GiB, "
                    f"{free / 2**30:.1f} GiB free (keeping {margin / 2**30:.1f} GiB margin)")
            return "skipped (memory)"
        try:
            import torch._dynamo as dynamo

            dynamo.reset()  # each block compiles its own static graphs; keep the cache short
        except Exception:
            pass
    try:
        x, tgt = make_inputs(N, V, dtype, labels, ctx.device, seed)
        rows_idx = check_rows(N, ctx.device)
        ref_loss, ref_g = reference(x, tgt, labels, rows_idx, ctx.losses.smoothing if labels == "hard" else 0.0)
    except torch.cuda.OutOfMemoryError as e:
        ctx.log(f"skip {N}x{V} {dname} {labels}: out of memory making inputs/reference: {str(e)[:200]}")
        x = tgt = None
        _cleanup(ctx.cuda)
        return "skipped (OOM)"
    except Exception as e:
        ctx.log(f"skip {N}x{V} {dname} {labels}: making inputs/reference failed: {type(e).__name__}: {e}")
        x = tgt = None
        _cleanup(ctx.cuda)
        return "skipped (error)"

    base = dict(gpu=ctx.gpu, labels=labels, dtype=dname, N=N, V=V, copy_gbps=ctx.copy_gbps)
    fails = 0
    # Step before backward: torch_compile's forward+backward graphs compile in the step (its compile_s) as a
    # training loop would compile them; the backward-alone pass comes last because it recompiles them
    # without buffer donation (_retain_graph_compile).
    pass_order = [p for p in ("forward", "step", "backward") if p in ctx.passes]
    for method in methods:
        spec = SPECS[method]
        loss_fn = ctx.losses.get(method, labels)
        for pas in pass_order:
            if pas not in spec.passes:
                _note_once(ctx, (method, pas), f"note: {method} has no separate '{pas}' pass; not measured")
                continue
            row = dict(base, method=method, **{"pass": pas})
            note = []
            if ctx.cuda and method.startswith("xent_triton"):
                note.append(_launch_note(N, V, b, ctx.device, hard=labels == "hard"))
            prep = out = None
            retain_compile = method == "torch_compile" and pas == "backward"
            if retain_compile:
                note.append("recompiled with donated_buffer=False for retain_graph backward")
            stack = contextlib.ExitStack()
            try:
                if retain_compile:
                    stack.enter_context(_retain_graph_compile())
                t0 = time.perf_counter()
                prep = prepare(spec, pas, loss_fn, x, tgt)
                out = prep.run()
                ctx.timer.sync()
                row["compile_s"] = time.perf_counter() - t0
                ok, loss_err, grad_err = check_result(out, ref_loss, ref_g, rows_idx, tol)
                out = None
                row.update(check="ok" if ok else "FAIL", loss_err=loss_err, grad_err=grad_err)
                if not ok:
                    fails += 1
                    ctx.log(f"FAIL {method} {labels} {dname} {N}x{V} {pas}: loss rel err {loss_err:.3g}, "
                            f"dlogits rel err {grad_err if grad_err is None else f'{grad_err:.3g}'} "
                            f"(tol {tol:g}); timed anyway, marked FAIL")
                row["peak_extra_mib"] = peak_extra_mib(prep, ctx.cuda)
                ms = ctx.timer(prep.run)
                if prep.baseline is not None:
                    copy_ms = ctx.timer(prep.baseline)
                    note.append(f"per-call logits copy {copy_ms:.4f} ms subtracted from {ms:.4f} ms")
                    ms -= copy_ms
                    if ms <= 0:
                        note.append("non-positive after subtraction: noise dominates")
                # Check again after timing: a method whose repeated calls change its own state (saved
                # buffers reused, inputs overwritten) passes the first check and fails this one.
                ok2, loss_err2, grad_err2 = check_result(prep.run(), ref_loss, ref_g, rows_idx, tol)
                if ok and not ok2:
                    fails += 1
                    row.update(check="FAIL", loss_err=loss_err2, grad_err=grad_err2)
                    note.append("FAIL on the call after timing (first call was ok)")
                    ctx.log(f"FAIL {method} {labels} {dname} {N}x{V} {pas}: wrong after repeated calls "
                            f"(loss rel err {loss_err2:.3g}, dlogits rel err {grad_err2}); marked FAIL")
                row["ms"] = ms
                if ms > 0:
                    gbps = BYTE_MODEL[(labels, pas)] * N * V * b / (ms * 1e-3) / 1e9
                    row["gbps"] = gbps
                    row["pct_of_copy"] = gbps / ctx.copy_gbps * 100.0
            except torch.cuda.OutOfMemoryError as e:
                row["check"] = "OOM"
                note.append(str(e).splitlines()[0][:160] if str(e) else "OOM")
                ctx.log(f"OOM {method} {labels} {dname} {N}x{V} {pas}: skipped")
            except Exception as e:
                row["check"] = "ERROR"
                note.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                ctx.log(f"ERROR {method} {labels} {dname} {N}x{V} {pas}: {type(e).__name__}: {e}")
                ctx.log("".join(traceback.format_exc().splitlines(True)[-6:]))
            finally:
                stack.close()
            prep = out = None
            row["note"] = "; ".join(note)
            _emit(ctx, row)
            if row.get("check") in ("OOM", "ERROR"):
                _cleanup(ctx.cuda)
    x = tgt = ref_g = None
    _cleanup(ctx.cuda)
    return f"{fails} FAIL" if fails else "ok"


# --------------------------------------------------------------------------------------------- reports

def _num(v):
    if v in (None, ""):
        return None
    try:
        return float(v)
    except ValueError:
        return None


def read_csv(path: Path) -> List[dict]:
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            for k in ("N", "V"):
                r[k] = int(r[k])
            for k in ("ms", "gbps", "pct_of_copy", "peak_extra_mib", "compile_s", "copy_gbps", "loss_err",
                      "grad_err"):
                r[k] = _num(r.get(k))
            rows.append(r)
    return rows


def _index(rows):
    return {(r["method"], r["labels"], r["dtype"], r["N"], r["V"], r["pass"]): r for r in rows}


def _ordered(values, order):
    return [v for v in order if v in values] + sorted(v for v in values if v not in order)


def _cell(r, pct=True) -> str:
    if r is None:
        return ""
    if r.get("ms") is None:
        return r.get("check") or "-"
    s = f"{r['ms']:.3f}"
    if pct and r.get("pct_of_copy") is not None:
        s += f" ({r['pct_of_copy']:.0f}%)"
    if r.get("check") != "ok":
        s += " FAIL" if r.get("check") == "FAIL" else f" {r.get('check')}"
    return s


def _groups(rows):
    """(labels, dtype, pass) groups, their points and methods, in a stable order."""
    combos = sorted({(r["labels"], r["dtype"], r["pass"]) for r in rows},
                    key=lambda c: (LABELS.index(c[0]) if c[0] in LABELS else 9, c[1],
                                   PASSES.index(c[2]) if c[2] in PASSES else 9))
    for lab, dt, pas in combos:
        sel = [r for r in rows if (r["labels"], r["dtype"], r["pass"]) == (lab, dt, pas)]
        points = sorted({(r["N"], r["V"]) for r in sel}, key=lambda p: (p[1], p[0]))
        methods = _ordered({r["method"] for r in sel}, METHODS)
        yield lab, dt, pas, points, methods


def summary_text(rows: List[dict]) -> str:
    """Compact fixed-width table: ms (% of copy) per method, and xent_triton's speedup over torch.compile."""
    idx = _index(rows)
    out = []
    for lab, dt, pas, points, methods in _groups(rows):
        out.append(f"== {lab} / {dt} / {pas}   (ms, % of copy on the byte floor; FAIL = wrong result)")
        has_compile = "torch_compile" in methods and "xent_triton" in methods
        head = f"{'N x V':>14} " + " ".join(f"{SHORT.get(m, m):>17}" for m in methods)
        out.append(head + ("   xt/compile" if has_compile else ""))
        for N, V in points:
            cells = [_cell(idx.get((m, lab, dt, N, V, pas))) for m in methods]
            line = f"{N:>6} x {V:<6} " + " ".join(f"{s:>17}" for s in cells)
            if has_compile:
                sp = ""
                a = idx.get(("xent_triton", lab, dt, N, V, pas))
                c = idx.get(("torch_compile", lab, dt, N, V, pas))
                if a and c and a.get("ms") and c.get("ms") and a["ms"] > 0:
                    sp = f"{c['ms'] / a['ms']:.2f}x"
                line += f"   {sp:>9}"
            out.append(line)
        out.append("")
    bad = [r for r in rows if r.get("check") != "ok"]
    out.append(f"rows: {len(rows)}, check ok: {len(rows) - len(bad)}, FAIL: "
               f"{sum(r.get('check') == 'FAIL' for r in rows)}, OOM: {sum(r.get('check') == 'OOM' for r in rows)}, "
               f"ERROR: {sum(r.get('check') == 'ERROR' for r in rows)}")
    return "\n".join(out)


def write_markdown(path: Path, rows: List[dict], meta: List[str]):
    idx = _index(rows)
    md = ["# xent_triton sweep", ""]
    md += [f"- {m}" for m in meta]
    md += ["",
           "Cells: median ms (% of device-to-device copy bandwidth on the byte floor of ../shared/ANCHORS.md: "
           "soft fwd 2NVb, bwd 3NVb, step 3NVb; hard fwd NVb, bwd 2NVb, step 2NVb). "
           "FAIL: the result missed the float64 reference (timed anyway); OOM/ERROR: not timed. "
           "Full numbers in sweep.csv.", ""]
    for lab, dt, pas, points, methods in _groups(rows):
        md.append(f"## {lab} labels / {dt} / {pas}")
        md.append("")
        has_compile = "torch_compile" in methods and "xent_triton" in methods
        md.append("| N x V | " + " | ".join(methods) + (" | xent_triton vs torch_compile |" if has_compile else " |"))
        md.append("|---|" + "---|" * (len(methods) + has_compile))
        for N, V in points:
            cells = [_cell(idx.get((m, lab, dt, N, V, pas))) for m in methods]
            if has_compile:
                a = idx.get(("xent_triton", lab, dt, N, V, pas))
                c = idx.get(("torch_compile", lab, dt, N, V, pas))
                ok = a and c and a.get("ms") and c.get("ms") and a["ms"] > 0
                cells.append(f"{c['ms'] / a['ms']:.2f}x" if ok else "")
            md.append(f"| {N} x {V} | " + " | ".join(cells) + " |")
        md.append("")
        if any(r.get("peak_extra_mib") is not None for r in rows
               if (r["labels"], r["dtype"], r["pass"]) == (lab, dt, pas)):
            md.append(f"Peak extra MiB ({lab} / {dt} / {pas}; returned dlogits included):")
            md.append("")
            md.append("| N x V | " + " | ".join(methods) + " |")
            md.append("|---|" + "---|" * len(methods))
            for N, V in points:
                cells = []
                for m in methods:
                    r = idx.get((m, lab, dt, N, V, pas))
                    cells.append("" if r is None or r.get("peak_extra_mib") is None else f"{r['peak_extra_mib']:.0f}")
                md.append(f"| {N} x {V} | " + " | ".join(cells) + " |")
            md.append("")
    comp = [r for r in rows if r["method"] == "torch_compile" and r.get("compile_s") is not None]
    if comp:
        md += ["## torch.compile first-call seconds (compilation included; excluded from ms)", "",
               "| labels | dtype | N x V | pass | compile_s |", "|---|---|---|---|---|"]
        md += [f"| {r['labels']} | {r['dtype']} | {r['N']} x {r['V']} | {r['pass']} | {r['compile_s']:.2f} |"
               for r in comp]
        md.append("")
    bad = [r for r in rows if r.get("check") != "ok"]
    md += ["## Checks", "", f"{len(rows) - len(bad)} of {len(rows)} rows matched the float64 reference."]
    if bad:
        md += ["", "| method | labels | dtype | N x V | pass | check | loss err | dlogits err | note |",
               "|---|---|---|---|---|---|---|---|---|"]
        for r in bad:
            le = "" if r.get("loss_err") is None else f"{r['loss_err']:.3g}"
            ge = "" if r.get("grad_err") is None else f"{r['grad_err']:.3g}"
            md.append(f"| {r['method']} | {r['labels']} | {r['dtype']} | {r['N']} x {r['V']} | {r['pass']} | "
                      f"{r.get('check')} | {le} | {ge} | {(r.get('note') or '').replace('|', '/')} |")
    md.append("")
    path.write_text("\n".join(md))


def make_plots(rows: List[dict], out_dir: Path, title: str, log: Log) -> List[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except Exception as e:
        log(f"note: matplotlib unavailable ({type(e).__name__}: {e}); no plots")
        return []
    timed = [r for r in rows if r.get("ms") is not None and r["ms"] > 0]
    if not timed:
        log("note: nothing timed; no plots")
        return []
    idx = _index(timed)
    passes = [p for p in PASSES if any(r["pass"] == p for r in timed)]
    combos = sorted({(r["labels"], r["dtype"]) for r in timed},
                    key=lambda c: (LABELS.index(c[0]) if c[0] in LABELS else 9, c[1]))
    Ns = sorted({r["N"] for r in timed})
    methods = _ordered({r["method"] for r in timed}, METHODS)
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(METHODS)}
    markers = ["o", "s", "^", "v", "D", "P", "X", "*", "<", ">"]
    styles = ["-", "--", "-.", ":"]

    def speedup(r):
        c = idx.get(("torch_compile", r["labels"], r["dtype"], r["N"], r["V"], r["pass"]))
        if c is None or c.get("check") != "ok":
            return None
        return c["ms"] / r["ms"]

    plots = [
        ("pct_of_copy.png", "% of copy bandwidth (byte floor)", lambda r: r.get("pct_of_copy"), methods, None),
        ("speedup_vs_compile.png", "speedup over torch.compile (x)", speedup,
         [m for m in methods if m != "torch_compile"], 1.0),
    ]
    written = []
    if not any(r["method"] == "torch_compile" for r in timed):
        log("note: no torch_compile rows; no speedup_vs_compile.png")
        plots = plots[:1]
    for fname, ylabel, value, meths, hline in plots:
        fig, axes = plt.subplots(len(passes), len(combos), figsize=(4.6 * len(combos), 3.4 * len(passes)),
                                 squeeze=False)
        for i, pas in enumerate(passes):
            for j, (lab, dt) in enumerate(combos):
                ax = axes[i][j]
                for m in meths:
                    for k, N in enumerate(Ns):
                        sel = sorted((r for r in timed if (r["method"], r["labels"], r["dtype"], r["pass"], r["N"])
                                      == (m, lab, dt, pas, N)), key=lambda r: r["V"])
                        pts = [(r["V"], value(r), r.get("check") == "ok") for r in sel]
                        pts = [p for p in pts if p[1] is not None]
                        if not pts:
                            continue
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[m],
                                marker=markers[k % len(markers)], linestyle=styles[k % len(styles)],
                                markersize=4, linewidth=1.2)
                        bad = [p for p in pts if not p[2]]
                        if bad:  # wrong results stay visible, crossed out
                            ax.scatter([p[0] for p in bad], [p[1] for p in bad], marker="x", color="red", s=60,
                                       zorder=5)
                if hline is not None:
                    ax.axhline(hline, color="gray", linewidth=0.8)
                ax.set_xscale("log")
                ax.set_title(f"{lab} / {dt} / {pas}", fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
                if i == len(passes) - 1:
                    ax.set_xlabel("classes V")
                if j == 0:
                    ax.set_ylabel(ylabel, fontsize=8)
        handles = [Line2D([], [], color=colors[m], label=m) for m in meths]
        handles += [Line2D([], [], color="black", marker=markers[k % len(markers)],
                           linestyle=styles[k % len(styles)], label=f"N={N}") for k, N in enumerate(Ns)]
        handles.append(Line2D([], [], color="red", marker="x", linestyle="", label="FAIL check"))
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        fig.suptitle(f"{title}: {ylabel}", fontsize=10)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------- main

def _parse_list(s: Optional[str], allowed: Sequence[str], what: str) -> Optional[List[str]]:
    if s is None:
        return None
    items = [v.strip() for v in s.split(",") if v.strip()]
    if items == ["all"]:
        return list(allowed)
    for v in items:
        if v not in allowed:
            raise SystemExit(f"--{what}: unknown {v!r}; choose from {', '.join(allowed)} or 'all'")
    return items


def _parse_points(s: str) -> List[Tuple[int, int]]:
    pts = []
    for item in s.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", item)
        if not m:
            raise SystemExit(f"--points: expected NxV items like 8192x128256, got {item!r}")
        N, V = int(m.group(1)), int(m.group(2))
        if N < 1 or V < 2:
            raise SystemExit(f"--points: need N >= 1 and V >= 2, got {N}x{V}")
        pts.append((N, V))
    return pts


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "gpu"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m perf.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Grids: --quick " + ", ".join(f"{n}x{v}" for n, v in QUICK_POINTS)
                                + "; default adds " + ", ".join(f"{n}x{v}" for n, v in DEFAULT_POINTS[len(QUICK_POINTS):]))
    p.add_argument("--quick", action="store_true", help="7 shapes, bf16 only, < 3 minutes on one H100")
    p.add_argument("--dtypes", help="comma list of bf16,fp16,fp32 (default: bf16 with --quick, else bf16,fp32; "
                                    "fp32 on the CPU)")
    p.add_argument("--labels", help="comma list of soft,hard (default both)")
    p.add_argument("--passes", help="comma list of forward,backward,step (default all; CPU: forward,step)")
    p.add_argument("--methods", help="comma list of " + ",".join(METHODS) + " (default all available; "
                                     "CPU: xent_triton,torch_eager)")
    p.add_argument("--points", help="comma list of NxV, replacing the grid, e.g. 8192x128256,1x128256")
    p.add_argument("--out", help="output directory (default perf/results/<gpu-slug>-<date>/; on the CPU a "
                                 "temporary directory)")
    p.add_argument("--max-minutes", type=float,
                   help=f"stop adding points once this much time is used (default {QUICK_GUARD_MIN} with "
                        f"--quick, {DEFAULT_GUARD_MIN} otherwise, {CPU_GUARD_MIN} on the CPU)")
    p.add_argument("--warmup-ms", type=float, help="do_bench warmup (default 25 with --quick, else 10)")
    p.add_argument("--rep-ms", type=float, help="do_bench rep (default 100 with --quick, else 50; CPU: perf_counter budget, 50)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="label smoothing of the class-index rows, for every method that has it (default 0)")
    p.add_argument("--cpu-all-methods", action="store_true",
                   help="CPU mode only: run every method and pass (torch.compile included) on the tiny CPU "
                        "grid, to exercise the GPU code path's logic; the timings mean nothing")
    p.add_argument("--cpu-threads", type=int, default=1, help="CPU mode: torch intra-op threads (default 1)")
    p.add_argument("--summary", metavar="CSV", help="print the summary table of an existing sweep.csv and exit")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.summary:
        print(summary_text(read_csv(Path(args.summary))))
        return 0
    global xt
    import xent_triton as xt
    from xent_triton import config

    log = Log()
    cuda = torch.cuda.is_available()
    today = _dt.date.today().isoformat()
    started = time.monotonic()

    if cuda:
        device = torch.device("cuda")
        gpu = torch.cuda.get_device_name(device)
        points = _parse_points(args.points) if args.points else (QUICK_POINTS if args.quick else DEFAULT_POINTS)
        dtypes = _parse_list(args.dtypes, list(DTYPES), "dtypes") or (["bf16"] if args.quick else ["bf16", "fp32"])
        passes = _parse_list(args.passes, PASSES, "passes") or list(PASSES)
        methods = _parse_list(args.methods, METHODS, "methods") or list(METHODS)
        guard = args.max_minutes if args.max_minutes is not None else (
            QUICK_GUARD_MIN if args.quick else DEFAULT_GUARD_MIN)
        warmup = args.warmup_ms if args.warmup_ms is not None else (25.0 if args.quick else 10.0)
        rep = args.rep_ms if args.rep_ms is not None else (100.0 if args.quick else 50.0)
        out_dir = Path(args.out) if args.out else (
            Path(__file__).resolve().parent / "results" / f"{_slug(gpu)}-{today}")
        if args.cpu_all_methods:
            log("note: --cpu-all-methods is for runs without a GPU; ignored")
    else:
        device = torch.device("cpu")
        gpu = "cpu"
        banner = ("NO GPU FOUND (torch.cuda.is_available() is False). This is a CPU-only comparison of the "
                  "xent_triton torch fallback against torch eager, timed with time.perf_counter medians. "
                  "It says nothing about the Triton kernels.")
        print("=" * 100)
        print(banner)
        print("=" * 100, flush=True)
        log.lines.append(banner)
        # Force the fallback (TRITON_INTERPRET=1 would otherwise run the interpreter here). The package read
        # XENT_TRITON_BACKEND at its import: set the backend through its API.
        config.set_backend("torch")
        # One intra-op thread by default: on a shared machine the OpenMP pool's wake-ups (tens of ms
        # each when cores are oversubscribed) swamp these small shapes.
        torch.set_num_threads(max(1, args.cpu_threads))
        if args.quick:
            log("note: --quick only chooses the GPU grid; the CPU comparison has its own small grid")
        points = _parse_points(args.points) if args.points else CPU_POINTS
        dtypes = _parse_list(args.dtypes, list(DTYPES), "dtypes") or ["fp32"]
        if args.cpu_all_methods:
            passes = _parse_list(args.passes, PASSES, "passes") or list(PASSES)
            methods = _parse_list(args.methods, METHODS, "methods") or list(METHODS)
        else:
            passes = _parse_list(args.passes, PASSES, "passes") or ["forward", "step"]
            methods = _parse_list(args.methods, METHODS, "methods") or ["xent_triton", "torch_eager"]
        guard = args.max_minutes if args.max_minutes is not None else CPU_GUARD_MIN
        warmup = args.warmup_ms if args.warmup_ms is not None else 0.0
        rep = args.rep_ms if args.rep_ms is not None else 50.0
        out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix=f"xent_sweep_cpu-{today}-"))
    labels_kinds = _parse_list(args.labels, LABELS, "labels") or list(LABELS)

    out_dir.mkdir(parents=True, exist_ok=True)
    log.open(out_dir / "log.txt")
    import triton

    meta = [f"date: {today}", f"device: {gpu}" + (f" ({torch.cuda.get_device_properties(device).multi_processor_count} SMs)" if cuda else ""),
            f"python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
            f"xent_triton {getattr(xt, '__version__', '?')}",
            f"command: python -m perf.sweep {' '.join(list(argv) if argv is not None else sys.argv[1:])}".rstrip(),
            f"timer: {'triton.testing.do_bench median' if cuda else f'time.perf_counter median, {torch.get_num_threads()} CPU thread(s)'}, "
            f"warmup {warmup:g} ms, rep {rep:g} ms",
            f"dtypes {','.join(dtypes)}; labels {','.join(labels_kinds)}; passes {','.join(passes)}; "
            f"points {' '.join(f'{n}x{v}' for n, v in points)}"]
    for m in meta:
        log(m)
    log(f"output: {out_dir}")

    if cuda:
        cfg = config.current()
        try:
            choice = config.choose_backend("cuda", cfg)
        except Exception as e:  # informational only
            choice = f"unknown ({type(e).__name__}: {e})"
        log(f"xent_triton backend on cuda: {choice} (config: {cfg})")
        if choice != "triton":
            log("WARNING: xent_triton is not using the Triton kernels on this GPU (XENT_TRITON_BACKEND?); "
                "its rows measure the torch fallback")
        if getattr(cfg, "interpreter", False):
            log("WARNING: TRITON_INTERPRET is set: Triton kernels run in the interpreter; timings are meaningless")

    liger_cls = _liger_class(log) if "liger" in methods and "hard" in labels_kinds else None
    if liger_cls is None and "liger" in methods:
        methods.remove("liger")
    if "torch_compile" in methods:
        _configure_dynamo(log)

    timer = Timer(cuda, warmup, rep)
    copy_gbps = run_copy_gbps(device, log)  # the one copy bandwidth of the run (perf.common.copy_gbps)
    meta.append(f"copy bandwidth: {copy_gbps:.0f} GB/s (bytes read + written; perf.common.copy_gbps)")

    csv_path = out_dir / "sweep.csv"
    csv_file = open(csv_path, "w", newline="")
    writer = csv.DictWriter(csv_file, fieldnames=CSV_FIELDS)
    writer.writeheader()
    if args.label_smoothing:
        if "torch_seed_two_step" in methods:
            methods.remove("torch_seed_two_step")  # soft labels only; it has no smoothing anyway
        meta.append(f"class-index rows with label_smoothing={args.label_smoothing:g} (soft rows without)")
    ctx = Ctx(cuda, device, gpu, timer, log, Losses(liger_cls, args.label_smoothing), methods, passes, copy_gbps,
              [], writer, csv_file, set())

    blocks = [(N, V, d, lab) for (N, V) in points for d in dtypes for lab in labels_kinds]
    deadline = started + guard * 60.0
    log(f"{len(blocks)} blocks (point x dtype x labels), methods {','.join(methods)}; "
        f"time guard {guard:g} min")

    def _sigterm(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        signal.signal(signal.SIGTERM, _sigterm)
    except Exception:
        pass

    bar = progress(len(blocks), "sweep", log)
    log.bar = bar
    done = 0
    stopped = None
    try:
        for i, (N, V, d, lab) in enumerate(blocks):
            if time.monotonic() > deadline:
                stopped = i
                break
            bar.set_postfix_str(f"{N}x{V} {d} {lab}", refresh=sys.stdout.isatty())
            t0 = time.monotonic()
            status = run_block(ctx, N, V, d, lab, args.seed + i)
            log(f"block {N}x{V} {d} {lab}: {status} ({time.monotonic() - t0:.1f} s)")
            bar.update(1)
            done += 1
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}) after {done} blocks; writing what was measured")
        stopped = done
    finally:
        bar.close()
        log.bar = None
        csv_file.close()
        try:
            # What is measured is on disk; a late SIGTERM (a wrapper's timeout) must not cost the table
            # and plots, which take seconds. A wrapper's SIGKILL grace still bounds the run.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        except Exception:
            pass
    if stopped is not None and stopped < len(blocks):
        rest = blocks[stopped:]
        log(f"STOPPED: time budget of {guard:g} min used (or interrupted) after {done} of {len(blocks)} blocks; "
            f"not run: " + ", ".join(f"{n}x{v} {d} {lab}" for n, v, d, lab in rest))
        meta.append(f"STOPPED early after {done} of {len(blocks)} blocks (time guard {guard:g} min); see log.txt")

    try:
        copy_end = measure_copy_gbps(device)
        log(f"copy bandwidth at end: {copy_end:.0f} GB/s (pct_of_copy uses {copy_gbps:.0f})")
        meta.append(f"copy bandwidth at end: {copy_end:.0f} GB/s (pct_of_copy uses {copy_gbps:.0f})")
    except Exception as e:
        log(f"copy bandwidth at end: failed ({e})")

    write_markdown(out_dir / "sweep.md", ctx.rows, meta)
    pngs = [] if args.no_plots else make_plots(ctx.rows, out_dir, f"{gpu} {today}", log)
    elapsed = time.monotonic() - started
    log(f"wrote {csv_path}, {out_dir / 'sweep.md'}" + "".join(f", {p}" for p in pngs)
        + f", {out_dir / 'log.txt'} in {elapsed / 60:.1f} min")
    text = summary_text(ctx.rows)
    print()
    print(text)
    if not cuda:
        print()
        print("(CPU-only comparison of the xent_triton torch fallback: no GPU was found. Output: "
              f"{out_dir})")
    return 1 if any(r.get("check") in ("FAIL", "ERROR") for r in ctx.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
