"""The fused training step (FusedStepCrossEntropy, kernels/xent_step.py).

The forward writes dlogits for the upstream gradient it expects; the backward
keeps the rows that got it and recomputes the others. Every test forces the
mode with XENT_TRITON_FUSED_STEP=1 and compares with float64 torch, or with
the two-kernel path.
"""
import pytest
import torch
import torch.nn.functional as F

import xent_triton
from xent_triton import launch_config
from xent_triton.function import FusedStepCrossEntropy
from helpers import close, rand_logits, rand_probs, tol

F64 = dict(rtol=1e-10, atol=1e-10)
C = 37


@pytest.fixture
def fused(monkeypatch):
    monkeypatch.setenv(launch_config.FUSED_STEP_ENV, "1")


def _fused_node(loss):
    """The FusedStepCrossEntropy backward node (its ctx) behind ``loss``, or None."""
    todo, seen = [loss.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__.startswith(FusedStepCrossEntropy.__name__):
            return fn
        todo.extend(f for f, _ in fn.next_functions)
    return None


def _uses_fused_step(loss) -> bool:
    return _fused_node(loss) is not None


def _targets(kind, shape, device):
    if kind == "soft":
        return rand_probs(shape, torch.float64, device, axis=1)
    t = torch.randint(0, shape[1], shape[:1] + shape[2:], device=device)
    t.view(-1)[3] = -100
    return t


OPTIONS = {
    "plain": {},
    "weight_smooth": dict(weight="w", label_smoothing=0.2),
    "z_softcap": dict(lse_square_scale=1e-2, softcap=3.0),
    "all": dict(weight="w", label_smoothing=0.1, lse_square_scale=1e-3, softcap=5.0),
}


@pytest.mark.parametrize("upstream", [1.0, 0.25, 1024.0])
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_matches_torch_float64(backend, device, fused, kind, reduction, options, upstream):
    """Loss and dlogits against F.cross_entropy, whether or not the upstream gradient is the expected one."""
    kw = dict(OPTIONS[options])
    if kw.get("weight") == "w":
        kw["weight"] = torch.rand(C, dtype=torch.float64, device=device) + 0.2
    cap = kw.pop("softcap", None)
    z = kw.pop("lse_square_scale", 0.0)
    x = rand_logits((21, C), torch.float64, device)
    t = _targets(kind, (21, C), device)
    loss = xent_triton.cross_entropy(x, t, reduction=reduction, softcap=cap, lse_square_scale=z, **kw)
    assert _uses_fused_step(loss)
    (g,) = torch.autograd.grad(loss * upstream, x)

    xr = x.detach().clone().requires_grad_()
    xc = cap * torch.tanh(xr / cap) if cap else xr
    rows = F.cross_entropy(xc, t, reduction="none", **kw)
    if z:
        active = (t != -100) if kind == "hard" else torch.ones_like(rows, dtype=torch.bool)
        rows = rows + z * torch.where(active, torch.logsumexp(xc, 1) ** 2, 0.0)
    ref = rows.sum()
    if reduction == "mean":
        if kind == "hard":
            w = kw.get("weight")
            ref = ref / (w[t.clamp(min=0)] * (t != -100)).sum() if w is not None else ref / (t != -100).sum()
        else:
            ref = ref / rows.numel()
    (g_ref,) = torch.autograd.grad(ref * upstream, xr)
    close(loss, ref, **F64)
    close(g, g_ref, **F64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_low_precision_matches_two_kernel_path(backend, device, monkeypatch, kind, dtype):
    """Both paths compute each dlogits element with the same formula and round it once.

    Both keep the row statistics per slice of a block (kernels/xent_forward._row_partial), and the
    slice width follows the tile's warps, which differ between the two paths' heuristic tiles: with
    another width the online max and sum round differently. Bit-exactness needs one width, and the
    per-row kernels on both paths (launch_config.FORCE_ROWS)."""
    monkeypatch.setattr(launch_config, "slice_width", lambda block, warps, itemsize: min(16 // itemsize, block))
    monkeypatch.setattr(launch_config, "FORCE_ROWS", 1)  # the row tiles sum a whole row at once
    x0 = rand_logits((19, 300), dtype, device, requires_grad=False)
    t = _targets(kind, (19, 300), device)
    if kind == "soft":
        t = t.to(dtype)
    out = {}
    for mode in ("0", "1"):
        monkeypatch.setenv(launch_config.FUSED_STEP_ENV, mode)
        x = x0.clone().requires_grad_()
        loss = xent_triton.cross_entropy(x, t, label_smoothing=0.05)
        assert _uses_fused_step(loss) == (mode == "1")
        loss.backward()
        out[mode] = (loss.detach(), x.grad)
    (l0, g0), (l1, g1) = out["0"], out["1"]
    assert g1.dtype == dtype
    exact = device.type == "cpu"  # the same code path element by element; a GPU may contract differently
    close(l1, l0, **(dict(rtol=0, atol=0) if exact else tol(torch.float32)))
    close(g1, g0, **(dict(rtol=0, atol=0) if exact else tol(dtype)))
    ref = F.cross_entropy(x0.double(), t.double() if kind == "soft" else t, label_smoothing=0.05)
    close(l1, ref, **tol(dtype))


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_pipeline_depth_changes_no_bits(backend, device, monkeypatch, fused, kind):
    """STAGES only changes when each block's loads are issued (kernels/xent_step.py, both walks), not
    the arithmetic: every depth gives the loss and dlogits of STAGES 1 to the bit, over rows of many
    whole blocks that start 8 bytes past a 16-byte boundary (a view one column in), so the partial head
    and tail blocks are there too. The interpreter ignores the depth (it checks the plumbing); on CUDA
    each depth is its own compiled pipeline."""
    full = rand_logits((9, 1 + 1501), torch.float64, device, requires_grad=False)
    t = _targets(kind, (9, 1501), device)
    out = {}
    for stages in (1, 2, 3, 4):
        monkeypatch.setattr(launch_config, "FORCE_STEP", (128, 2, 1, stages))
        xb = full.clone().requires_grad_()
        x = xb[:, 1:]
        assert x.data_ptr() % 16 == 8 and x.stride(0) * 8 % 16 == 0  # every row starts 8 bytes past a boundary
        loss = xent_triton.cross_entropy(x, t, label_smoothing=0.1)
        assert _uses_fused_step(loss)
        loss.backward()
        out[stages] = (loss.detach(), xb.grad[:, 1:])
    for stages in (2, 3, 4):
        assert torch.equal(out[stages][0], out[1][0])
        assert torch.equal(out[stages][1], out[1][1])
    ref = F.cross_entropy(full[:, 1:], t, label_smoothing=0.1)
    close(out[3][0], ref, **F64)


def test_rows_with_the_expected_gradient_are_not_recomputed(backend, device, fused):
    """Change the logits behind autograd's back between forward and backward: a kept row still
    shows the forward's logits, a recomputed row the changed ones."""
    h = torch.randn(9, C, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, C, (9,), device=device)

    def loss_then_change_logits(change):
        logits = h * 1.0
        loss = xent_triton.cross_entropy(logits, t, reduction="sum")
        assert _uses_fused_step(loss)
        if change:
            logits.data.mul_(0.5)  # .data: no version bump, so autograd cannot object
        return loss

    (g_true,) = torch.autograd.grad(loss_then_change_logits(False), h)
    (g_kept,) = torch.autograd.grad(loss_then_change_logits(True), h)
    close(g_kept, g_true, **F64)  # upstream gradient 1, as expected: nothing was recomputed

    (g_redo,) = torch.autograd.grad(loss_then_change_logits(True) * 3.0, h)
    # Recomputed from the changed logits (and the forward's lse): every row differs from 3 * g_true.
    lse = torch.logsumexp(h.detach(), 1, keepdim=True)
    expected = 3.0 * (torch.exp(h.detach() * 0.5 - lse) - F.one_hot(t, C))
    close(g_redo, expected, **F64)


def test_only_rows_with_another_gradient_are_recomputed(backend, device):
    """Through the Function directly: a per-row upstream gradient where two rows differ from the scale."""
    x = rand_logits((8, C), torch.float64, device)
    t = torch.randint(0, C, (8,), device=device)
    scale = torch.ones((), dtype=torch.float64, device=device)
    loss, lse = FusedStepCrossEntropy.apply(x, None, t, None, 1, -100, 0.0, 0.0, 0.0, False, scale)
    gw = torch.ones(8, dtype=torch.float64, device=device)
    gw[[1, 5]] = torch.tensor([2.0, -0.5], dtype=torch.float64, device=device)
    (g,) = torch.autograd.grad((loss * gw).sum(), x)
    xr = x.detach().clone().requires_grad_()
    (g_ref,) = torch.autograd.grad((F.cross_entropy(xr, t, reduction="none") * gw).sum(), xr)
    close(g, g_ref, **F64)


def test_retain_graph_second_backward(backend, device, fused):
    """The first backward hands its buffer to autograd; a second one recomputes."""
    x = rand_logits((10, C), torch.float64, device)
    t = torch.randint(0, C, (10,), device=device)
    loss = xent_triton.cross_entropy(x, t)
    loss.backward(retain_graph=True)
    g1 = x.grad.clone()
    loss.backward()
    close(x.grad, 2 * g1, **F64)


def test_double_backward(backend, device, fused):
    """create_graph=True through the fused step: the written dlogits is set aside, and the gradient comes
    from differentiable ops (gradgradcheck)."""
    x = rand_logits((3, 6), torch.float64, device)
    t = torch.randint(0, 6, (3,), device=device)
    assert _uses_fused_step(xent_triton.cross_entropy(x, t, label_smoothing=0.1))
    assert torch.autograd.gradgradcheck(lambda z: xent_triton.cross_entropy(z, t, label_smoothing=0.1), (x,),
                                        fast_mode=True)


@pytest.mark.parametrize("layout", ["nchw", "sliced", "many_rows", "one_row"])
def test_layouts_and_persistent_grid(backend, device, fused, layout):
    """Class axis 1 of (N, C, L), a strided view, more rows than persistent programs, a single row."""
    if layout == "nchw":
        x = rand_logits((3, C, 5), torch.float64, device)
        t = torch.randint(0, C, (3, 5), device=device)
        xin = x
    elif layout == "sliced":
        x = rand_logits((6, C + 3), torch.float64, device)
        t = torch.randint(0, C, (6,), device=device)
        xin = x[:, 1:C + 1]
    else:
        # many_rows: each persistent program walks three rows or more, whatever the SM count
        programs = launch_config.step_launch(C, 8, torch.device(device)).programs
        n = 3 * programs + 5 if layout == "many_rows" else 1
        x = rand_logits((n, C), torch.float64, device)
        t = torch.randint(0, C, (n,), device=device)
        xin = x
    loss = xent_triton.cross_entropy(xin, t)
    assert _uses_fused_step(loss)
    (g,) = torch.autograd.grad(loss, x)
    xr = x.detach().clone().requires_grad_()
    xr_in = xr[:, 1:C + 1] if layout == "sliced" else xr
    (g_ref,) = torch.autograd.grad(F.cross_entropy(xr_in, t), xr)
    close(loss, F.cross_entropy(xr_in, t), **F64)
    close(g, g_ref, **F64)


def test_all_rows_ignored(backend, device, fused):
    """mean over no rows: NaN loss (as torch), zero gradient (as the two-kernel path)."""
    x = rand_logits((4, C), torch.float32, device)
    t = torch.full((4,), -100, device=device)
    loss = xent_triton.cross_entropy(x, t)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_not_taken_where_it_cannot_pay_off(backend, device, fused):
    """Per-row losses, no grad, soft targets that need a gradient and the in-place mode keep two kernels."""
    x = rand_logits((4, C), torch.float32, device)
    t = torch.randint(0, C, (4,), device=device)
    y = rand_probs((4, C), torch.float32, device, requires_grad=True)
    assert not _uses_fused_step(xent_triton.cross_entropy(x, t, reduction="none").sum())
    assert not _uses_fused_step(xent_triton.cross_entropy(x, y))
    assert not _uses_fused_step(xent_triton.cross_entropy(x * 1.0, t, inplace_backward=True))
    with torch.no_grad():
        assert xent_triton.cross_entropy(x, t).grad_fn is None


def test_compiled_step_uses_the_custom_ops(backend, device, fused):
    """Under torch.compile the two-kernel custom ops are traced (no graph break) and match eager's fused step."""
    x = rand_logits((12, C), torch.float32, device)
    t = torch.randint(0, C, (12,), device=device)

    def step(x):
        return xent_triton.cross_entropy(x * 2.0, t, label_smoothing=0.1)

    eager = step(x)
    assert _uses_fused_step(eager)
    (g_eager,) = torch.autograd.grad(eager, x)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    assert not _uses_fused_step(compiled)
    (g,) = torch.autograd.grad(compiled, x)
    close(compiled, eager, **tol(torch.float32))
    close(g, g_eager, **tol(torch.float32))


def test_opcheck_step_ops(backend, device):
    x = rand_logits((4, 9), torch.float64, device)
    y = rand_probs((4, 9), torch.float64, device)
    t = torch.tensor([1, -100, 8, 0], device=device)
    s = torch.full((), 0.5, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.xent_triton.step.default, (x.detach(), y, None, None, 1, -100, 0.1, 0.01, 0.0, False, s))
    loss, lse, stats, dx, written = torch.ops.xent_triton.step(x.detach(), None, t, None, 1, -100, 0.0, 0.0, 3.0,
                                                               True, s)
    g = torch.full((4,), 0.5, dtype=torch.float64, device=device)
    g[2] = 2.0
    torch.library.opcheck(torch.ops.xent_triton.backward_scaled.default,
                          (g, x.detach(), None, t, None, stats, s, written, dx.clone(), 1, -100, 0.0, 0.0, 3.0))


def test_auto_mode_follows_the_measured_table(monkeypatch):
    """auto: only where tiles.json has a winning step row for the label kind, at or below its V, on CUDA,
    with a row per program."""
    monkeypatch.setenv(launch_config.FUSED_STEP_ENV, "auto")
    monkeypatch.setattr(launch_config, "_sm_count", lambda *a: 132)
    table = {"step_hard": {2: [[32000, 2048, 8, 2], [128256, 0, 0, 0]]}}
    monkeypatch.setattr(launch_config, "measured_tiles", lambda: table)
    cuda = torch.device("cuda", 0)
    assert launch_config.use_fused_step(8192, 32000, 2, cuda)
    assert launch_config.use_fused_step(8192, 4096, 2, cuda)  # a win covers smaller rows
    assert not launch_config.use_fused_step(8192, 50257, 2, cuda)  # the two kernels won at 128256
    assert not launch_config.use_fused_step(8192, 256000, 2, cuda)  # above every measurement
    assert not launch_config.use_fused_step(8192, 32000, 2, cuda, hard=False)  # soft labels: not measured
    assert not launch_config.use_fused_step(100, 32000, 2, cuda)  # fewer rows than 264 programs
    assert not launch_config.use_fused_step(8192, 32000, 4, cuda)  # no fp32 measurement
    assert not launch_config.use_fused_step(8192, 32000, 2, torch.device("cpu"))
    cfg = launch_config.step_launch(32000, 2, cuda)
    assert (cfg.block, cfg.num_warps, cfg.programs) == (2048, 8, 264)
    monkeypatch.setattr(launch_config, "measured_tiles", lambda: {})
    assert not launch_config.use_fused_step(8192, 32000, 2, cuda)
    monkeypatch.setenv(launch_config.FUSED_STEP_ENV, "0")
    assert not launch_config.use_fused_step(8192, 32000, 2, cuda)
    monkeypatch.setenv(launch_config.FUSED_STEP_ENV, "1")
    assert launch_config.use_fused_step(1, 32000, 2, cuda)


def test_bad_mode_raises_on_every_call(backend, device, monkeypatch):
    monkeypatch.setenv(launch_config.FUSED_STEP_ENV, "yes")
    x = rand_logits((4, C), torch.float32, device)
    t = torch.randint(0, C, (4,), device=device)
    for call in (lambda: xent_triton.cross_entropy(x, t), lambda: xent_triton.cross_entropy(x, t, reduction="none")):
        with pytest.raises(ValueError, match="XENT_TRITON_FUSED_STEP must be one of .* got 'yes'"):
            call()
    with torch.no_grad(), pytest.raises(ValueError, match="XENT_TRITON_FUSED_STEP"):
        xent_triton.cross_entropy(x, t)


@pytest.mark.parametrize("hooks", ["checkpoint", "save_on_cpu"])
def test_not_taken_under_saved_tensor_hooks(backend, device, fused, hooks):
    """Checkpointing frees saved tensors until the backward; a dlogits held by the fused step would not be."""
    x = rand_logits((8, C), torch.float32, device)
    t = torch.randint(0, C, (8,), device=device)
    seen = []

    def loss_fn(z):
        loss = xent_triton.cross_entropy(z * 1.0, t)
        seen.append(_uses_fused_step(loss))
        return loss

    if hooks == "checkpoint":
        loss = torch.utils.checkpoint.checkpoint(loss_fn, x, use_reentrant=False)
    else:
        with torch.autograd.graph.save_on_cpu():
            loss = loss_fn(x)
    loss.backward()
    assert seen and not any(seen)
    xr = x.detach().clone().requires_grad_()
    F.cross_entropy(xr, t).backward()
    close(x.grad, xr.grad, **tol(torch.float32))


def test_scaled_loss_turns_the_forward_write_off(device, monkeypatch, fused):
    """After a backward whose upstream gradient was not the expected one, the forward stops writing
    dlogits on that device (a device flag, no host sync); results stay exact; reset turns it back on."""
    from xent_triton import triton_backend

    monkeypatch.setenv("XENT_TRITON_BACKEND", "triton")
    x = rand_logits((12, C), torch.float64, device)
    t = torch.randint(0, C, (12,), device=device)
    xr = x.detach().clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(F.cross_entropy(xr, t), xr)

    def step(upstream):
        loss = xent_triton.cross_entropy(x, t)
        node = _fused_node(loss)
        assert node is not None
        written = bool(node.saved_tensors[-1].item())
        before = node.dlogits.clone()
        (g,) = torch.autograd.grad(loss * upstream, x)
        close(g, g_ref * upstream, **F64)
        return written, before

    written, before = step(1.0)
    assert written and not (before == 12345.0).any()  # conftest's poison: every element was written
    assert step(1.0)[0]  # the expected gradient keeps the policy on
    assert step(0.5)[0]  # written, then recomputed: this backward turns the policy off
    written, before = step(1.0)
    assert not written and (before == 12345.0).all()  # nothing written in the forward; the backward did all
    assert not step(0.5)[0]
    triton_backend.reset_step_policy()
    assert step(1.0)[0]
