"""The custom ops in the PyTorch ecosystem: torch.compile, CUDA graphs, autocast, opcheck."""
import pytest
import torch
import torch.nn.functional as F

import xent_triton
from xent_triton import SoftmaxCrossEntropyFunction as SoftmaxCrossEntropyWithLogits
from helpers import close, rand_logits, rand_probs, tol, set_config

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _model(device, dtype=torch.float32):
    torch.manual_seed(1)
    return torch.nn.Linear(16, 37, device=device, dtype=dtype)


@pytest.mark.parametrize("mode", ["soft", "hard", "hard_extras"])
def test_compile_fullgraph_matches_eager(backend, device, mode):
    lin = _model(device)
    x = torch.randn(12, 16, device=device)
    t = torch.randint(0, 37, (12,), device=device)
    t[3] = -100
    y = rand_probs((12, 37), torch.float32, device)

    def step(x):
        logits = lin(x)
        if mode == "soft":
            return xent_triton.softmax_cross_entropy_with_logits(y, logits).mean()
        if mode == "hard":
            return xent_triton.cross_entropy(logits, t)
        return xent_triton.cross_entropy(logits, t, label_smoothing=0.1, lse_square_scale=1e-3, softcap=5.0,
                                         weight=torch.linspace(0.5, 1.5, 37, device=device))

    eager = step(x)
    g_eager = torch.autograd.grad(eager, lin.weight)[0]
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    g = torch.autograd.grad(out, lin.weight)[0]
    close(out, eager, rtol=1e-6, atol=1e-6)
    close(g, g_eager, rtol=1e-6, atol=1e-6)


def test_compile_inductor(backend, device):
    """The default backend (Inductor) too: the fake implementations carry shapes and strides."""
    x = rand_logits((8, 40), torch.float32, device)
    t = torch.randint(0, 40, (8,), device=device)
    torch._dynamo.reset()
    fn = torch.compile(lambda z: xent_triton.cross_entropy(z * 2.0, t, reduction="sum"), fullgraph=True)
    out = fn(x)
    (g,) = torch.autograd.grad(out, x)
    x2 = x.detach().clone().requires_grad_()
    ref = F.cross_entropy(x2 * 2.0, t, reduction="sum")
    (r,) = torch.autograd.grad(ref, x2)
    close(out, ref, rtol=1e-5, atol=1e-5)
    close(g, r, rtol=1e-5, atol=1e-5)


def test_opcheck(backend, device):
    """torch.library.opcheck: schema, fake tensor, autograd registration and dispatch consistency."""
    x = rand_logits((4, 9), torch.float64, device)
    y = rand_probs((4, 9), torch.float64, device, requires_grad=True)
    t = torch.tensor([1, -100, 8, 0], device=device)
    torch.library.opcheck(torch.ops.xent_triton.forward.default,
                          (x, y, None, None, 1, -100, 0.1, 0.01, 0.0, False))
    torch.library.opcheck(torch.ops.xent_triton.forward.default,
                          (x, None, t, None, 1, -100, 0.0, 0.0, 3.0, True))
    stats = torch.stack([x.detach().amax(1), torch.rand(4, dtype=torch.float64, device=device) + 2.0,
                         torch.rand(4, dtype=torch.float64, device=device)], dim=1)
    g = torch.randn(4, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.xent_triton.backward.default,
                          (g, x.detach(), y.detach(), None, None, stats, 1, -100, 0.0, 0.0, 0.0, True, True))


def test_autocast_keeps_half_logits(backend, device):
    """Under autocast the bf16 logits go straight in (no fp32 copy) and the loss is fp32."""
    if device.type == "cpu":
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    lin = _model(device)
    x = torch.randn(10, 16, device=device)
    t = torch.randint(0, 37, (10,), device=device)
    saved = []
    with autocast:
        logits = lin(x)
        assert logits.dtype == torch.bfloat16
        labels = torch.softmax(logits.detach().float(), -1)
        with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
            loss = xent_triton.cross_entropy(logits, t)
            soft = xent_triton.softmax_cross_entropy_with_logits(labels, logits)
        ref = F.cross_entropy(logits, t)
    assert loss.dtype == torch.float32 and soft.dtype == torch.float32 and ref.dtype == torch.float32
    # Every N x V tensor our ops saved is an input itself: the bf16 logits (no fp32 copy) or the labels.
    big = [s for s in saved if s.numel() == logits.numel()]
    assert big and {s.data_ptr() for s in big} <= {logits.data_ptr(), labels.data_ptr()}
    assert any(s.data_ptr() == logits.data_ptr() and s.dtype == torch.bfloat16 for s in big)
    close(loss, F.cross_entropy(logits.detach().double(), t), rtol=1e-5, atol=1e-5)
    loss.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


