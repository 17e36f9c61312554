"""Property tests (hypothesis): both public entry points against float64 references.

Each example draws a shape (rank 1-4, V up to 70000, batch sizes including 0
and 1), an axis, a layout (contiguous, strided or transposed), dtypes, a label
kind and a logit scale from 1e-3 to 1e4 with -inf masks. The check is "at
least as accurate as torch in the same dtype": |ours - ref64| is bounded by
the dtype tolerance plus a multiple of torch's own error, which grows with the
logit scale in low precision.
"""
import math
import os

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xent_triton
from helpers import TOL, ref_soft

EXAMPLES = int(os.environ.get("XENT_HYPOTHESIS_EXAMPLES", "25"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MAX_ELEMENTS = 150_000
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@st.composite
def problems(draw):
    rank = draw(st.integers(1, 4))
    V = draw(st.one_of(st.integers(1, 300), st.sampled_from([1000, 4097, 32000, 70000])))
    axis = draw(st.integers(-rank, rank - 1))
    budget = max(1, MAX_ELEMENTS // V)
    batch = []
    for _ in range(rank - 1):
        size = draw(st.sampled_from([0, 1, 2, 3, 5, 8]))
        if math.prod(batch + [size]) > budget:
            size = 1
        batch.append(size)
    ax = axis % rank
    shape = tuple(batch[:ax] + [V] + batch[ax:])
    return dict(
        shape=shape, axis=axis,
        layout=draw(st.sampled_from(["contiguous", "strided", "transposed"])),
        dtype=draw(st.sampled_from(DTYPES)),
        label_dtype=draw(st.sampled_from(DTYPES)),
        scale=10 ** draw(st.floats(-3, 4)),
        mask_p=draw(st.sampled_from([0.0, 0.0, 0.3])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _layout(t, layout, gen):
    """The same values as t, in a non-contiguous layout."""
    if layout == "strided" and t.dim() >= 1:
        big = torch.empty(t.shape[:-1] + (t.shape[-1] * 2,), dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    return t


def _draw_logits(p, device, gen):
    x = torch.randn(p["shape"], generator=gen, dtype=torch.float64) * p["scale"]
    x = x.clamp(-6e4, 6e4)  # finite in fp16; +inf logits are tested in test_extremes
    if p["mask_p"] and p["shape"][p["axis"]] > 1:
        mask = torch.rand(p["shape"], generator=gen) < p["mask_p"]
        keep = torch.zeros_like(mask)
        keep.select(p["axis"], 0).fill_(True)  # never a fully masked row here; see test_extremes
        x = x.masked_fill(mask & ~keep, float("-inf"))
    return x.to(p["dtype"]).to(device)


def _draw_labels(kind, logits, p, gen):
    shape, axis = p["shape"], p["axis"]
    if kind == "soft":
        y = torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64) * 2, axis)
    elif kind == "onehot":
        idx = torch.randint(0, shape[axis], shape, generator=gen).select(axis, 0).unsqueeze(axis)
        y = torch.zeros(shape, dtype=torch.float64).scatter_(axis, idx, 1.0)
    elif kind == "unnormalized":
        y = torch.rand(shape, generator=gen, dtype=torch.float64) * 3
    else:
        y = torch.randn(shape, generator=gen, dtype=torch.float64)
    y = y.to(p["label_dtype"]).to(logits.device)
    # Labels on masked logits would make the loss +inf (tested in test_extremes).
    return y.masked_fill(logits == float("-inf"), 0)


def assert_as_accurate_as_torch(ours, torch_same_dtype, ref64, dtype):
    assert ours.shape == ref64.shape
    t = TOL[dtype]
    ours, same = ours.double().cpu(), torch_same_dtype.double().cpu()
    ref64 = ref64.cpu()
    err = (ours - ref64).abs()
    bound = t["atol"] + t["rtol"] * ref64.abs() + 4 * (same - ref64).abs().nan_to_num(0.0)
    same_special = (ours.isnan() & ref64.isnan()) | (ours == ref64)
    bad = ~(same_special | (err <= bound))
    assert not bad.any(), f"max err {err[bad].max().item():.3g} > bound {bound[bad].min().item():.3g}"


def _soft_ref(y, x, axis):
    return ref_soft(y, x, axis)


@SETTINGS
@given(p=problems(), kind=st.sampled_from(["soft", "onehot", "unnormalized", "negative"]))
def test_soft_api_property(backend, device, p, kind):
    gen = torch.Generator().manual_seed(p["seed"])
    x0 = _draw_logits(p, device, gen)
    y0 = _draw_labels(kind, x0, p, gen)
    x = _layout(x0, p["layout"], gen).requires_grad_()
    y = _layout(y0, p["layout"], gen).requires_grad_()
    out = xent_triton.softmax_cross_entropy_with_logits(y, x, p["axis"])
    x64 = x0.double().requires_grad_()
    y64 = y0.double().requires_grad_()
    ref = _soft_ref(y64, x64, p["axis"])
    xs = x0.detach().float().requires_grad_() if p["dtype"] != torch.float64 else x0.detach().clone().requires_grad_()
    same = _soft_ref(y0.to(xs.dtype), xs, p["axis"]).to(p["dtype"])
    wdt = torch.float64
    assert_as_accurate_as_torch(out, same.detach().to(wdt), ref.detach(), p["dtype"])
    if out.numel() == 0:
        return
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device)
    gx, gy = torch.autograd.grad((out.double() * g).sum(), (x, y))
    (rx,) = torch.autograd.grad((ref * g).sum(), x64)
    (sx,) = torch.autograd.grad((same.double() * g).sum(), xs)
    assert_as_accurate_as_torch(gx, sx.to(p["dtype"]), rx, p["dtype"])
    # dlabels = g * (lse - x), exactly; +inf on masked logits. The incoming
    # gradient has the loss's (the logits') dtype, so the looser tolerance applies.
    ax = p["axis"] % len(p["shape"])
    x64d = x64.detach()
    ry = g.unsqueeze(ax) * (torch.logsumexp(x64d, ax, keepdim=True) - x64d)
    loose = max(p["dtype"], p["label_dtype"], key=lambda d: TOL[d]["rtol"])
    assert_as_accurate_as_torch(gy, ry.to(loose), ry, loose)


def _class_dim_problem(p, device, ignore_frac, weighted, index_dtype):
    """torch's layout of a drawn problem (class dim 1, or 0 for 1-D): (p, generator, logits, targets, weight)."""
    ax = p["axis"] % len(p["shape"])
    others = [s for i, s in enumerate(p["shape"]) if i != ax]
    shape = tuple(others[:1] + [p["shape"][ax]] + others[1:])
    p = dict(p, shape=shape, axis=1 if len(shape) >= 2 else 0)
    gen = torch.Generator().manual_seed(p["seed"])
    x0 = _draw_logits(p, device, gen)
    C = shape[p["axis"]]
    bshape = tuple(s for i, s in enumerate(shape) if i != p["axis"])
    t = torch.randint(0, C, bshape, generator=gen)
    t = t.masked_fill(torch.rand(bshape, generator=gen) < ignore_frac, -100).to(device)
    # Targets on masked logits give +inf (tested in test_extremes): move them to class 0, never masked.
    picked = x0.gather(p["axis"], t.clamp(min=0).unsqueeze(p["axis"])).squeeze(p["axis"])
    t = torch.where(picked == float("-inf"), 0, t).to(index_dtype)
    w = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.1).to(device) if weighted else None
    return p, gen, x0, t, w


@SETTINGS
@given(p=problems(), ignore_frac=st.sampled_from([0.0, 0.3]), smoothing=st.sampled_from([0.0, 0.1]),
       weighted=st.booleans(), index_dtype=st.sampled_from([torch.int64, torch.int32]))
def test_cross_entropy_property(backend, device, p, ignore_frac, smoothing, weighted, index_dtype):
    p, gen, x0, t, w = _class_dim_problem(p, device, ignore_frac, weighted, index_dtype)
    x = _layout(x0, p["layout"], gen).requires_grad_()
    kw = dict(weight=w.to(p["dtype"]) if w is not None else None, label_smoothing=smoothing)
    out = xent_triton.cross_entropy(x, t, reduction="none", **kw)
    x64 = x0.double().requires_grad_()
    ref = F.cross_entropy(x64, t.long(), reduction="none", weight=w, label_smoothing=smoothing)
    xs = x0.detach().float().requires_grad_() if p["dtype"] != torch.float64 else x0.detach().clone().requires_grad_()
    same = F.cross_entropy(xs, t.long(), reduction="none", weight=w.to(xs.dtype) if w is not None else None,
                           label_smoothing=smoothing).to(p["dtype"])
    assert_as_accurate_as_torch(out, same.detach(), ref.detach(), p["dtype"])
    if out.numel() == 0:
        return
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device)
    (gx,) = torch.autograd.grad((out.double() * g).sum(), x)
    (rx,) = torch.autograd.grad((ref * g).sum(), x64)
    (sx,) = torch.autograd.grad((same.double() * g).sum(), xs)
    assert_as_accurate_as_torch(gx, sx.to(p["dtype"]), rx, p["dtype"])
    # The mean reduction follows torch's rule.
    mean = xent_triton.cross_entropy(x.detach(), t, **kw)
    ref_mean = F.cross_entropy(x64.detach(), t.long(), weight=w, label_smoothing=smoothing)
    same_mean = F.cross_entropy(xs.detach(), t.long(), weight=w.to(xs.dtype) if w is not None else None,
                                label_smoothing=smoothing).to(p["dtype"])
    assert_as_accurate_as_torch(mean, same_mean, ref_mean, p["dtype"])


