"""Exact at every magnitude: loss, dlogits and dlabels against float64 torch for logits up to 1e30 (float32)
and 1e300 (float64), rows whose entries differ by less than one ulp of their max, and huge and tiny logits
mixed in one row (helpers.magnitude_logits).

The softmax is exp((x - m) - log_s) from the row max m and log_s kept apart (layout.stats_shape): with the
rounded lse = m + log_s, exp(x - lse) gave two equal logits of 1e8 in float32 the softmax (0, 1), not
(1/2, 1/2), and lse - x (dlabels) 0. Each value is compared with the float64 reference rounded to the
output's dtype, so a value that overflows there must overflow here too.
"""
import pytest
import torch

import xent_triton
from helpers import close, magnitude_logits, rand_probs, ref_xent, tol, set_config

V = 37
DTYPES = [torch.float32, torch.float64]
# What each kind passes to cross_entropy (reduction="none"), besides logits and target.
KINDS = {
    "soft": None,  # softmax_cross_entropy_with_logits, labels of any mass, with their gradient
    "probs": dict(weight="w", label_smoothing=0.1),  # probability target with its gradient
    "index": dict(),
    "index_weight_smooth": dict(weight="w", label_smoothing=0.1, ignore_index=5),
    "z_loss": dict(lse_square_scale=1e-3),
    "softcap": dict(softcap=20.0),
}


@pytest.fixture(params=["torch", "triton-per_row", "triton-split", "triton-row_tiles"])
def path(request, monkeypatch):
    """Each backend, and on the kernels each forward and backward pair: one program per row, the row split
    across programs (and the combine kernel), several rows per program (kernels/xent_rows.py)."""
    backend, _, kernels = request.param.partition("-")
    set_config(monkeypatch, backend=backend)
    set_config(monkeypatch, rows="max" if kernels == "row_tiles" else 1)
    set_config(monkeypatch, split=3 if kernels == "split" else 1)
    return request.param


def _problem(kind, dtype, device):
    x = magnitude_logits(dtype, device, V).requires_grad_()
    n = x.shape[0]
    if kind == "soft":
        mass = torch.rand(n, 1, dtype=torch.float64, device=device) * 1.5 + 0.5  # labels need not sum to 1
        return x, (rand_probs((n, V), torch.float64, device) * mass).to(dtype).requires_grad_(), {}
    kw = dict(KINDS[kind])
    if kw.get("weight") == "w":
        kw["weight"] = (torch.rand(V, dtype=torch.float64, device=device) + 0.5).to(dtype)
    if kind == "probs":
        return x, rand_probs((n, V), dtype, device, requires_grad=True), kw
    t = torch.randint(0, V, (n,), device=device)
    if "ignore_index" in kw:
        t[::4] = kw["ignore_index"]
    return x, t, kw


def _ours(kind, x, target, kw):
    if kind == "soft":
        return xent_triton.softmax_cross_entropy_with_logits(target, x)
    return xent_triton.cross_entropy(x, target, reduction="none", **kw)


def _reference(kind, x, target, kw):
    opts = dict(weight=kw.get("weight"), smoothing=kw.get("label_smoothing", 0.0), z=kw.get("lse_square_scale", 0.0),
                softcap=kw.get("softcap"), ignore_index=kw.get("ignore_index", -100))
    if target.dtype.is_floating_point:
        return ref_xent(x, labels=target, **opts)
    return ref_xent(x, target=target, **opts)


