"""torch's loss reductions over per-row losses, without host syncs."""
import torch


def mean_denominator(n_rows, target, ignore_index, weight):
    """torch's ``mean`` divisor: the sum of ``weight[target]`` over non-ignored rows for class
    indices (their count without weights), a device tensor computed without a host sync; the
    number of rows (an int) for probabilities."""
    if target is None:
        return n_rows
    active = target != ignore_index
    if weight is None:
        return active.sum()
    # Clamp only to gather safely; out-of-range rows are already NaN.
    C = weight.shape[0]
    w_t = weight.gather(0, target.long().clamp(0, C - 1).reshape(-1)).view(target.shape)
    return (w_t * active).sum()


def divide(total, denom, out_dtype=None):
    """``total / denom`` in ``total``'s dtype, as if ``denom`` were cast first, then rounded to ``out_dtype``.

    Both are 0-dim, so type promotion already gives total's dtype for an integer count or a narrower
    weight sum (one op, the same value); only a wider one (float64 weights with a float32 loss) is cast.
    Outside autograd the rounding to ``out_dtype`` is the division's own store (one kernel, not two).
    """
    if isinstance(denom, torch.Tensor) and denom.is_floating_point() and denom.dtype.itemsize > total.dtype.itemsize:
        denom = denom.to(total.dtype)
    if out_dtype is None or out_dtype == total.dtype:
        return total / denom
    if total.requires_grad and torch.is_grad_enabled():
        return (total / denom).to(out_dtype)
    return torch.div(total, denom, out=torch.empty((), dtype=out_dtype, device=total.device))


def row_grad_scale(denom, dtype, device):
    """The gradient each row gets when the reduced loss is backpropagated with gradient 1: 1 for
    ``sum`` (``denom`` None), 1/denominator for ``mean``, by the same division as reduce_rows, so
    that the two compare equal."""
    one = torch.ones((), dtype=dtype, device=device)
    return one if denom is None else divide(one, denom)


def reduce_rows(loss, reduction, target=None, ignore_index=-100, weight=None, denom=None, out_dtype=None):
    """torch's reductions of a per-row loss (see mean_denominator), rounded to ``out_dtype`` (default: the
    loss's)."""
    if reduction == "none":
        return loss if out_dtype is None else loss.to(out_dtype)
    if reduction == "sum":
        total = loss.sum()
        return total if out_dtype is None else total.to(out_dtype)
    if denom is None:
        denom = mean_denominator(loss.numel(), target, ignore_index, weight)
    return divide(loss.sum(), denom, out_dtype)
