"""softmax_cross_entropy_with_logits: TF semantics on every backend, against float64."""
import math

import pytest
import torch

import xent_triton
from helpers import close, grads, rand_logits, rand_probs, ref_soft, tol, set_config
from xent_triton import softmax_cross_entropy_with_logits as sce

pytestmark = pytest.mark.usefixtures("row_kernels")


def check_soft(labels, logits, axis, backend_dtype_tol=None):
    """Loss, dlogits and (if wanted) dlabels against the float64 reference."""
    t = backend_dtype_tol or tol(logits.dtype, labels.dtype)
    out = sce(labels, logits, axis)
    ax = axis % logits.dim()
    assert out.shape == tuple(s for i, s in enumerate(logits.shape) if i != ax)
    assert out.dtype == logits.dtype
    ref = ref_soft(labels.detach(), logits.detach(), ax)
    close(out, ref, **t)
    if logits.requires_grad or labels.requires_grad:
        got, w = grads(out, [logits, labels])
        lx = logits.detach().double().requires_grad_(logits.requires_grad)
        ly = labels.detach().double().requires_grad_(labels.requires_grad)
        want, _ = grads(ref_soft(ly, lx, ax), [lx, ly], w)
        for g, r, src in zip(got, want, [t_ for t_ in (logits, labels) if t_.requires_grad]):
            assert g.dtype == src.dtype and g.shape == src.shape
            close(g, r, **t)
    return out


def test_seed_worked_example(backend, device):
    logits = torch.tensor([[1.0, 2.0, 3.0]] * 3, device=device)
    labels = torch.tensor([[0.0, 0.0, 1.0]] * 3, device=device)
    loss = sce(labels, logits)
    close(loss, torch.full((3,), 0.40760596, dtype=torch.float64, device=device), rtol=1e-6, atol=1e-7)
    assert abs(loss.sum().item() - 1.2228179) < 1e-6


