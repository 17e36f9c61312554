"""xent_triton.distributed: 2 and 3 gloo processes with uneven vocabulary shards.

Every child builds the same full tensors from one seed, takes its shard, and
compares the loss and its shard of every gradient with a float64 single-process
reference on the concatenated tensors. It also counts torch.distributed
collectives: one per forward (plus one size exchange on the first call per
(group, local size)), none in the backward.

Each launch runs on both backends (the ``backend`` fixture of conftest.py): the
parent hands its XENT_TRITON_BACKEND / TRITON_INTERPRET to the children, so the
"triton" runs use the Triton interpreter on CPU; shapes stay small for that reason.
CPU children fork from a forkserver that has imported torch once (a spawned child
spends ~10 s importing torch and torch._dynamo before its first custom-op call).
"""
import datetime
import functools
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import xent_triton
from xent_triton import distributed as xd
from helpers import magnitude_logits, ref_xent

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

CHILD_TIMEOUT_S = 240

_COLLECTIVES = (
    "all_gather", "all_gather_into_tensor", "all_gather_single", "_all_gather_base", "all_gather_object",
    "all_reduce", "reduce", "broadcast", "broadcast_object_list", "reduce_scatter", "reduce_scatter_tensor",
    "reduce_scatter_single", "_reduce_scatter_base", "all_to_all", "all_to_all_single", "gather", "scatter",
    "barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv",
)


class CollectiveCounter:
    """Counts outermost calls to torch.distributed collectives (a collective that
    calls another one internally counts once)."""

    def __init__(self):
        self.names = []
        self._depth = 0
        for mod in (dist, dist.distributed_c10d):
            for name in _COLLECTIVES:
                fn = getattr(mod, name, None)
                if fn is not None:
                    setattr(mod, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self._depth == 0:
                self.names.append(name)
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
        return counted

    def take(self):
        names, self.names = self.names, []
        return names


def _close(actual, expected, rtol, atol, what):
    torch.testing.assert_close(actual.detach().double().cpu(), expected.detach().double().cpu(), rtol=rtol,
                               atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _tol(dtype):
    return {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6), torch.bfloat16: (2e-2, 2e-2)}[dtype]


class Case:
    """One rank's view of a problem: full fp64 tensors and this rank's slice along ``axis``."""

    def __init__(self, sizes, rank, device, axis):
        self.sizes, self.rank, self.device, self.axis = sizes, rank, device, axis
        self.lo = sum(sizes[:rank])
        self.hi = self.lo + sizes[rank]
        self.V = sum(sizes)

    def shard(self, full, dtype, requires_grad=False):
        part = full.narrow(self.axis, self.lo, self.hi - self.lo).to(self.device, dtype).contiguous()
        return part.requires_grad_(requires_grad)

    def unshard(self, full):
        return full.narrow(self.axis, self.lo, self.hi - self.lo)


def _counted(counter, fn, expect, what):
    out = fn()
    names = counter.take()
    assert len(names) == expect, f"{what}: expected {expect} collective call(s), got {names}"
    return out


def _check_soft(counter, case, gen, dtype, batch, first):
    V = case.V
    x_full = (torch.randn(*batch, V, generator=gen, dtype=torch.float64) * 2).to(dtype).double()
    y_full = torch.rand(*batch, V, generator=gen, dtype=torch.float64)
    y_full = torch.where(y_full < 0.3, 0.0, y_full).to(dtype).double()  # some zero labels
    w = torch.randn(*batch, generator=gen, dtype=torch.float64)
    x = case.shard(x_full, dtype, True)
    y = case.shard(y_full, dtype, True)
    loss = _counted(counter, lambda: xd.softmax_cross_entropy_with_logits(y, x), 2 if first else 1, "soft forward")
    assert loss.dtype == dtype and loss.shape == tuple(batch)
    _counted(counter, lambda: (loss * w.to(case.device, dtype)).sum().backward(), 0, "soft backward")

    xr, yr = x_full.clone().requires_grad_(), y_full.clone().requires_grad_()
    ref = -(yr * torch.log_softmax(xr, -1)).sum(-1)
    (ref * w).sum().backward()
    rtol, atol = _tol(dtype)
    _close(loss, ref, rtol, atol, f"soft loss {dtype}")
    _close(x.grad, case.unshard(xr.grad), rtol, atol, f"soft dlogits {dtype}")
    _close(y.grad, case.unshard(yr.grad), rtol, atol, f"soft dlabels {dtype}")


def _check_hard(counter, case, gen, dtype, shape, reduction, smoothing, ignore_index, n_ignored, neg_inf_row):
    """shape: the input's shape with the class axis (1) holding the FULL class count."""
    x_full = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 2).to(dtype).double()
    tshape = shape[:1] + shape[2:]
    t = torch.randint(0, case.V, tshape, generator=gen).reshape(-1)
    # Shard boundaries are the interesting indices: first/last class of each shard.
    edges = sorted({b for k in range(len(case.sizes)) for b in (sum(case.sizes[:k]), sum(case.sizes[:k + 1]) - 1)})
    t[:len(edges)] = torch.tensor(edges)[: t.numel()]
    if n_ignored:
        t[-n_ignored:] = ignore_index
    if neg_inf_row:  # rank 0's whole shard is -inf in row 0, whose target lives on the last shard
        t[0] = case.V - 1
        x_full.view(shape[0], case.V, -1)[0, : case.sizes[0]] = float("-inf")
    t = t.view(tshape)
    x = case.shard(x_full, dtype, True)
    kw = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing)
    loss = _counted(counter, lambda: xd.cross_entropy(x, t.to(case.device), **kw), 1, f"hard forward {kw}")
    assert loss.dtype == dtype
    w = torch.randn(loss.shape, generator=gen, dtype=torch.float64)
    _counted(counter, lambda: (loss * w.to(case.device, dtype)).sum().backward(), 0, "hard backward")

    xr = x_full.clone().requires_grad_()
    ref = F.cross_entropy(xr, t, **kw)
    (ref * w).sum().backward()
    rtol, atol = _tol(dtype)
    _close(loss, ref, rtol, atol, f"hard loss {dtype} {kw}")
    _close(x.grad, case.unshard(xr.grad), rtol, atol, f"hard dlogits {dtype} {kw}")