def check_against_reference(out, ref, ours_in, ref_in, dtype):
    """Loss and every gradient of (out * w).sum() against the reference's, rounded to the output dtype."""
    close(out, ref.to(out.dtype), **tol(dtype))
    w = torch.randn(out.shape, dtype=torch.float64, device=out.device)
    g_ours = torch.autograd.grad((out.double() * w).sum(), ours_in)
    g_ref = torch.autograd.grad((ref * w.to(out.dtype).double()).sum(), ref_in)
    for a, b in zip(g_ours, g_ref):
        assert torch.isfinite(b.to(a.dtype)).all()
        close(a, b.to(a.dtype), **tol(dtype))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_magnitude(path, device, kind, dtype):
    x, target, kw = _problem(kind, dtype, device)
    out = _ours(kind, x, target, kw)
    xr = x.detach().clone().requires_grad_()
    tr = target.detach().clone().requires_grad_() if target.requires_grad else target
    ref = _reference(kind, xr, tr, kw)
    ours_in, ref_in = [x], [xr]
    if target.requires_grad:
        ours_in.append(target)
        ref_in.append(tr)
    check_against_reference(out, ref, ours_in, ref_in, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_two_equal_huge_logits(backend, device, dtype):
    """The issue's example: [[1e8, 1e8]] with labels [[1, 0]] give dlogits [[-0.5, 0.5]] and dlabels
    [[log 2, log 2]] (TF and torch agree), on every magnitude."""
    for s in (1e8, 1e30, -1e30) + ((1e300,) if dtype == torch.float64 else ()):
        x = torch.full((1, 2), s, dtype=dtype, device=device, requires_grad=True)
        y = torch.tensor([[1.0, 0.0]], dtype=dtype, device=device, requires_grad=True)
        loss = xent_triton.softmax_cross_entropy_with_logits(y, x)
        dx, dy = torch.autograd.grad(loss.sum(), (x, y))
        close(loss, torch.tensor([0.6931471805599453], dtype=torch.float64), **tol(dtype))
        close(dx, torch.tensor([[-0.5, 0.5]], dtype=torch.float64), **tol(dtype))
        close(dy, torch.full((1, 2), 0.6931471805599453, dtype=torch.float64), **tol(dtype))
        t = torch.zeros(1, dtype=torch.int64, device=device)
        (dx,) = torch.autograd.grad(xent_triton.cross_entropy(x, t), x)
        close(dx, torch.tensor([[-0.5, 0.5]], dtype=torch.float64), **tol(dtype))


@pytest.mark.parametrize("mode", ["inplace_backward", "create_graph", "reduced"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_other_routes(backend, device, dtype, mode, monkeypatch):
    """The in-place mode, double backward's first-order values and the reduced loss form the softmax from
    the same statistics."""
    x, t, kw = _problem("index_weight_smooth", dtype, device)
    kw["lse_square_scale"] = 1e-4
    reduction = "none" if mode == "create_graph" else "sum"
    leaf = x
    xr = x.detach().clone().requires_grad_()
    ref = _reference("index_weight_smooth", xr, t, kw)
    if mode == "inplace_backward":
        x = x * 1  # the in-place mode needs logits that are not a leaf
    out = xent_triton.cross_entropy(x, t, reduction=reduction, inplace_backward=mode == "inplace_backward", **kw)
    if reduction == "sum":
        close(out, ref.sum().to(out.dtype), **tol(dtype))
        (g,) = torch.autograd.grad(out, leaf)
        (g_ref,) = torch.autograd.grad(ref.sum(), xr)
        close(g, g_ref.to(dtype), **tol(dtype))
        return
    w = torch.randn(out.shape, dtype=dtype, device=device)
    (g,) = torch.autograd.grad((out * w).sum(), leaf, create_graph=True)
    (g_ref,) = torch.autograd.grad((ref * w.double()).sum(), xr)
    close(g, g_ref.to(dtype), **tol(dtype))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_head(backend, device, dtype, reduction):
    """linear_cross_entropy, whose backward (reduction="none") recomputes each chunk's logits and reads their
    statistics: the logits of every magnitude are the weight's columns, so the weight gradient is dlogits."""
    logits = magnitude_logits(dtype, device, V)
    n = logits.shape[0]
    # Input row r is the r-th unit vector, so its logits are column r of the weight: exactly row r of logits.
    e = torch.eye(n, dtype=dtype, device=device)
    W = logits.t().contiguous().requires_grad_()  # (V, n)
    t = torch.randint(0, V, (n,), device=device)
    out = xent_triton.linear_cross_entropy(e, W, t, reduction=reduction, chunk_size=5)
    Wr = W.detach().clone().requires_grad_()
    ref = ref_xent(Wr.t(), target=t)
    ref = ref.mean() if reduction == "mean" else ref
    check_against_reference(out, ref, [W], [Wr], dtype)