@cuda_only
@pytest.mark.parametrize("shape", [(64, 5000), (2048, 100)])  # split rows; row tiles
def test_cuda_graph_capture_and_replay(shape):
    dev = torch.device("cuda")
    x = rand_logits(shape, torch.bfloat16, dev, requires_grad=False)
    t = torch.randint(0, shape[1], shape[:1], device=dev)
    y = rand_probs(shape, torch.bfloat16, dev)
    static_x = x.clone().requires_grad_()

    def step():
        loss = xent_triton.cross_entropy(static_x, t) + xent_triton.softmax_cross_entropy_with_logits(
            y, static_x).mean()
        (g,) = torch.autograd.grad(loss, static_x)
        return loss, g

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm up: compile kernels, settle the allocator
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_g = step()
    for _ in range(2):
        new = rand_logits(shape, torch.bfloat16, dev, requires_grad=False)
        with torch.no_grad():
            static_x.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        ref_loss, ref_g = step()
        close(static_loss, ref_loss, rtol=0, atol=0)
        close(static_g, ref_g, rtol=0, atol=0)


@cuda_only
def test_compile_reduce_overhead_replays():
    """torch.compile's CUDA-graph mode records the step's kernels once and replays them: on new inputs each
    call, the loss and the weight gradient are eager torch's (the ops have no host sync to break it)."""
    dev = torch.device("cuda")
    lin = _model(dev)
    t = torch.randint(0, 37, (64,), device=dev)
    t[5] = -100
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(lambda z: xent_triton.cross_entropy(lin(z), t, label_smoothing=0.1),
                             mode="reduce-overhead", fullgraph=True)
    for _ in range(4):  # the first calls warm up and record; the later ones replay
        x = torch.randn(64, 16, device=dev)
        torch.compiler.cudagraph_mark_step_begin()
        loss = compiled(x)
        loss.backward()
        g, lin.weight.grad = lin.weight.grad.clone(), None
        ref = F.cross_entropy(lin(x).double(), t, label_smoothing=0.1)
        ref.backward()
        close(loss.detach(), ref.detach().float(), rtol=1e-5, atol=1e-5)
        close(g, lin.weight.grad, rtol=1e-5, atol=1e-5)
        lin.weight.grad = lin.bias.grad = None
    # Inductor falls back to plain launches, silently but for this counter, where it cannot use CUDA graphs.
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_tensors_on_another_gpu_than_the_current_one(kind):
    """Triton launches on the current device; the ops make the tensors' device current first."""
    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    x = rand_logits((48, 3000), torch.float32, dev)
    t = torch.randint(0, 3000, (48,), device=dev) if kind == "hard" else rand_probs((48, 3000), torch.float32, dev)
    loss = xent_triton.cross_entropy(x, t)
    (g,) = torch.autograd.grad(loss, x)
    xd = x.detach().double().requires_grad_()
    ref = F.cross_entropy(xd, t if kind == "hard" else t.double())
    (r,) = torch.autograd.grad(ref, xd)
    assert torch.cuda.current_device() == 0 and loss.device == g.device == dev
    close(loss, ref, rtol=1e-5, atol=1e-5)
    close(g, r, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ eager calls skip the dispatcher (prepare.direct)

def _all_paths(device):
    """Loss and gradients of each entry point that reaches the ops, for the same inputs."""
    torch.manual_seed(3)
    x = rand_logits((9, 41), torch.float32, device)
    y = rand_probs((9, 41), torch.float32, device, requires_grad=True)
    t = torch.randint(0, 41, (9,), device=device)
    t[2] = -100
    w = torch.rand(41, device=device) + 0.5
    xh = rand_logits((9, 41), torch.bfloat16, device)
    ignored = torch.full_like(t, -100)
    cases = [
        (lambda: xent_triton.softmax_cross_entropy_with_logits(y, x).sum(), [x, y]),
        (lambda: xent_triton.cross_entropy(x, t, weight=w, label_smoothing=0.1, lse_square_scale=1e-3), [x]),
        (lambda: xent_triton.cross_entropy(x * 1.0, t, inplace_backward=True, reduction="sum"), [x]),
        (lambda: SoftmaxCrossEntropyWithLogits.apply(y, x, -1).mean(), [x, y]),
        (lambda: xent_triton.cross_entropy(x, y.detach(), reduction="none").sum(), [x]),
        # Reduced losses (one autograd node on the direct path, function.CrossEntropyFunction): the mean's
        # division in the backward kernel must give the composition's bits.
        (lambda: xent_triton.cross_entropy(x, t), [x]),
        (lambda: xent_triton.cross_entropy(xh, t) * 3.0, [xh]),
        (lambda: xent_triton.cross_entropy(xh, t, reduction="sum", weight=w.to(torch.float64)), [xh]),
        (lambda: xent_triton.cross_entropy(x, y, label_smoothing=0.2), [x, y]),
        # A row count as denominator, and an upstream gradient that is not a power of 2: on CUDA autograd
        # divides by a host number as a multiply by its reciprocal, which the direct path must match.
        (lambda: xent_triton.cross_entropy(x, y) * 3.0, [x, y]),
        (lambda: xent_triton.cross_entropy(xh, y.to(torch.bfloat16), reduction="sum") / 7, [xh]),
        (lambda: xent_triton.cross_entropy(x, ignored), [x]),
    ]
    return [(loss.detach(), *torch.autograd.grad(loss, wrt)) for loss, wrt in ((f(), wrt) for f, wrt in cases)]


def test_eager_direct_path_equals_custom_ops(backend, device, monkeypatch):
    """The eager path (implementation called directly) and the custom ops give bitwise the same losses and
    gradients, for plain, weighted/smoothed/z-loss, in-place and Function entry points."""
    from xent_triton import prepare
    direct = _all_paths(device)
    monkeypatch.setattr(prepare, "direct", lambda *t: False)
    through_ops = _all_paths(device)
    for a, b in zip(direct, through_ops):
        for u, v in zip(a, b):
            assert (u is None) == (v is None)
            if u is not None:
                # Exact, NaN where the other is NaN (all rows ignored: a mean of 0 / 0).
                torch.testing.assert_close(u, v, rtol=0, atol=0, equal_nan=True)


class _Recorder:
    """Stands in for a kernel: records launches instead of running them (host-side tests)."""

    def __init__(self, log, name):
        self.log, self.name = log, name

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append(("launch", self.name))


_VIEWS = {"view", "_unsafe_view", "reshape", "_reshape_alias", "permute", "expand", "as_strided", "detach",
          "alias", "select", "empty", "empty_strided", "new_empty", "t", "squeeze", "unsqueeze"}


def test_mean_step_host_work(device, monkeypatch):
    """Host work of an eager training step with the default mean (function.CrossEntropyFunction): one autograd node,
    two kernel launches, and no torch kernel in the backward but autograd's own ones_like. Small problems
    take as long as their host work (perf/NOTES.md P14); this holds the count down."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from xent_triton import _alloc, prepare, triton_backend

    set_config(monkeypatch, backend="triton")
    monkeypatch.setattr(_alloc, "POISON", None)  # no kernel runs: nothing to poison, and no fill to count
    log = []
    for name in dir(triton_backend):
        if name.endswith("_kernel"):
            monkeypatch.setattr(triton_backend, name, _Recorder(log, name))
    monkeypatch.setattr(prepare, "direct", lambda *t: True)  # the dispatch mode below would turn it off
    prepare.clear_cache()  # calls prepared before hold the real kernels

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in _VIEWS:
                log.append(("op", name))
            return func(*args, **(kwargs or {}))

    x = torch.randn(300, 1000, device=device, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 1000, (300,), device=device)
    with Ops():
        loss = xent_triton.cross_entropy(x, t)
        forward = list(log)
        log.clear()
        loss.backward()
    assert type(loss.grad_fn).__name__ == "CrossEntropyFunctionBackward"
    assert [type(f).__name__ for f, _ in loss.grad_fn.next_functions if f is not None] == ["AccumulateGrad"]
    # The denominator (ne, sum), the kernel, the loss's sum and its division (rounded on store).
    assert [e for e in forward if e[0] == "launch"] == [("launch", "xent_forward_kernel")]
    assert sorted(e[1] for e in forward if e[0] == "op") == ["div", "ne", "sum", "sum"]
    # Which backward kernel depends on the device's SM count (launch_config.rows_launch).
    assert log in ([("op", "ones_like"), ("launch", k)] for k in ("xent_backward_kernel", "xent_rows_backward_kernel"))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_compiled_autograd_reduced_loss(backend, device, kind, reduction):
    """Compiled autograd traces the reduced loss's backward with fake tensors: it must take the custom op
    (it reached the kernels with fake tensors once), and give eager's gradient."""
    x = rand_logits((6, 11), torch.float32, device)
    t = torch.randint(0, 11, (6,), device=device) if kind == "hard" else rand_probs((6, 11), torch.float32, device)
    if kind == "hard":
        t[1] = -100
    (g_eager,) = torch.autograd.grad(xent_triton.cross_entropy(x, t, reduction=reduction) * 3.0, x)
    torch._dynamo.reset()
    x.grad = None
    loss = xent_triton.cross_entropy(x, t, reduction=reduction) * 3.0
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager", fullgraph=True)):
        loss.backward()
    close(x.grad, g_eager, **tol(torch.float32))


def test_direct_only_for_plain_eager_tensors(device):
    """prepare.direct: plain tensors in eager mode only; fake tensors, torch.func transforms and tensor
    subclasses go through the custom ops."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from xent_triton.prepare import direct
    x = torch.randn(3, 5, device=device)
    assert direct(x, None, torch.nn.Parameter(x.clone()))
    with FakeTensorMode() as mode:
        assert not direct(mode.from_tensor(x))
        assert not direct(torch.empty(3, 5, device=device))  # the mode alone is enough

    class Sub(torch.Tensor):
        pass

    assert not direct(x.as_subclass(Sub))
    seen = []
    torch.func.grad(lambda z: seen.append(direct(z)) or z.sum())(x)
    assert seen == [False]


def test_jit_trace_records_the_custom_op(backend, device):
    """torch.jit.trace sees the custom op (not the implementation, which would get traced sizes), and the
    traced function gives eager's result on new inputs."""
    x = torch.randn(4, 10, device=device)
    t = torch.randint(0, 10, (4,), device=device)
    traced = torch.jit.trace(lambda z: xent_triton.cross_entropy(z, t, reduction="none"), (x,), check_trace=False)
    assert "xent_triton::forward" in str(traced.graph)
    x2 = torch.randn(4, 10, device=device)
    close(traced(x2), xent_triton.cross_entropy(x2, t, reduction="none"), rtol=0, atol=0)


def test_torch_export_records_the_custom_op(backend, device):
    """torch.export records the custom op through its fake implementation, with a dynamic batch dim, and
    the exported module gives eager's loss and parameter gradients on a batch of another size."""
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = _model(device)

        def forward(self, h, t, y):
            logits = self.lin(h)
            hard = xent_triton.cross_entropy(logits, t, label_smoothing=0.1, lse_square_scale=1e-3)
            return hard + xent_triton.softmax_cross_entropy_with_logits(y, logits).mean()

    model = Head()
    batch = torch.export.Dim("batch", min=2)
    h = torch.randn(5, 16, device=device)
    t = torch.randint(0, 37, (5,), device=device)
    y = rand_probs((5, 37), torch.float32, device)
    exported = torch.export.export(model, (h, t, y), dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    assert "xent_triton.forward" in exported.graph_module.code
    run = exported.module()
    h2 = torch.randn(9, 16, device=device)
    t2 = torch.randint(0, 37, (9,), device=device)
    t2[2] = -100
    y2 = rand_probs((9, 37), torch.float32, device)
    losses, grads = [], []
    for m in (run, model):
        m.zero_grad(set_to_none=True)
        loss = m(h2, t2, y2)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in m.parameters()])
    close(losses[0], losses[1], **tol(torch.float32))
    for a, b in zip(*grads):
        close(a, b, **tol(torch.float32))


def test_forward_mode_ad_raises(backend, device):
    """No jvp formula: forward-mode AD raises instead of a zero or missing tangent (torch.func.jvp through
    the custom op returned 0 before the check)."""
    import torch.autograd.forward_ad as fwAD
    x = rand_logits((4, 10), torch.float64, device, requires_grad=False)
    v = torch.randn_like(x)
    t = torch.randint(0, 10, (4,), device=device)
    y = rand_probs((4, 10), torch.float64, device)
    for f in (lambda z: xent_triton.cross_entropy(z, t),
              lambda z: xent_triton.softmax_cross_entropy_with_logits(y, z)):
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            torch.func.jvp(f, (x,), (v,))
        with fwAD.dual_level():
            with pytest.raises(NotImplementedError, match="jvp"):
                f(fwAD.make_dual(x, v))