def _check_magnitudes(counter, case, dtype):
    """Logits up to 1e30 (float32) or 1e300 (float64): the combine keeps each row's max and log-sum apart, so
    loss, dlogits and dlabels match the float64 reference at every magnitude (tests/test_magnitudes.py)."""
    torch.manual_seed(5)  # the same full tensors on every rank
    x_full = magnitude_logits(dtype, "cpu", case.V).double()
    mass = torch.rand(x_full.shape[0], 1, dtype=torch.float64) + 0.5
    y_full = (torch.softmax(torch.randn(x_full.shape, dtype=torch.float64), -1) * mass).to(dtype).double()
    w = torch.randn(x_full.shape[0], dtype=torch.float64)
    x, y = case.shard(x_full, dtype, True), case.shard(y_full, dtype, True)
    loss = _counted(counter, lambda: xd.softmax_cross_entropy_with_logits(y, x), 1, "magnitudes forward")
    (loss * w.to(case.device, dtype)).sum().backward()
    xr, yr = x_full.clone().requires_grad_(), y_full.clone().requires_grad_()
    ref = ref_xent(xr, labels=yr)
    (ref * w.to(dtype).double()).sum().backward()
    rtol, atol = _tol(dtype)
    _close(loss, ref.to(dtype), rtol, atol, f"magnitudes loss {dtype}")
    _close(x.grad, case.unshard(xr.grad).to(dtype), rtol, atol, f"magnitudes dlogits {dtype}")
    _close(y.grad, case.unshard(yr.grad).to(dtype), rtol, atol, f"magnitudes dlabels {dtype}")


