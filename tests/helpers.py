"""float64 references and comparison helpers for the tests."""
import dataclasses

import torch

from xent_triton import config


def set_config(monkeypatch, **fields):
    """Set fields of xent_triton's configuration for one test (backend, split, tile, rows, ...)."""
    monkeypatch.setattr(config, "active", dataclasses.replace(config.active, **fields))

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
}


def tol(*dtypes):
    """The loosest tolerance among the dtypes involved."""
    return max((TOL[d] for d in dtypes), key=lambda t: t["rtol"])


def ref_soft(labels, logits, axis=-1):
    """-sum(labels * log_softmax(logits)) in float64; a zero label never multiplies its logit."""
    x = logits.double()
    y = labels.double().expand(logits.shape)
    lsm = torch.log_softmax(x, axis)
    # Only where a zero label meets a -inf (or undefined) log-softmax is the term dropped;
    # elsewhere the labels keep their gradient -log_softmax.
    lsm = torch.where((y == 0) & ~torch.isfinite(lsm), 0.0, lsm)
    return -(y * lsm).sum(axis)


def rand_logits(shape, dtype, device, scale=3.0, requires_grad=True):
    x = (torch.randn(shape, dtype=torch.float64, device=device) * scale).to(dtype)
    return x.requires_grad_(requires_grad)


def rand_probs(shape, dtype, device, axis=-1, requires_grad=False):
    y = torch.softmax(torch.randn(shape, dtype=torch.float64, device=device) * 2, axis).to(dtype)
    return y.requires_grad_(requires_grad)


def close(actual, expected, **tol):
    """assert_close after casting both to float64 (NaN positions must agree)."""
    torch.testing.assert_close(actual.double(), expected.double(), equal_nan=True, **tol)


def grads(out, inputs, weight=None):
    """Gradients of (weight * out).sum() with respect to the inputs that require grad."""
    if weight is None:
        weight = torch.randn(out.shape, dtype=torch.float64, device=out.device)
    ins = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad((out.double() * weight).sum(), ins), weight


def magnitude_logits(dtype, device, V=9, scales=None):
    """Rows of logits around each magnitude in ``scales`` (default: up to 1e30 for float32, 1e300 for
    float64, both signs): all equal; spread by O(1), which at a large magnitude is less than one ulp of
    the max (the row rounds to a few values); a few ulps apart; huge and tiny mixed in one row. Plus an
    ordinary row. Built in float64 and rounded once to ``dtype``; no gradient."""
    if scales is None:
        top = 1e300 if dtype == torch.float64 else 1e30
        scales = [1.0, 1e4, 1e8, 1e17, top, -1e8, -top] if dtype == torch.float64 else [1.0, 1e4, 1e8, top, -top]
    eps = torch.finfo(dtype).eps
    rows = []
    for s in scales:
        base = torch.full((V,), s, dtype=torch.float64)
        rows.append(base)
        rows.append(base + torch.randn(V, dtype=torch.float64) * 3)
        rows.append(base * (1 + eps * torch.randint(0, 4, (V,), dtype=torch.float64)))
        mixed = torch.tensor([s, s, 1.0, -1.0, -s, 0.5, s / 2, 0.0, -2.0], dtype=torch.float64)
        spread = torch.randn(max(V - 9, 0), dtype=torch.float64) * 3
        rows.append(torch.cat([mixed, spread])[torch.randperm(max(V, 9))][:V])
    rows.append(torch.randn(V, dtype=torch.float64) * 3)
    return torch.stack(rows).to(device, dtype)


def ref_xent(x, labels=None, target=None, weight=None, smoothing=0.0, z=0.0, softcap=None, ignore_index=-100):
    """The per-row loss of kernels/row_math.py in float64 torch ops whose autograd is exact at any magnitude.

    log_softmax works relative to the row max. The z-loss's lse is m + log(sum(exp(x - m))) with m detached:
    torch.logsumexp's backward, exp(x - lse), loses the softmax beside a huge max. Class indices or
    (soft) ``labels``; rows whose index is ``ignore_index`` cost 0. Differentiable in ``x`` and ``labels``.
    """
    x = x.double()
    if softcap:
        x = torch.where(x == float("-inf"), x, softcap * torch.tanh(x / softcap))
    V = x.shape[-1]
    w = weight.double() if weight is not None else torch.ones(V, dtype=torch.float64, device=x.device)
    active = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
    if target is None:
        q = labels.double()
        if smoothing:
            q = q * (1 - smoothing) + smoothing / V
        q = q * w
    else:
        active = target != ignore_index
        t = torch.where(active, target, 0).long()
        q = (1 - smoothing) * torch.nn.functional.one_hot(t, V).double() * w[t][..., None] + smoothing / V * w
        q = q * active[..., None]
    lsm = torch.log_softmax(x, -1)
    lsm = torch.where((q == 0) & ~torch.isfinite(lsm), 0.0, lsm)  # a zero label never multiplies -inf
    loss = -(q * lsm).sum(-1)
    if z:
        m = x.detach().amax(-1, keepdim=True)
        m = torch.where(m == float("-inf"), 0.0, m)
        lse = (m + torch.log(torch.exp(x - m).sum(-1, keepdim=True))).squeeze(-1)
        loss = loss + z * lse * lse
    return torch.where(active, loss, 0.0)
