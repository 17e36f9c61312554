"""cross_entropy and sparse_softmax_cross_entropy_with_logits against torch, in float64."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import xent_triton
from helpers import close, rand_logits, tol

pytestmark = pytest.mark.usefixtures("row_kernels")

C = 11
F64 = dict(rtol=1e-10, atol=1e-10)


def make_target(kind, input_shape, device, ignore_index=-100, n_ignored=2):
    """Class indices (some ignored) or probabilities for an input of input_shape."""
    cdim = 1 if len(input_shape) >= 2 else 0
    if kind == "probs":
        return torch.softmax(torch.randn(input_shape, dtype=torch.float64, device=device) * 2, cdim)
    bshape = tuple(s for i, s in enumerate(input_shape) if i != cdim)
    t = torch.randint(0, input_shape[cdim], bshape, device=device)
    flat = t.view(-1)
    flat[: min(n_ignored, max(flat.numel() - 1, 0))] = ignore_index
    return t.to(torch.int32 if kind == "int32" else torch.int64)


def compare(input, target, **kw):
    """Loss and dinput of xent_triton.cross_entropy vs F.cross_entropy (float64)."""
    ours = xent_triton.cross_entropy(input, target, **kw)
    x = input.detach().clone().requires_grad_()
    t = target.long() if not target.dtype.is_floating_point else target
    theirs = F.cross_entropy(x, t, **kw)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    close(ours, theirs, **F64)
    w = torch.randn(ours.shape, dtype=torch.float64, device=input.device)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), input)
    (g_theirs,) = torch.autograd.grad((theirs * w).sum(), x)
    close(g_ours, g_theirs, **F64)


OPTIONS = list(itertools.product([False, True], ["none", "mean", "sum"], [0.0, 0.15], [-100, 3]))


@pytest.mark.parametrize("kind", ["int64", "probs"])
@pytest.mark.parametrize("use_weight,reduction,smoothing,ignore_index", OPTIONS)
def test_every_option_combination(backend, device, kind, use_weight, reduction, smoothing, ignore_index):
    x = rand_logits((6, C), torch.float64, device)
    target = make_target(kind, (6, C), device, ignore_index)
    weight = torch.rand(C, dtype=torch.float64, device=device) + 0.1 if use_weight else None
    kw = dict(weight=weight, reduction=reduction, label_smoothing=smoothing, ignore_index=ignore_index)
    if kind == "probs" and ignore_index != -100:
        for fn in (xent_triton.cross_entropy, F.cross_entropy):
            with pytest.raises(RuntimeError, match="ignore_index is not supported for floating point target"):
                fn(x.detach(), target, **kw)
        return
    compare(x, target, **kw)


@pytest.mark.parametrize("ignore_index", [-1, -7])
def test_negative_ignore_index_with_probabilities_like_torch(backend, device, ignore_index):
    """torch refuses only an ignore_index >= 0 with probability targets: a negative one matches no class."""
    x = rand_logits((6, C), torch.float64, device)
    compare(x, make_target("probs", (6, C), device), ignore_index=ignore_index, label_smoothing=0.1)


@pytest.mark.parametrize("shape", [(C,), (5, C), (2, C, 3), (2, C, 2, 3)])
@pytest.mark.parametrize("kind", ["int64", "int32", "probs"])
def test_every_input_rank(backend, device, shape, kind):
    x = rand_logits(shape, torch.float64, device)
    target = make_target(kind, shape, device, n_ignored=1 if len(shape) > 1 else 0)
    weight = torch.rand(C, dtype=torch.float64, device=device) + 0.1
    compare(x, target, weight=weight, label_smoothing=0.1)
    compare(x, target, reduction="none")


def test_all_rows_ignored_mean_is_nan_like_torch(backend, device):
    x = rand_logits((4, C), torch.float64, device)
    t = torch.full((4,), -100, device=device)
    compare(x, t, reduction="sum")
    assert math.isnan(xent_triton.cross_entropy(x, t).item()) and math.isnan(F.cross_entropy(x.detach(), t).item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_and_single_precision(backend, device, dtype):
    x = rand_logits((16, 3000), dtype, device)
    t = make_target("int64", (16, 3000), device)
    ours = xent_triton.cross_entropy(x, t, reduction="none", label_smoothing=0.1)
    x64 = x.detach().double().requires_grad_()
    ref = F.cross_entropy(x64, t, reduction="none", label_smoothing=0.1)
    assert ours.dtype == dtype
    close(ours, ref, **tol(dtype))
    (g,) = torch.autograd.grad(ours.sum(), x)
    (r,) = torch.autograd.grad(ref.sum(), x64)
    assert g.dtype == dtype
    close(g, r, **tol(dtype))


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("x_dtype,p_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float64),
                                             (torch.float32, torch.bfloat16)])
def test_mixed_dtype_probabilities_promote_like_torch(backend, device, reduction, x_dtype, p_dtype):
    """torch promotes the loss to the wider of input and probabilities; the value is rounded once."""
    x = rand_logits((5, 300), x_dtype, device)
    p = make_target("probs", (5, 300), device).to(p_dtype)
    ours = xent_triton.cross_entropy(x, p, reduction=reduction)
    assert ours.dtype == F.cross_entropy(x.detach(), p, reduction=reduction).dtype == torch.promote_types(x_dtype,
                                                                                                          p_dtype)
    x64 = x.detach().double().requires_grad_()
    ref = F.cross_entropy(x64, p.double(), reduction=reduction)
    close(ours, ref, **tol(torch.float32))  # inputs are exact in float64; only the sum's rounding differs
    (g,) = torch.autograd.grad(ours.sum(), x)
    (r,) = torch.autograd.grad(ref.sum(), x64)
    assert g.dtype == x_dtype
    close(g, r, **tol(x_dtype))


def test_class_weights_promote_like_torch_for_probabilities(backend, device):
    x = rand_logits((5, 30), torch.float32, device)
    p = make_target("probs", (5, 30), device).float()
    w = torch.rand(30, dtype=torch.float64, device=device) + 0.1
    for reduction in ("none", "sum"):
        ours = xent_triton.cross_entropy(x, p, weight=w, reduction=reduction)
        theirs = F.cross_entropy(x.detach(), p, weight=w, reduction=reduction)
        assert ours.dtype == theirs.dtype == torch.float64
        close(ours, F.cross_entropy(x.detach().double(), p.double(), weight=w, reduction=reduction),
              **tol(torch.float32))


def test_autocast_keeps_the_fallback_exact(backend, device):
    """Under autocast fp32 logits and probabilities give an fp32-accurate loss on every backend (the ops turn
    autocast off inside: CPU autocast would round the fallback's vecdot to bf16)."""
    x = rand_logits((6, 700), torch.float32, device)
    p = make_target("probs", (6, 700), device).float()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        ours = xent_triton.cross_entropy(x, p, reduction="none")
    assert ours.dtype == torch.float32
    close(ours, F.cross_entropy(x.detach().double(), p.double(), reduction="none"), **tol(torch.float32))


def test_ignored_rows_have_zero_gradient(backend, device):
    x = rand_logits((5, 40), torch.float32, device)
    t = torch.tensor([3, -100, 7, -100, 0], device=device)
    xent_triton.cross_entropy(x, t, label_smoothing=0.2, lse_square_scale=1e-3).backward()
    assert (x.grad[[1, 3]] == 0).all() and (x.grad[[0, 2, 4]] != 0).any()


def ref_z_softcap(x, t, z, cap, ignore_index=-100, weight=None, smoothing=0.0):
    """float64 reference for the extras torch lacks: softcap, then CE plus z * lse^2."""
    xs = cap * torch.tanh(x / cap) if cap else x
    active = t != ignore_index
    per = F.cross_entropy(xs, t, weight=weight, reduction="none", ignore_index=ignore_index,
                          label_smoothing=smoothing)
    per = per + z * torch.logsumexp(xs, -1) ** 2 * active
    w_t = weight[t.clamp(min=0)] if weight is not None else torch.ones_like(per)
    return per, per.sum() / (w_t * active).sum()


@pytest.mark.parametrize("z,cap", [(1e-2, None), (0.0, 5.0), (1e-3, 2.0)])
def test_z_loss_and_softcap(backend, device, z, cap):
    x = rand_logits((6, 50), torch.float64, device, scale=6)
    t = make_target("int64", (6, 50), device)
    weight = torch.rand(50, dtype=torch.float64, device=device) + 0.5
    ours = xent_triton.cross_entropy(x, t, weight=weight, label_smoothing=0.1, lse_square_scale=z, softcap=cap)
    x64 = x.detach().clone().requires_grad_()
    _, ref = ref_z_softcap(x64, t, z, cap, weight=weight, smoothing=0.1)
    close(ours, ref, **F64)
    (g,) = torch.autograd.grad(ours, x)
    (r,) = torch.autograd.grad(ref, x64)
    close(g, r, **F64)


def test_softcap_keeps_masked_logits_masked(backend, device):
    x = rand_logits((3, 20), torch.float32, device, requires_grad=False)
    x[:, 5:9] = float("-inf")
    x.requires_grad_()
    t = torch.tensor([0, 1, 12], device=device)
    loss = xent_triton.cross_entropy(x, t, softcap=4.0, reduction="none")
    xd = x.detach().double()
    xs = torch.where(xd == float("-inf"), xd, 4.0 * torch.tanh(xd / 4.0))
    close(loss, F.cross_entropy(xs, t, reduction="none"), rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert (g[:, 5:9] == 0).all() and torch.isfinite(g).all()


def test_return_lse(backend, device):
    x = rand_logits((2, 3, C), torch.float64, device).transpose(1, 2)  # (N, C, d1)
    t = make_target("int64", (2, C, 3), device, n_ignored=1)
    loss, lse = xent_triton.cross_entropy(x, t, reduction="sum", return_lse=True)
    ref = torch.logsumexp(x.detach(), 1)
    assert lse.shape == t.shape and not lse.requires_grad
    close(torch.where(t != -100, lse, 0), torch.where(t != -100, ref, 0), **F64)
    assert (lse[t == -100] == 0).all()
    compare(x, t, reduction="sum")


def test_probability_targets_with_z_loss(backend, device):
    x = rand_logits((4, C), torch.float64, device)
    p = make_target("probs", (4, C), device)
    ours = xent_triton.cross_entropy(x, p, reduction="none", lse_square_scale=0.05)
    ref = F.cross_entropy(x.detach(), p, reduction="none") + 0.05 * torch.logsumexp(x.detach(), -1) ** 2
    close(ours, ref, **F64)


def test_out_of_range_index(backend, device):
    """Triton path: NaN for that row (no host sync); fallback: IndexError naming the index."""
    x = rand_logits((4, C), torch.float32, device)
    t = torch.tensor([1, C + 4, 2, -100], device=device)
    if backend == "torch":
        with pytest.raises(IndexError, match=f"class index {C + 4} is out of range for {C} classes"):
            xent_triton.cross_entropy(x, t, reduction="none")
        t[1] = -7
        with pytest.raises(IndexError, match="class index -7"):
            xent_triton.cross_entropy(x, t, reduction="none")
        return
    loss = xent_triton.cross_entropy(x, t, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()
    assert torch.isnan(xent_triton.cross_entropy(x, t))
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isnan(g[1]).all() and torch.isfinite(g[[0, 2, 3]]).all()
    w = torch.rand(C, device=device)
    assert torch.isnan(xent_triton.cross_entropy(x, t, weight=w, reduction="none")[1])


def test_sparse_tf_variant_under_autocast(backend, device):
    """TF's rule under mixed precision, as softmax_cross_entropy_with_logits: a float32 loss for half logits."""
    x = rand_logits((4, C), torch.bfloat16, device, requires_grad=False)
    labels = torch.randint(0, C, (4,), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = xent_triton.sparse_softmax_cross_entropy_with_logits(labels, x)
    assert out.dtype == torch.float32
    close(out, F.cross_entropy(x.double(), labels, reduction="none"), rtol=1e-6, atol=1e-6)


def test_sparse_tf_variant(backend, device):
    x = rand_logits((3, 4, C), torch.float64, device)
    labels = torch.randint(0, C, (3, 4), device=device, dtype=torch.int32)
    out = xent_triton.sparse_softmax_cross_entropy_with_logits(labels, x)
    ref = F.cross_entropy(x.detach().reshape(-1, C), labels.long().reshape(-1), reduction="none").view(3, 4)
    assert out.shape == (3, 4)
    close(out, ref, **F64)
    assert torch.autograd.gradcheck(
        lambda z: xent_triton.sparse_softmax_cross_entropy_with_logits(labels[:1, :2], z),
        (rand_logits((1, 2, C), torch.float64, device),), fast_mode=True)


def test_gradcheck_hard_with_everything(backend, device):
    t = torch.tensor([2, -100, 4], device=device)
    w = torch.rand(6, dtype=torch.float64, device=device) + 0.2
    assert torch.autograd.gradcheck(
        lambda z: xent_triton.cross_entropy(z, t, weight=w, label_smoothing=0.2, lse_square_scale=0.1, softcap=3.0),
        (rand_logits((3, 6), torch.float64, device),), fast_mode=True)


def test_module_matches_torch_module(backend, device):
    w = torch.rand(C, dtype=torch.float64, device=device)
    ours = xent_triton.CrossEntropyLoss(weight=w, ignore_index=1, label_smoothing=0.05)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=1, label_smoothing=0.05)
    assert torch.equal(ours.state_dict()["weight"], theirs.state_dict()["weight"])
    x = rand_logits((7, C), torch.float64, device)
    t = torch.randint(0, C, (7,), device=device)
    close(ours(x, t), theirs(x.detach(), t), **F64)
    legacy = xent_triton.CrossEntropyLoss(size_average=False)
    assert legacy.reduction == "sum"
    close(legacy(x, t), F.cross_entropy(x.detach(), t, reduction="sum"), **F64)
    soft = xent_triton.SoftmaxCrossEntropyWithLogits(axis=0)
    y = torch.softmax(torch.randn(C, 7, dtype=torch.float64, device=device), 0)
    close(soft(y, x.detach().t()), xent_triton.softmax_cross_entropy_with_logits(y, x.detach().t(), axis=0), **F64)


def test_signature_is_torchs():
    """Every torch parameter in torch's order and with torch's default, so positional calls bind alike;
    ours only add keyword-only ones."""
    import inspect
    theirs = list(inspect.signature(F.cross_entropy).parameters.values())
    ours = list(inspect.signature(xent_triton.cross_entropy).parameters.values())
    assert [(p.name, p.default, p.kind) for p in ours[:len(theirs)]] == \
        [(p.name, p.default, p.kind) for p in theirs]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(theirs):])


@pytest.mark.parametrize("size_average,reduce", [(False, None), (True, None), (None, False), (False, True)])
def test_legacy_reduction_arguments_like_torch(backend, device, size_average, reduce):
    """size_average and reduce, positionally and by keyword, give torch's reduction and its warning."""
    x = rand_logits((6, C), torch.float64, device)
    t = make_target("int64", (6, C), device, ignore_index=2)
    w = torch.rand(C, dtype=torch.float64, device=device) + 0.1
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        theirs = F.cross_entropy(x.detach(), t, w, size_average, 2, reduce, "none", 0.1)
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        ours = xent_triton.cross_entropy(x, t, w, size_average, 2, reduce, "none", 0.1)
    assert ours.shape == theirs.shape
    close(ours, theirs, **F64)
    with pytest.warns(UserWarning):
        ours_kw = xent_triton.cross_entropy(x, t, weight=w, size_average=size_average, ignore_index=2,
                                            reduce=reduce, label_smoothing=0.1)
    close(ours_kw, theirs, **F64)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["int64", "probs"])