def _check_probability_target(counter, case, gen):
    x_full = torch.randn(5, case.V, generator=gen, dtype=torch.float64)
    p_full = torch.softmax(torch.randn(5, case.V, generator=gen, dtype=torch.float64), -1)
    x, p = case.shard(x_full, torch.float64, True), case.shard(p_full, torch.float64, True)
    loss = _counted(counter, lambda: xd.cross_entropy(x, p, label_smoothing=0.2), 1, "probability forward")
    _counted(counter, loss.backward, 0, "probability backward")
    xr, pr = x_full.clone().requires_grad_(), p_full.clone().requires_grad_()
    F.cross_entropy(xr, pr, label_smoothing=0.2).backward()
    ref = F.cross_entropy(x_full, p_full, label_smoothing=0.2)
    _close(loss, ref, 1e-10, 1e-12, "probability loss")
    _close(x.grad, case.unshard(xr.grad), 1e-10, 1e-12, "probability dlogits")
    _close(p.grad, case.unshard(pr.grad), 1e-10, 1e-12, "probability dtarget")
    # fp32 logits with fp64 probabilities: torch's promoted dtype, and the fp64 accumulation behind it.
    x32 = case.shard(x_full.float(), torch.float32, False)
    mixed = xd.cross_entropy(x32, p.detach(), reduction="none")
    counter.take()  # a new dtype pair may exchange the shard layout first: not what is counted here
    ref = F.cross_entropy(x_full.float(), p_full, reduction="none")
    assert mixed.dtype == ref.dtype == torch.float64, (mixed.dtype, ref.dtype)
    _close(mixed, F.cross_entropy(x_full.float().double(), p_full, reduction="none"), 1e-10, 1e-12,
           "mixed-dtype probability loss")


def _check_layout_errors(counter, rank):
    # A fresh local size per rank forces the size exchange, which validates the row count.
    x = torch.zeros(4 + rank, 20 + rank)
    y = torch.zeros_like(x)
    with pytest.raises(ValueError, match="same rows"):
        xd.softmax_cross_entropy_with_logits(y, x)
    assert counter.take() == ["all_gather"]
    # An empty shard is refused on every rank, not only on the rank that holds it.
    x = torch.zeros(3, 30 if rank == 0 else 0)
    with pytest.raises(ValueError, match="at least one class"):
        xd.cross_entropy(x, torch.zeros(3, dtype=torch.long))
    assert counter.take() == ["all_gather"]


