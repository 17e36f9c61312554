"""float64 references and comparison helpers for the tests."""
import torch

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