@pytest.mark.parametrize("shape", [(7,), (5, 9), (3, 4, 6), (2, 3, 2, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_rank_and_axis(backend, device, shape, dtype):
    for axis in list(range(len(shape))) + [-1]:
        logits = rand_logits(shape, dtype, device)
        labels = rand_probs(shape, dtype, device, axis, requires_grad=True)
        check_soft(labels, logits, axis)


def test_rank1_gives_scalar(backend, device):
    out = check_soft(rand_probs((11,), torch.float32, device), rand_logits((11,), torch.float32, device), 0)
    assert out.dim() == 0


@pytest.mark.parametrize("V", [1, 2, 17, 1000, 4097, 70001])
def test_class_counts(backend, device, V):
    N = 3 if V > 5000 else 6
    check_soft(rand_probs((N, V), torch.float32, device, requires_grad=True),
               rand_logits((N, V), torch.float32, device), -1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("label_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_and_mixed_labels(backend, device, dtype, label_dtype):
    check_soft(rand_probs((8, 300), label_dtype, device, requires_grad=True),
               rand_logits((8, 300), dtype, device), -1)


def test_half_gradient_keeps_true_class(backend, device):
    """bf16 cancellation trap: softmax - 1 must be formed in fp32 and rounded once."""
    V = 32000
    x = torch.zeros(2, V, device=device)
    x[:, 7] = 20.0  # softmax ~ 1 at class 7: the gradient there is tiny and negative
    x = (x + 0.01 * torch.randn(2, V, device=device)).bfloat16().requires_grad_()
    y = torch.zeros(2, V, device=device, dtype=torch.bfloat16)
    y[:, 7] = 1
    sce(y, x).sum().backward()
    ref = torch.softmax(x.detach().double(), -1) - y.double()
    close(x.grad[:, 7], ref[:, 7], rtol=2e-2, atol=0)
    assert (x.grad[:, 7] < 0).all()


def test_strided_views_read_in_place(backend, device):
    base = rand_logits((4, 9, 50), torch.float32, device, requires_grad=False)
    # Language-model shift: rows that two strides describe.
    check_soft(rand_probs((4, 8, 50), torch.float32, device, requires_grad=True),
               base[:, :-1].requires_grad_(), -1)
    # Every other row and a column slice (row stride != V).
    big = rand_logits((10, 80), torch.float32, device, requires_grad=False)
    check_soft(rand_probs((5, 60), torch.float32, device), big[::2, 10:70].requires_grad_(), -1)
    # Transposed: classes on axis 0 with unit stride after the transpose.
    t = rand_logits((30, 6), torch.float32, device, requires_grad=False).t()
    check_soft(rand_probs((6, 30), torch.float32, device), t.requires_grad_(), 1)
    # Batch dims that no two strides can describe (copied once).
    weird = rand_logits((3, 4, 5, 40), torch.float32, device, requires_grad=False)[:, ::2, 1:4]
    check_soft(rand_probs((3, 2, 3, 40), torch.float32, device), weird.requires_grad_(), -1)


def test_class_axis_with_stride(backend, device):
    """axis=1 of (N, C, L): the documented one copy, same numbers."""
    check_soft(rand_probs((3, 40, 5), torch.float32, device, axis=1, requires_grad=True),
               rand_logits((3, 40, 5), torch.float32, device), 1)


@pytest.mark.parametrize("lshape", [(1, 33), (33,), (4, 1, 33)])
def test_broadcast_labels(backend, device, lshape):
    logits = rand_logits((4, 5, 33), torch.float32, device)
    labels = rand_probs(lshape, torch.float32, device, requires_grad=True)
    check_soft(labels, logits, -1)


def test_broadcast_labels_not_materialized(backend, device):
    from xent_triton.layout import make_rows

    logits = rand_logits((64, 100), torch.float32, device, requires_grad=False)
    labels = rand_probs((1, 100), torch.float32, device)
    layout, x, y, _t, _w = make_rows(logits, labels, None, None, 1)
    assert y.data_ptr() == labels.data_ptr() and layout.y_strides == (0, 0)
    assert x.data_ptr() == logits.data_ptr()


def test_unnormalized_and_negative_labels(backend, device):
    """The exact gradient softmax * sum(y) - y, not TF's softmax - y."""
    logits = rand_logits((6, 40), torch.float64, device)
    labels = (torch.randn(6, 40, dtype=torch.float64, device=device) * 2).requires_grad_()
    check_soft(labels, logits, -1)
    out = sce(labels, logits)
    (g,) = torch.autograd.grad(out.sum(), logits)
    p = torch.softmax(logits.detach(), -1)
    close(g, p * labels.detach().sum(-1, keepdim=True) - labels.detach(), rtol=1e-10, atol=1e-10)


def test_gradcheck(backend, device):
    # fast_mode checks a random projection of the Jacobian: few evaluations, so
    # the Triton interpreter stays quick.
    logits = rand_logits((2, 5), torch.float64, device)
    labels = (torch.rand(2, 5, dtype=torch.float64, device=device)).requires_grad_()
    assert torch.autograd.gradcheck(lambda y, x: sce(y, x), (labels, logits), fast_mode=True)
    x3 = rand_logits((2, 4, 3), torch.float64, device)
    y3 = torch.rand(2, 4, 3, dtype=torch.float64, device=device).requires_grad_()
    assert torch.autograd.gradcheck(lambda y, x: sce(y, x, axis=1), (y3, x3), fast_mode=True)


def test_public_autograd_function(backend, device):
    logits = rand_logits((2, 6), torch.float64, device)
    labels = rand_probs((2, 6), torch.float64, device, requires_grad=True)
    fn = xent_triton.SoftmaxCrossEntropyFunction
    assert issubclass(fn, torch.autograd.Function)
    out = fn.apply(labels, logits, 1)
    close(out, ref_soft(labels.detach(), logits.detach()), rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda y, x: fn.apply(y, x, 1), (labels, logits), fast_mode=True)


def test_masked_logits(backend, device):
    """-inf with label 0: finite loss, zero gradient (torch and TF give NaN)."""
    logits = rand_logits((4, 30), torch.float32, device, requires_grad=False)
    mask = torch.rand(4, 30, device=device) < 0.4
    mask[:, 0] = False
    logits = logits.masked_fill(mask, float("-inf")).requires_grad_()
    labels = rand_probs((4, 30), torch.float32, device).masked_fill(mask, 0.0)
    out = sce(labels, logits)
    assert torch.isfinite(out).all()
    close(out, ref_soft(labels, logits.detach()), rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(out.sum(), logits)
    assert torch.isfinite(g).all() and (g[mask] == 0).all()


def test_label_mass_on_masked_logit_is_inf(backend, device):
    logits = rand_logits((3, 10), torch.float32, device, requires_grad=False)
    logits[1, 4] = float("-inf")
    labels = rand_probs((3, 10), torch.float32, device)
    out = sce(labels, logits)
    assert out[1].item() == math.inf
    assert torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("where", ["logits", "labels"])
def test_nan_poisons_only_its_row(backend, device, where):
    logits = rand_logits((5, 64), torch.float32, device, requires_grad=False)
    labels = rand_probs((5, 64), torch.float32, device)
    (logits if where == "logits" else labels)[2, 17] = float("nan")
    logits.requires_grad_()
    out = sce(labels, logits)
    assert torch.isnan(out[2]) and torch.isfinite(out[[0, 1, 3, 4]]).all()
    (g,) = torch.autograd.grad(out.sum(), logits)
    assert torch.isnan(g[2]).any() and torch.isfinite(g[[0, 1, 3, 4]]).all()


@pytest.mark.parametrize("shape", [(0, 10), (3, 0, 10), (0,) * 1 + (4,)])
def test_empty_batch(backend, device, shape):
    logits = rand_logits(shape, torch.float32, device)
    labels = rand_probs(shape, torch.float32, device, requires_grad=True)
    out = sce(labels, logits)
    assert out.shape == shape[:-1] and out.numel() == 0
    gx, gy = torch.autograd.grad(out.sum(), (logits, labels))
    assert gx.shape == shape and gy.shape == shape


def test_labels_without_grad_get_none(backend, device):
    logits = rand_logits((3, 9), torch.float32, device)
    labels = rand_probs((3, 9), torch.float32, device)
    sce(labels, logits).sum().backward()
    assert labels.grad is None and logits.grad is not None


@pytest.mark.parametrize("axis", [-1, 0])
def test_double_backward(backend, device, axis):
    """create_graph=True gives a gradient that can be differentiated again, in the logits and in the labels:
    gradgradcheck, for the functional form and the public autograd.Function."""
    from xent_triton import SoftmaxCrossEntropyFunction
    logits = rand_logits((3, 6), torch.float64, device)
    labels = rand_probs((3, 6), torch.float64, device).requires_grad_()
    if axis == 0:
        logits, labels = (t.detach().t().contiguous().requires_grad_() for t in (logits, labels))
    # fast_mode: a random projection of the Jacobians; the interpreter runs each forward slowly.
    for fn in (lambda x, y: sce(y, x, axis), lambda x, y: SoftmaxCrossEntropyFunction.apply(y, x, axis)):
        assert torch.autograd.gradgradcheck(fn, (logits, labels), fast_mode=True)


def test_double_backward_first_order_and_upstream(backend, device):
    """Under create_graph=True the first-order gradients keep the kernels' values and rules (-inf logits,
    rows of -inf, zero labels, an empty batch); with one-hot labels and an upstream gradient that itself
    requires grad, both orders match torch's differentiation of -(y * log_softmax(x)).sum(-1)."""
    ninf = float("-inf")
    x = torch.tensor([[0.3, ninf, 1.0, -0.5], [0.3, ninf, 1.0, -0.5], [ninf] * 4, [ninf] * 4, [0.1, 0.2, 0.3, 0.4]],
                     dtype=torch.float64, device=device)
    y = torch.tensor([[0.5, 0, 0.5, 0], [0.25, 0.25, 0.5, 0], [0] * 4, [0.5, 0.5, 0, 0], [0.1, 0.2, 0.3, 0.4]],
                     dtype=torch.float64, device=device)
    u = torch.arange(1.0, 6.0, dtype=torch.float64, device=device)
    for shape in ((5, 4), (0, 4)):
        grads = []
        for create_graph in (False, True):
            xx, yy = (t[:shape[0]].clone().requires_grad_() for t in (x, y))
            grads.append(torch.autograd.grad(sce(yy, xx), (xx, yy), u[:shape[0]], create_graph=create_graph))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    x = rand_logits((3, 6), torch.float64, device)
    y = torch.nn.functional.one_hot(torch.tensor([1, 4, 0], device=device), 6).double().requires_grad_()
    u = torch.rand(3, dtype=torch.float64, device=device, requires_grad=True)
    results = []
    for fn in (sce, lambda yy, xx: -(yy * torch.log_softmax(xx, -1)).sum(-1)):
        gx, gy = torch.autograd.grad(fn(y, x), (x, y), u, create_graph=True)
        results.append((gx, gy) + torch.autograd.grad((gx.square().sum() + (gy * gx).sum()), (x, y, u)))
    for a, b in zip(*results):
        close(a, b, rtol=1e-10, atol=1e-10)


def test_saves_no_n_by_v_intermediate(backend, device):
    logits = rand_logits((16, 256), torch.float32, device)
    labels = rand_probs((16, 256), torch.float32, device, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sce(labels, logits).sum().backward()
    inputs = {logits.data_ptr(), labels.data_ptr()}
    for t in saved:
        # Besides the inputs, only O(rows) statistics: 3 numbers a row (layout.stats_shape).
        assert t.data_ptr() in inputs or t.numel() <= 3 * 16, (tuple(t.shape), t.dtype)


def test_deterministic(backend, device):
    logits = rand_logits((7, 5000), torch.bfloat16, device)
    labels = rand_probs((7, 5000), torch.bfloat16, device, requires_grad=True)
    runs = []
    for _ in range(2):
        out = sce(labels, logits)
        runs.append((out,) + torch.autograd.grad(out.sum(), (logits, labels)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("split", [2, 3, 7])
def test_split_rows_match_single_program(backend, device, split, monkeypatch):
    """The split-row forward (small N) equals the one-program-per-row forward."""
    if backend != "triton":
        pytest.skip("split only exists in the Triton path")

    logits = rand_logits((3, 9000), torch.float32, device, requires_grad=False)
    logits[1, :4000] = float("-inf")
    logits[2] = float("-inf")
    labels = rand_probs((3, 9000), torch.float32, device)
    labels[2] = 0
    set_config(monkeypatch, split=1)
    one = sce(labels, logits)
    set_config(monkeypatch, split=split)
    many = sce(labels, logits)
    close(many, one, rtol=1e-6, atol=1e-6)
    close(many, ref_soft(labels, logits), rtol=1e-5, atol=1e-5)


def test_broadcast_labels_stay_broadcast_when_logits_need_a_copy(backend, device):
    from xent_triton.layout import make_rows

    logits = rand_logits((2, 3, 4, 6), torch.float32, device, requires_grad=False)[:, :, ::2]
    labels = rand_probs((6,), torch.float32, device)
    _layout, _x, y, _t, _w = make_rows(logits, labels, None, None, 3)
    assert y.data_ptr() == labels.data_ptr()  # read with stride 0, not materialized
    check_soft(labels.requires_grad_(), logits.requires_grad_(), -1)


def test_public_function_negative_axis_and_autocast(backend, device):
    fn = xent_triton.SoftmaxCrossEntropyFunction
    logits = rand_logits((3, 4, 5), torch.float64, device)
    labels = rand_probs((3, 4, 5), torch.float64, device, axis=1, requires_grad=True)
    out = fn.apply(labels, logits, -2)
    close(out, ref_soft(labels.detach(), logits.detach(), 1), rtol=1e-10, atol=1e-10)
    out.sum().backward()
    assert logits.grad.shape == logits.shape and labels.grad.shape == labels.shape
    with torch.autocast(device.type, dtype=torch.bfloat16):
        half = fn.apply(labels.detach().float(), logits.detach().bfloat16(), -1)
        # fp64 labels accumulate in fp64, but TF's rule stays: fp32 under autocast.
        wide = fn.apply(labels.detach(), logits.detach().bfloat16(), -1)
        wide_fn = xent_triton.softmax_cross_entropy_with_logits(labels.detach(), logits.detach().bfloat16())
    assert half.dtype == wide.dtype == wide_fn.dtype == torch.float32
    close(wide, ref_soft(labels.detach(), logits.detach().bfloat16(), -1), rtol=1e-6, atol=1e-6)


def test_broadcast_dlabels_summed_before_rounding(backend, device):
    logits = rand_logits((64, 50), torch.float32, device)
    labels = rand_probs((1, 50), torch.bfloat16, device, requires_grad=True)
    sce(labels, logits).sum().backward()
    x = logits.detach().double()
    ref = (torch.logsumexp(x, -1, keepdim=True) - x).sum(0, keepdim=True)
    assert labels.grad.dtype == torch.bfloat16
    close(labels.grad, ref.to(torch.bfloat16), rtol=0, atol=0.5)  # one bf16 rounding of a sum of ~500
