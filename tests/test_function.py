"""The in-place memory mode (``inplace_backward=True``): right gradients, or autograd's error."""
import pytest
import torch
import torch.nn.functional as F

import xent_triton
from helpers import close, rand_logits, rand_probs

pytestmark = pytest.mark.usefixtures("row_kernels")

F64 = dict(rtol=1e-10, atol=1e-10)


def _two_runs(fn, device, shape=(6, 30)):
    """Gradients at h for loss(h * 1.5) with and without inplace_backward."""
    h0 = torch.randn(shape, dtype=torch.float64, device=device)
    results = []
    for inplace in (False, True):
        h = h0.clone().requires_grad_()
        loss = fn(h * 1.5, inplace)
        loss.backward()
        results.append((loss.detach(), h.grad))
    return results


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_hard_inplace_matches(backend, device, reduction):
    t = torch.tensor([1, 4, -100, 29, 0, 7], device=device)
    w = torch.rand(30, dtype=torch.float64, device=device) + 0.5

    def fn(logits, inplace):
        out = xent_triton.cross_entropy(logits, t, weight=w, reduction=reduction, label_smoothing=0.1,
                                        lse_square_scale=1e-2, softcap=4.0, inplace_backward=inplace)
        return out if reduction != "none" else (out * torch.arange(6, device=device)).sum()

    (l0, g0), (l1, g1) = _two_runs(fn, device)
    close(l1, l0, **F64)
    close(g1, g0, **F64)


def test_soft_inplace_matches(backend, device):
    y = rand_probs((2, 3, 30), torch.float64, device)

    def fn(logits, inplace):
        out = xent_triton.softmax_cross_entropy_with_logits(y, logits, inplace_backward=inplace)
        return (out * torch.randn(out.shape, dtype=out.dtype, device=device, generator=torch.Generator(
            device=device).manual_seed(3))).sum()

    (l0, g0), (l1, g1) = _two_runs(fn, device, shape=(2, 3, 30))
    close(l1, l0, **F64)
    close(g1, g0, **F64)