def test_double_backward_like_torch(backend, device, kind, reduction):
    """create_graph=True: the gradient of a gradient penalty (a Hessian-vector product) equals torch's, with
    weights, label smoothing and ignored rows; gradgradcheck also covers z-loss and softcap."""
    x = rand_logits((2, C, 3), torch.float64, device)
    target = make_target(kind, (2, C, 3), device)
    kw = dict(weight=torch.rand(C, dtype=torch.float64, device=device) + 0.1, label_smoothing=0.1,
              reduction=reduction)
    grads, hvps = [], []
    for fn in (xent_triton.cross_entropy, F.cross_entropy):
        z = x.detach().clone().requires_grad_()
        loss = fn(z, target, **kw)
        (g,) = torch.autograd.grad(loss.sum(), z, create_graph=True)
        grads.append(g.detach())
        hvps.append(torch.autograd.grad((g * g).sum(), z)[0])
    close(grads[0], grads[1], **F64)
    close(hvps[0], hvps[1], **F64)
    # fast_mode: a random projection of the Jacobians; the interpreter runs each forward slowly.
    small = rand_logits((3, 6), torch.float64, device)
    t = make_target(kind, (3, 6), device, n_ignored=1)
    assert torch.autograd.gradgradcheck(
        lambda z: xent_triton.cross_entropy(z, t, reduction=reduction, lse_square_scale=1e-2, softcap=3.0),
        (small,), fast_mode=True)


