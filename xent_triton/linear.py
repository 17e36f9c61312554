"""A linear layer and the cross entropy of its output, in row chunks.

An LLM's last layer makes (rows, classes) logits: 8192 x 128256 in bf16 is 2 GiB,
and the unfused step keeps both them and their gradient alive. Here the rows are
taken ``chunk`` at a time: the chunk's logits (one matmul), the loss kernels, and,
when gradients are needed, dlogits written over those logits by the in-place
backward kernel and folded into the input, weight and bias gradients (three more
matmuls). Only one chunk's logits exist at a time.

A reduced loss (``mean``, ``sum``) gives every row the same upstream gradient up
to one scalar, so the forward computes the gradients for a gradient of 1 and the
backward only scales them (as Liger and torch's chunked ``linear_cross_entropy``
do). With ``reduction='none'`` each row has its own gradient: the forward keeps
O(rows) statistics and the backward recomputes each chunk's logits.
"""
import torch
import torch.nn.functional as F

from . import ops
from .dtypes import acc_dtype, linear_compute_dtype, torch_result_dtype
from .function import divide, mean_denominator
from .layout import stats_shape

_HALF = (torch.float16, torch.bfloat16)


# Rows per chunk, at least (see default_chunk_rows).
MIN_CHUNK_ROWS = 1024


def default_chunk_rows(n_rows: int, n_classes: int, in_features: int) -> int:
    """Rows per chunk: ``next_pow2(ceil(rows / ceil(classes / in_features)))`` (a chunk's logits take
    about the input's memory: Liger's and torch's rule), but at least MIN_CHUNK_ROWS.

    Why the floor: every chunk adds its (classes, in_features) weight-gradient product into the
    sum, moving 8 bytes per element (fp32, read and written), while its matmuls do 6 * rows *
    classes * in_features flops. On an H100 (~240 bf16 flop per byte of bandwidth) the sum then
    costs ~320 / rows of the matmul time: 31% at 1024 rows, but 125% at the 256 rows Liger's rule
    gives for 8192 x 128256 x 4096. A 1024-row chunk of 128256 bf16 logits is 256 MiB.
    """
    if n_rows <= 1:
        return 1
    per = -(-n_rows // max(1, -(-n_classes // max(1, in_features))))
    return min(n_rows, max(MIN_CHUNK_ROWS, 1 << (per - 1).bit_length()))


def row_grad_scale(denom, dtype, device):
    """The gradient each row gets when the reduced loss is backpropagated with gradient 1: 1 for
    ``sum`` (``denom`` None), 1/denominator for ``mean``, by the same division as the loss's."""
    one = torch.ones((), dtype=dtype, device=device)
    return one if denom is None else divide(one, denom)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """``loss = LinearCrossEntropyFunction.apply(input, linear_weight, linear_bias, target, weight, params)``.

    ``input`` is (rows, in_features), ``linear_weight`` (classes, in_features), ``target`` class indices
    (rows,) or probabilities (rows, classes) that need no gradient. ``params`` is (ignore_index,
    reduction, label_smoothing, lse_square_scale, softcap, chunk, accum_dtype, grad_enabled), the last
    being ``torch.is_grad_enabled()`` at the call (inside ``forward`` grad mode is always off). Inputs
    are assumed validated (see :func:`xent_triton.linear_cross_entropy`). Returns the reduced loss, or
    the per-row loss for ``reduction='none'``, in torch's dtype for the unfused loss.
    """

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, params):
        ignore_index, reduction, smoothing, z_scale, softcap, chunk, accum_dtype, grad_enabled = params
        autocast = torch.is_autocast_enabled(input.device.type)
        cd = linear_compute_dtype(input, linear_weight, linear_bias)
        need = tuple(grad_enabled and req for req in ctx.needs_input_grad[:3])
        hard = not target.dtype.is_floating_point
        n = input.shape[0]
        loss_dtype = acc_dtype(cd, cd if hard else target.dtype)
        out_dtype = torch_result_dtype(cd, None if hard else target.dtype, None if weight is None else weight.dtype,
                                       autocast)
        with torch.autocast(input.device.type, enabled=False):
            x, w, b = (t.to(cd) if t is not None else None for t in (input, linear_weight, linear_bias))
            chunk_loss = _ChunkLoss(target, weight, ignore_index, smoothing, z_scale, softcap, hard)
            denom = mean_denominator(n, target if hard else None, ignore_index, weight) \
                if reduction == "mean" else None
            # Reduced losses: gradients now, for upstream gradient 1; 'none': statistics for the backward.
            eager = any(need) and reduction != "none"
            if eager:
                scale = row_grad_scale(denom, loss_dtype, input.device)
                grads = _GradSums(x, w, b, need, accum_dtype)
            loss = torch.empty(n, dtype=loss_dtype, device=input.device)
            stats = None
            if any(need) and not eager:
                stats = torch.empty(stats_shape(n), dtype=loss_dtype, device=input.device)
            for r in _chunks(n, chunk):
                logits = F.linear(x[r], w, b)
                loss[r], _lse, stats_r = chunk_loss.forward(logits, r)
                if eager:
                    chunk_loss.backward_into(logits, r, scale.expand(logits.shape[0]), stats_r)
                    grads.fold(logits, x[r], w, r)
                elif stats is not None:
                    stats[r] = stats_r
                # Let the chunk go before the next one is made: one chunk of logits alive, not two.
                del logits
            if reduction == "sum":
                out = loss.sum()
            elif reduction == "mean":
                out = divide(loss.sum(), denom)
            else:
                out = loss
            out = out.to(out_dtype)
        ctx.eager = eager
        ctx.params = params
        ctx.dtypes = (input.dtype, linear_weight.dtype, linear_bias.dtype if linear_bias is not None else None)
        if eager:
            ctx.grads = grads
        elif any(need):
            ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, stats)
            ctx.cd = cd
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError("xent_triton: double backward through linear_cross_entropy is not supported")
        if ctx.eager:
            grads, ctx.grads = ctx.grads, None
            if grads is None:
                raise RuntimeError("linear_cross_entropy: its gradients were handed out by an earlier backward "
                                   "(retain_graph=True is not supported for reduction='mean' or 'sum')")
            result = grads.scaled(grad_out, ctx.dtypes)
        else:
            result = _recompute_grads(ctx, grad_out)
        return result + (None, None, None)