def test_inplace_writes_gradient_into_logits_storage(backend, device):
    h = torch.randn(4, 20, device=device, requires_grad=True)
    logits = h * 2.0
    t = torch.randint(0, 20, (4,), device=device)
    ptr = logits.data_ptr()
    before = logits.detach().clone()
    v0 = logits._version
    loss = xent_triton.cross_entropy(logits, t, reduction="sum", inplace_backward=True)
    assert logits._version > v0  # bumped at once, so upstream ops that saved the logits notice
    assert torch.equal(logits.detach(), before)
    loss.backward()
    p = torch.softmax((h.detach() * 2.0).double(), -1)
    close(logits.detach(), p - F.one_hot(t, 20), rtol=1e-5, atol=1e-6)  # dlogits, in the logits' storage
    assert logits.data_ptr() == ptr
    close(h.grad, 2.0 * (p - F.one_hot(t, 20)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("view", ["reshape", "slice"])
def test_inplace_on_views(backend, device, view):
    """logits.view(-1, V) and logits[:, 1:] are the common call sites (README)."""
    h0 = torch.randn(2, 5, 8, dtype=torch.float64, device=device)
    w = torch.randn(8, 30, dtype=torch.float64, device=device)
    y = rand_probs((2, 4, 30), torch.float64, device)
    grads = []
    for inplace in (False, True):
        h = h0.clone().requires_grad_()
        logits = h @ w
        if view == "reshape":
            loss = xent_triton.CrossEntropyLoss(inplace_backward=inplace)(
                logits.view(-1, 30), torch.arange(10, device=device) % 30)
        else:
            loss = xent_triton.softmax_cross_entropy_with_logits(y, logits[:, 1:], inplace_backward=inplace).sum()
        loss.backward()
        grads.append((loss.detach(), h.grad))
    close(grads[1][0], grads[0][0], **F64)
    close(grads[1][1], grads[0][1], **F64)


def test_later_use_of_overwritten_logits_raises(backend, device):
    """An op that saved the logits after the loss must not read the gradient written over them."""
    h = torch.randn(3, 10, device=device, requires_grad=True)
    logits = h * 1.0
    loss = xent_triton.cross_entropy(logits, torch.tensor([1, 2, 3], device=device), inplace_backward=True)
    later = (logits * logits).sum()  # saves logits
    loss.backward()  # overwrites them (and bumps their version again)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        later.backward()


def test_upstream_that_saved_logits_raises(backend, device):
    """Liger #272 / Megatron-LM #1627: the version counter turns silent corruption into an error."""
    h = torch.randn(4, 20, device=device, requires_grad=True)
    logits = torch.exp(h)  # exp saves its output: the logits themselves
    t = torch.randint(0, 20, (4,), device=device)
    loss = xent_triton.cross_entropy(logits, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_no_grad_leaves_logits_alone(backend, device):
    x = rand_logits((3, 10), torch.float32, device, requires_grad=False)
    before = x.clone()
    t = torch.randint(0, 10, (3,), device=device)
    with torch.no_grad():
        xent_triton.cross_entropy(x, t, inplace_backward=True)
    assert torch.equal(x, before)


def test_second_backward_raises(backend, device):
    h = torch.randn(3, 10, device=device, requires_grad=True)
    loss = xent_triton.cross_entropy(h * 1.0, torch.tensor([1, 2, 3], device=device), inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already overwritten"):
        loss.backward()


def test_inplace_with_labels_gradient(backend, device):
    """dlabels needs the logits: the kernel computes it from each block before overwriting that block."""
    h0 = torch.randn(3, 700, dtype=torch.float64, device=device)
    y0 = rand_probs((3, 700), torch.float64, device)
    grads = []
    for inplace in (False, True):
        h = h0.clone().requires_grad_()
        y = y0.clone().requires_grad_()
        out = xent_triton.softmax_cross_entropy_with_logits(y, h * 1.0, inplace_backward=inplace)
        (out * torch.arange(3, device=device)).sum().backward()
        grads.append((h.grad, y.grad))
    close(grads[1][0], grads[0][0], **F64)
    close(grads[1][1], grads[0][1], **F64)


def test_inplace_needs_logits_it_can_write(backend, device):
    h = torch.randn(3, 10, 4, device=device, requires_grad=True)
    y = rand_probs((3, 10, 4), torch.float32, device, axis=1)
    with pytest.raises(ValueError, match=r"inplace_backward needs logits whose class axis has stride 1"):
        xent_triton.softmax_cross_entropy_with_logits(y, h * 1.0, axis=1, inplace_backward=True)


def test_inplace_leaf_gets_torch_error(backend, device):
    leaf = torch.randn(3, 10, device=device, requires_grad=True)
    for logits in (leaf, leaf.view(3, 10)):
        with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
            xent_triton.cross_entropy(logits, torch.tensor([1, 2, 3], device=device), inplace_backward=True)


def test_module_inplace(backend, device):
    h = torch.randn(5, 12, device=device, requires_grad=True)
    t = torch.randint(0, 12, (5,), device=device)
    xent_triton.CrossEntropyLoss(inplace_backward=True)(h * 3.0, t).backward()
    h2 = h.detach().clone().requires_grad_()
    F.cross_entropy(h2 * 3.0, t).backward()
    close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak memory is measured with the CUDA allocator")
def test_inplace_step_peak_memory_is_o_of_rows():
    dev = torch.device("cuda")
    N, V = 2048, 32000
    lin = torch.nn.Linear(256, V, device=dev, dtype=torch.bfloat16)
    h = torch.randn(N, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, V, (N,), device=dev)
    # The in-place pass's backward runs the first matmul on autograd's device thread, whose cuBLAS
    # handle allocates its workspace (32 MiB on Hopper) through the caching allocator: warm it here so
    # the measured peak is the loss's alone.
    torch.autograd.grad(lin(h).float().sum(), h)
    torch.cuda.synchronize()
    peaks = {}
    for inplace in (False, True):
        logits = lin(h)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = xent_triton.cross_entropy(logits, t, inplace_backward=inplace)
        torch.autograd.grad(loss, logits if not inplace else h)
        peaks[inplace] = torch.cuda.max_memory_allocated() - base
        del logits, loss
    logits_bytes = N * V * 2
    assert peaks[False] <= logits_bytes * 1.05 + (1 << 20)
    assert peaks[True] < logits_bytes / 8, peaks  # O(rows) + the matmul's input gradient


def test_inplace_dlabels_of_a_class_axis_not_last(backend, device):
    """Soft labels that require grad, with the class axis first: dlabels comes back in the labels' layout,
    as without the in-place mode."""
    base = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    y0 = rand_probs((5, 4), torch.float64, device, axis=0)
    results = []
    for inplace in (False, True):
        y = y0.clone().requires_grad_()
        logits = (base * 1.0).t()  # (4, 5), the classes on axis 0 of a transposed view
        loss = xent_triton.softmax_cross_entropy_with_logits(y.t(), logits, axis=0, inplace_backward=inplace)
        dbase, dy = torch.autograd.grad((loss * torch.arange(1.0, 6.0, dtype=torch.float64, device=device)).sum(),
                                        (base, y))
        results.append((dbase, dy))
    close(results[1][0], results[0][0], **F64)
    close(results[1][1], results[0][1], **F64)
