"""The short-row kernels (kernels/xent_rows.py): ROWS whole rows per program.

Their results are compared with the one-row-per-program kernels and with float64 torch,
including vocabulary shards, tail rows past the batch, strided rows and the in-place mode.
The launch rule (launch_config.rows_launch) is tested without a GPU.
"""
import pytest
import torch
import torch.nn.functional as F

import xent_triton
from xent_triton import launch_config
from helpers import close, rand_logits, rand_probs, tol, set_config


def _both(monkeypatch, fn):
    out = {}
    for mode in (1, "max"):
        set_config(monkeypatch, rows=mode)
        out[mode] = fn()
    return out[1], out["max"]


@pytest.mark.parametrize("V", [1, 2, 7, 300, 1000])
@pytest.mark.parametrize("N", [1, 3, 70])
@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_matches_one_row_kernels_and_torch(device, monkeypatch, kind, N, V):
    set_config(monkeypatch, backend="triton")
    x0 = rand_logits((N, V), torch.float32, device, requires_grad=False)
    if kind == "soft":
        y = rand_probs((N, V), torch.float32, device)
    else:
        y = torch.randint(0, V, (N,), device=device)
        y[N // 2] = -100
    w = torch.rand(V, device=device) + 0.5

    def run():
        x = x0.clone().requires_grad_()
        loss = xent_triton.cross_entropy(x, y, weight=w, label_smoothing=0.1, lse_square_scale=1e-3, softcap=4.0,
                                         reduction="none")
        (g,) = torch.autograd.grad(loss.sum(), x)
        return loss.detach(), g

    (l1, g1), (lt, gt) = _both(monkeypatch, run)
    close(lt, l1, **tol(torch.float32))
    close(gt, g1, **tol(torch.float32))
    xr = x0.double().requires_grad_()
    xc = 4.0 * torch.tanh(xr / 4.0)
    yr = y.double() if kind == "soft" else y
    ref = F.cross_entropy(xc, yr, weight=w.double(), label_smoothing=0.1, reduction="none")
    lse = torch.logsumexp(xc, 1)
    active = torch.ones_like(ref, dtype=torch.bool) if kind == "soft" else y != -100
    ref = ref + torch.where(active, 1e-3 * lse**2, 0.0)
    (g_ref,) = torch.autograd.grad(ref.sum(), xr)
    close(lt, ref, **tol(torch.float32))
    close(gt, g_ref, **tol(torch.float32))


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_vocabulary_shard(device, monkeypatch, kind):
    """A shard [offset, offset + V) of a wider vocabulary: the statistics the distributed loss combines."""
    set_config(monkeypatch, backend="triton")
    N, V, offset, total = 40, 24, 30, 100
    x = rand_logits((N, V), torch.float32, device, requires_grad=False)
    y = rand_probs((N, V), torch.float32, device) if kind == "soft" else None
    t = torch.randint(0, total, (N,), device=device) if kind == "hard" else None
    if t is not None:
        t[:5] = torch.arange(offset, offset + 5)  # some targets inside the shard
        t[7] = -100

    def run():
        return torch.ops.xent_triton.forward(x, y, t, None, 1, -100, 0.1, 0.0, 0.0, False, offset, total)

    one, tiles = _both(monkeypatch, run)
    for a, b in zip(one, tiles):
        close(b, a, **tol(torch.float32))

    g = torch.randn(N, device=device)

    def run_bwd():
        return torch.ops.xent_triton.backward(g, x, y, t, None, one[2], 1, -100, 0.1, 0.0, 0.0, True,
                                              False, offset, total)

    (dx1, _), (dxt, _) = _both(monkeypatch, run_bwd)
    close(dxt, dx1, **tol(torch.float32))


def test_soft_labels_gradient_and_strided_rows(device, monkeypatch):
    """dlabels, and rows addressed with two strides (a sliced 3-D batch)."""
    set_config(monkeypatch, backend="triton")
    base = rand_logits((4, 9, 50), torch.float64, device, requires_grad=False)
    labels0 = rand_probs((4, 7, 45), torch.float64, device)

    def run():
        x = base.clone().requires_grad_()
        y = labels0.clone().requires_grad_()
        out = xent_triton.softmax_cross_entropy_with_logits(y, x[:, 1:8, 2:47])
        gx, gy = torch.autograd.grad((out * torch.arange(28.0, dtype=out.dtype, device=device).view(4, 7)).sum(),
                                     (x, y))
        return out.detach(), gx, gy

    one, tiles = _both(monkeypatch, run)
    for a, b in zip(one, tiles):
        close(b, a, rtol=1e-12, atol=1e-12)


def test_inplace_mode(device, monkeypatch):
    """DX is X: every element of the tile is loaded before any is stored."""
    set_config(monkeypatch, backend="triton")
    h0 = torch.randn(37, 20, dtype=torch.float64, device=device)
    t = torch.randint(0, 20, (37,), device=device)

    def run(inplace):
        h = h0.clone().requires_grad_()
        xent_triton.cross_entropy(h * 2.0, t, label_smoothing=0.2, inplace_backward=inplace).backward()
        return h.grad

    g_ref = _both(monkeypatch, lambda: run(False))[0]
    for g in _both(monkeypatch, lambda: run(True)):
        close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_launch_rule(monkeypatch):
    monkeypatch.setattr(launch_config, "_sm_count", lambda *a: 132)
    cuda = torch.device("cuda", 0)
    cfg = launch_config.rows_launch(32768, 1024, cuda)
    assert (cfg.rows, cfg.block, cfg.num_warps) == (4, 1024, 16)  # 8 elements per thread (NOTES P11)
    cfg = launch_config.rows_launch(131072, 128, cuda)
    assert (cfg.rows, cfg.block, cfg.num_warps) == (16, 128, 16)
    cfg = launch_config.rows_launch(65536, 2, cuda)
    assert (cfg.rows, cfg.block, cfg.num_warps) == (128, 2, 2)  # 65536 / 264 -> 248 rows, rounded down to 2^k
    assert launch_config.rows_launch(32768, 2048, cuda) is None  # long rows: one program per row
    assert launch_config.rows_launch(300, 1024, cuda) is None  # 1 row per program keeps more SMs busy
    # The class-index forward stays one row per program (measured faster, NOTES P11) unless tests force tiles.
    assert launch_config.rows_launch(32768, 1024, cuda, hard_forward=True) is None
    set_config(monkeypatch, rows=1)
    assert launch_config.rows_launch(32768, 1024, cuda) is None
    set_config(monkeypatch, rows="max")
    assert launch_config.rows_launch(3, 1024, cuda).rows == 4
    assert launch_config.rows_launch(3, 1024, cuda, hard_forward=True).rows == 4