def _worker(rank, world, store, device, sizes, env):
    # The parent's settings at launch time (a forkserver child would otherwise see the environment
    # of the moment the server started), read again as xent_triton's import reads them.
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=CHILD_TIMEOUT_S))
    try:
        subgroup = dist.new_group([1, 2]) if world == 3 and device == "cpu" else None
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        xent_triton.config.active = xent_triton.config.from_environment()
        from xent_triton import _alloc
        _alloc.POISON = float("nan")  # an unwritten output element shows up as NaN
        if env.get("XENT_TRITON_BACKEND") in ("torch", "triton"):
            cfg = xent_triton.config.active
            assert xent_triton.config.choose_backend(torch.device(device).type, cfg) == env["XENT_TRITON_BACKEND"]
        counter = CollectiveCounter()
        gen = torch.Generator().manual_seed(1234)  # the same stream on every rank
        last = Case(sizes, rank, device, axis=-1)
        _check_soft(counter, last, gen, torch.float32, (2, 3), first=True)
        _check_soft(counter, last, gen, torch.float64, (4,), first=False)
        axis1 = Case(sizes, rank, device, axis=1)
        _check_hard(counter, axis1, gen, torch.float32, (7, last.V), "mean", 0.1, -100, 2, False)
        _check_hard(counter, axis1, gen, torch.float64, (3, last.V, 2), "none", 0.0, 1, 1, True)
        _check_hard(counter, axis1, gen, torch.bfloat16, (5, last.V), "sum", 0.05, -100, 0, False)
        _check_probability_target(counter, axis1, gen)
        _check_magnitudes(counter, last, torch.float32)
        _check_magnitudes(counter, last, torch.float64)
        if device == "cpu" and world == 2:
            _check_layout_errors(counter, rank)
        if subgroup is not None and rank in (1, 2):
            # Group ranks, not global ranks, give the shard order: global rank 1 owns the first shard.
            gsizes = [sizes[1], sizes[2]]
            x_full = torch.randn(3, sum(gsizes), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
            case = Case(gsizes, rank - 1, device, axis=-1)
            x = case.shard(x_full, torch.float64, True)
            y = torch.softmax(x.detach(), -1)  # per-shard labels, whatever their sum
            loss = _counted(counter, lambda: xd.softmax_cross_entropy_with_logits(y, x, group=subgroup), 2,
                            "subgroup forward")
            y_full = torch.cat([torch.softmax(x_full[:, :gsizes[0]], -1), torch.softmax(x_full[:, gsizes[0]:], -1)], -1)
            ref = -(y_full * torch.log_softmax(x_full, -1)).sum(-1)
            _close(loss, ref, 1e-10, 1e-12, "subgroup loss")
        counter.take()
    finally:
        dist.destroy_process_group()


def _start_method(device):
    """forkserver for CPU children where there is one: the server imports torch (and torch._dynamo,
    which the first custom-op call pulls in: ~5 s per process) once, and every child forks from it.
    CUDA children are spawned: nothing that may have touched the driver is forked."""
    import multiprocessing
    if device != "cpu" or "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["torch", "torch.distributed", "torch._dynamo", "xent_triton"])
    return "forkserver"


def _launch(tmp_path, world, sizes, device="cpu"):
    env = {key: os.environ.get(key) for key in ("XENT_TRITON_BACKEND", "TRITON_INTERPRET")}
    if device == "cpu" and env["XENT_TRITON_BACKEND"] == "triton":
        env["TRITON_INTERPRET"] = "1"  # the kernels run on CPU tensors only under the interpreter
    store = tmp_path / f"store_{world}_{device.replace(':', '_')}"
    ctx = mp.start_processes(_worker, args=(world, str(store), device, sizes, env), nprocs=world, join=False,
                             start_method=_start_method(device))
    deadline = time.monotonic() + CHILD_TIMEOUT_S + 30
    while not ctx.join(timeout=1):  # raises ProcessRaisedException with the child's traceback
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"{world} processes on {device} did not finish within {CHILD_TIMEOUT_S + 30} s")


@pytest.mark.parametrize("world,sizes", [(2, [5, 3]), (3, [4, 1, 6])])
def test_vocab_parallel_cpu(tmp_path, backend, world, sizes):
    if backend == "triton" and torch.cuda.is_available():
        # CPU children could run the kernels only under the interpreter, which is not what a GPU machine
        # tests (and triton 3.6's interpreter fails with numpy >= 2.4, as on the GPU image); the CUDA
        # test below runs the compiled kernels in two processes instead.
        pytest.skip("on a CUDA machine the kernels are checked by test_vocab_parallel_two_processes_one_gpu")
    _launch(tmp_path, world, sizes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_vocab_parallel_two_processes_one_gpu(tmp_path, backend):
    # Both ranks on cuda:0, gloo: gloo's all_gather takes CUDA tensors (it stages them through host memory).
    _launch(tmp_path, 2, [6, 3], device="cuda:0")


def test_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        xd.softmax_cross_entropy_with_logits(torch.zeros_like(x), x)
    with pytest.raises(RuntimeError, match="init_process_group"):
        xd.cross_entropy(x, torch.zeros(2, dtype=torch.long))