def test_inplace_backward_refuses_double_backward(backend, device):
    x = rand_logits((4, C), torch.float64, device)
    t = torch.randint(0, C, (4,), device=device)
    with pytest.raises(RuntimeError, match="not supported with inplace_backward=True"):
        torch.autograd.grad(xent_triton.cross_entropy(x * 1.0, t, inplace_backward=True), x, create_graph=True)


def test_hard_forward_reads_no_label_matrix(backend, device):
    """Hard labels: the only N x V tensor the ops touch is the logits (no one-hot is built)."""
    from xent_triton.layout import make_rows

    x = rand_logits((8, 100), torch.float32, device, requires_grad=False)
    t = torch.randint(0, 100, (8,), device=device)
    _layout, _x, labels, target, _w = make_rows(x, None, t, None, 1)
    assert labels is None and target.numel() == 8


def test_strided_class_index_target(backend, device):
    """Targets are read through their stride (a column of a wider index tensor)."""
    x = rand_logits((6, C), torch.float64, device)
    wide = torch.randint(0, C, (6, 3), device=device)
    t = wide[:, 1]
    assert t.stride(0) == 3
    compare(x, t, reduction="none")
    compare(x, t, label_smoothing=0.2, weight=torch.rand(C, dtype=torch.float64, device=device))
    x3 = rand_logits((2, C, 4), torch.float64, device)
    compare(x3, torch.randint(0, C, (2, 4, 2), device=device)[..., 0])
