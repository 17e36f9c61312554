"""Block alignment (kernels/row_math.aligned_run, same_run, block_ranges).

The row loops lay their blocks out from the 16-byte boundary at or before each row, so whole blocks
load and store as unmasked vectors; the head before the first boundary and the tail are masked.
Rows of an odd V start at every offset from a boundary, and views with a storage offset shift them
again. These tests force 16-column blocks on V = 45, so each row has a head, whole blocks and a tail,
and check every pass against float64 references, with the logits, the labels and the gradient
buffers at the same offset (hinted as aligned) and at different ones (not hinted). Under the
interpreter, conftest turns every alignment hint into a checked claim.
"""
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import xent_triton
from helpers import close, rand_logits, ref_soft, tol, set_config

N, V = 6, 45
OFFSETS = [(torch.bfloat16, 0), (torch.bfloat16, 1), (torch.bfloat16, 3), (torch.bfloat16, 7),
           (torch.float32, 1), (torch.float32, 2), (torch.float64, 1)]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    set_config(monkeypatch, backend="triton")
    set_config(monkeypatch, rows=1)  # the per-row kernels, not the row tiles
    set_config(monkeypatch, tile=(16, 1))


def _at_offset(t, offset):
    """A copy of t that starts ``offset`` elements into a fresh buffer (a leaf with t's requires_grad)."""
    buf = torch.empty(t.numel() + 16, dtype=t.dtype, device=t.device)
    view = buf[offset:offset + t.numel()].view(t.shape)
    view.copy_(t.detach())
    return view.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("dtype,offset", OFFSETS)
@pytest.mark.parametrize("label_offset", ["same", "other", "fp32"])
def test_soft_labels_at_any_offset(device, dtype, offset, label_offset):
    x = _at_offset(rand_logits((N, V), dtype, device), offset)
    y_dtype = torch.float32 if label_offset == "fp32" else dtype
    y = torch.softmax(torch.randn(N, V, dtype=torch.float64, device=device), -1).to(y_dtype)
    y = _at_offset(y, offset if label_offset == "same" else offset + 1).requires_grad_()
    loss = xent_triton.softmax_cross_entropy_with_logits(y, x)
    g = torch.randn(N, dtype=torch.float64, device=device)
    dx, dy = torch.autograd.grad((loss.double() * g).sum(), (x, y))
    xr, yr = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    ref = ref_soft(yr, xr)
    dxr, dyr = torch.autograd.grad((ref * g).sum(), (xr, yr))
    t = tol(dtype, y_dtype)
    close(loss, ref, **t)
    close(dx, dxr, **t)
    close(dy, dyr, **t)


@pytest.mark.parametrize("dtype,offset", OFFSETS)
def test_class_indices_at_any_offset(device, dtype, offset):
    """Smoothing, weights and ignored rows."""
    x = _at_offset(rand_logits((N, V), dtype, device), offset)
    t = torch.randint(0, V, (N,), device=device)
    t[2] = -100
    w = torch.rand(V, dtype=dtype, device=device) + 0.5
    kw = dict(weight=w, label_smoothing=0.1)
    loss = xent_triton.cross_entropy(x, t, **kw)
    (dx,) = torch.autograd.grad(loss, x)
    xr = x.detach().double().requires_grad_()
    ref = F.cross_entropy(xr, t, weight=w.double(), label_smoothing=0.1)
    (dxr,) = torch.autograd.grad(ref, xr)
    close(loss, ref, **tol(dtype))
    close(dx, dxr, **tol(dtype))
    assert torch.equal(dx[2], torch.zeros_like(dx[2]))


@pytest.mark.parametrize("dtype,offset", OFFSETS)
def test_inplace_backward_at_any_offset(device, dtype, offset):
    h = _at_offset(rand_logits((N, V), dtype, device), offset)
    t = torch.randint(0, V, (N,), device=device)
    loss = xent_triton.cross_entropy(h * 1.0, t, reduction="sum", inplace_backward=True)
    (dh,) = torch.autograd.grad(loss, h)
    hr = h.detach().double().requires_grad_()
    (dhr,) = torch.autograd.grad(F.cross_entropy(hr, t, reduction="sum"), hr)
    close(dh, dhr, **tol(dtype))


@pytest.mark.parametrize("offset", [0, 3])
def test_split_rows_at_any_offset(monkeypatch, device, offset):
    """Each part of a split row has its own frame (its first column is anywhere)."""
    set_config(monkeypatch, split=2)
    x = _at_offset(rand_logits((2, 150), torch.bfloat16, device), offset)
    y = torch.softmax(torch.randn(2, 150, dtype=torch.float64, device=device), -1).to(torch.bfloat16)
    close(xent_triton.softmax_cross_entropy_with_logits(y, x), ref_soft(y, x.detach()), **tol(torch.bfloat16))


@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_split_class_indices_at_part_boundaries(monkeypatch, device, offset, weighted):
    """A split row's head and tail blocks hold lanes of the neighbouring part: a target there is counted
    once, by its own part (class indices with smoothing take the label-state loop)."""
    set_config(monkeypatch, split=2)  # parts of 80 columns: the boundary is column 80
    x = _at_offset(rand_logits((8, 150), torch.float32, device), offset)
    t = torch.arange(76, 84, device=device)
    w = torch.rand(150, device=device) + 0.5 if weighted else None
    loss = xent_triton.cross_entropy(x, t, weight=w, label_smoothing=0.1, reduction="none")
    (dx,) = torch.autograd.grad(loss.sum(), x)
    xr = x.detach().double().requires_grad_()
    ref = F.cross_entropy(xr, t, weight=None if w is None else w.double(), label_smoothing=0.1, reduction="none")
    (dxr,) = torch.autograd.grad(ref.sum(), xr)
    close(loss, ref, **tol(torch.float32))
    close(dx, dxr, **tol(torch.float32))


@triton.jit
def _false_hint_kernel(X, OUT):
    tl.store(OUT, tl.load(tl.multiple_of(X + 1, 16)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter's hint check (tests/conftest.py)")
def test_a_false_alignment_hint_is_caught():
    """The check that makes the tests above catch a wrong hint is live."""
    x = torch.arange(8, dtype=torch.float32)
    with pytest.raises(Exception, match="false tl.multiple_of"):
        _false_hint_kernel[(1,)](x, torch.empty(1))