def _chunks(n, chunk):
    return (slice(r0, min(r0 + chunk, n)) for r0 in range(0, n, chunk))


class _ChunkLoss:
    """The loss kernels on one chunk's (rows, classes) logits, through ``ops`` (see prepare.direct)."""

    def __init__(self, target, weight, ignore_index, smoothing, z_scale, softcap, hard):
        self.target, self.weight, self.hard = target, weight, hard
        self.opts = (int(ignore_index), float(smoothing), float(z_scale), float(softcap or 0.0))

    def _rows(self, r):
        t = self.target[r]
        return (None, t) if self.hard else (t, None)

    def forward(self, logits, r):
        labels, t = self._rows(r)
        return ops.forward(logits, labels, t, self.weight, 1, *self.opts, True)

    def backward_into(self, logits, r, g, stats):
        """dlogits for upstream gradients ``g``, written over ``logits``; ``stats``: the chunk's statistics."""
        labels, t = self._rows(r)
        ops.backward_inplace(g, logits, labels, t, self.weight, stats, 1, *self.opts)


class _GradSums:
    """The input, weight and bias gradients, summed over chunks (None where not needed).

    The input gradient of a chunk's rows is written once. The weight and bias gradients
    are sums over all chunks: for half-precision weights the weight gradient accumulates in
    ``accum_dtype`` (float32 by default), so that it is rounded once, as the unfused matmul's.
    """

    def __init__(self, x, w, b, need, accum_dtype):
        need_x, need_w, need_b = need
        acc = accum_dtype or (torch.float32 if w.dtype in _HALF else w.dtype)
        self.dx = torch.empty_like(x) if need_x else None
        self.dw = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
        # The bias gradient is C numbers: always summed in fp32 (fp64 for fp64 weights).
        self.db = torch.zeros(w.shape[0], dtype=acc_dtype(w.dtype), device=w.device) \
            if need_b and b is not None else None

    def fold(self, dlogits, x, w, r):
        if self.dx is not None:
            torch.mm(dlogits, w, out=self.dx[r])
        if self.dw is not None:
            _accumulate_mm(self.dw, dlogits.t(), x)
        if self.db is not None:
            self.db += dlogits.sum(0, dtype=self.db.dtype)

    def scaled(self, g, dtypes):
        """The gradients times the upstream gradient ``g`` (None: 1), in the inputs' dtypes; consumes them."""
        out = []
        for t, dtype in zip((self.dx, self.dw, self.db), dtypes):
            if t is not None and g is not None:
                t.mul_(g)
            out.append(None if t is None else t.to(dtype))
        self.dx = self.dw = self.db = None
        return tuple(out)


# Whether torch.addmm(..., out_dtype=) works here (CUDA, torch >= 2.8); cleared on its first failure.
_MIXED_ADDMM = {"ok": True}


def _accumulate_mm(acc, a, b):
    """``acc += a @ b``, where ``acc`` has the dtype of ``a`` and ``b`` or is fp32 for half ones
    (linear_cross_entropy checks ``accum_dtype``). In the fp32 case cuBLAS sums the product into
    ``acc`` from its fp32 accumulator (``out_dtype``); where that is missing (the CPU; some torch
    versions refuse an fp32 addend) the product is rounded to the half dtype once and added."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _MIXED_ADDMM["ok"]:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError, NotImplementedError):
            _MIXED_ADDMM["ok"] = False  # the op's argument checks refused it: they run before any write
    acc += a @ b


def _recompute_grads(ctx, grad_out):
    """reduction='none': recompute each chunk's logits and fold its dlogits for the rows' own gradients."""
    input, linear_weight, linear_bias, target, weight, stats = ctx.saved_tensors
    ignore_index, _reduction, smoothing, z_scale, softcap, chunk, accum_dtype, _ = ctx.params
    need = tuple(ctx.needs_input_grad[:3])
    hard = not target.dtype.is_floating_point
    with torch.autocast(input.device.type, enabled=False):
        x, w, b = (t.to(ctx.cd) if t is not None else None for t in (input, linear_weight, linear_bias))
        chunk_loss = _ChunkLoss(target, weight, ignore_index, smoothing, z_scale, softcap, hard)
        grads = _GradSums(x, w, b, need, accum_dtype)
        g = grad_out.reshape(-1)
        for r in _chunks(x.shape[0], chunk):
            logits = F.linear(x[r], w, b)
            chunk_loss.backward_into(logits, r, g[r], stats[r])
            grads.fold(logits, x[r], w, r)
            del logits
        return grads.scaled(None, ctx.dtypes)
