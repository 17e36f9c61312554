"""Vocabulary-parallel softmax cross entropy over ``torch.distributed``.

Each rank of a process group holds a contiguous shard of the class axis: rank
``r`` owns classes ``[offset_r, offset_r + V_r)``, with ranks in shard order and
shards of any (non-zero) size. Every rank gets the loss of the whole
vocabulary, as one process would compute it on the concatenated tensors, and
gradients flow to each rank's own shard only.

How it works, per forward:

1. The local kernel (``xent_triton::forward`` with ``class_offset`` and
   ``n_classes``) computes each row's shard statistics: ``loss_k`` (the cross
   entropy as if the shard were the whole vocabulary), the shard's max ``m_k``
   and ``log_s_k`` (its log-sum-exp is ``m_k + log_s_k``), and ``qsum_k`` (the
   shard's label mass).
2. ONE collective: an all_gather of the packed ``(N, 4)`` fp32 buffer, each row
   ``[loss_k, m_k, log_s_k, qsum_k]`` (fp64 for fp64 inputs).
3. Every rank combines them the same way::

       m     = max_k m_k                                  (over shards with a finite logit)
       log_s = log sum_k exp((m_k - m) + log_s_k)
       Q     = sum_k qsum_k
       loss  = sum_k [loss_k + ((m - m_k) + (log_s - log_s_k)) * qsum_k]   (term dropped where qsum_k == 0)

   which avoids the cancellation of ``lse * Q - sum_k dot_k``, and keeps the row max and
   ``log_s`` apart, as one process does (layout.stats_shape).

The backward needs no communication: ``xent_triton::backward`` computes each
shard's ``dlogits = g * (softmax * Q - q)`` and ``dlabels = g * (lse - x)`` from
the global ``m``, ``log_s`` and ``Q`` saved by the forward.

Shard offsets are needed before the local kernel (class indices are global).
The first call per (process group, local shard size) exchanges the local
sizes, the row count and the dtypes with one small all_gather and caches the
sizes; every later forward does exactly one collective. All ranks must miss
that cache together: if you re-shard so that some rank keeps its local size
while another's changes, call :func:`reset_shard_cache` on every rank first.
"""
from typing import Dict, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops
from . import validation as v
from .dtypes import acc_dtype, tf_result_dtype, torch_result_dtype
from .function import mean_denominator, reduce
from .layout import batch_shape

__all__ = ["softmax_cross_entropy_with_logits", "cross_entropy", "reset_shard_cache"]

# (process group, local class count) -> class count of every rank, in rank order.
_SIZES: Dict[Tuple[object, int], Tuple[int, ...]] = {}

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def reset_shard_cache() -> None:
    """Forget the cached shard sizes of every group (call it on every rank, or on none)."""
    _SIZES.clear()


def _group_and_rank(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("xent_triton.distributed needs an initialized torch.distributed process group "
                           "(call torch.distributed.init_process_group first)")
    if group is None:
        group = dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the process group passed as group")
    return group, rank, dist.get_world_size(group)


def _backend_is_gloo(group, device: torch.device) -> bool:
    name = str(dist.get_backend(group)).lower()
    if ":" in name:  # a multi-device group, e.g. "cpu:gloo,cuda:nccl"
        per_device = dict(part.split(":", 1) for part in name.split(","))
        name = per_device.get(device.type, "")
    return name == "gloo"


def _all_gather(flat: Tensor, world: int, group) -> Tensor:
    """(world, numel) gather of a 1-D tensor: exactly one collective call."""
    out = flat.new_empty((world, flat.numel()))
    if _backend_is_gloo(group, flat.device):
        # Gloo's all_gather handles CPU and CUDA tensors (CUDA through its own
        # host staging), in every torch version; its all_gather_into_tensor is a
        # chunk + all_gather anyway.
        dist.all_gather(list(out.unbind(0)), flat, group=group)
    else:
        gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather_single(out.view(-1), flat, group=group)
    return out


def _shard_layout(group, rank: int, world: int, local_classes: int, n_rows: int, logits_dtype: torch.dtype,
                  stat_dtype: torch.dtype, device: torch.device) -> Tuple[int, int]:
    """(class_offset, n_classes) of this rank's shard; cached per (group, local_classes).

    A cache miss costs one all_gather of 4 int64 per rank, which also checks
    that every rank has the same row count and dtypes and owns at least one
    class; such errors are raised on every rank alike.
    """
    key = (group, int(local_classes))
    sizes = _SIZES.get(key)
    if sizes is None:
        mine = torch.tensor([local_classes, n_rows, _DTYPE_CODES[logits_dtype], _DTYPE_CODES[stat_dtype]],
                            dtype=torch.int64, device=device)
        table = _all_gather(mine, world, group).tolist()
        names = {c: d for d, c in _DTYPE_CODES.items()}
        desc = ", ".join(f"rank {r}: {vr} classes, {nr} rows, {names[dl]} logits (stats {names[ds]})"
                         for r, (vr, nr, dl, ds) in enumerate(table))
        if len({row[1] for row in table}) > 1:
            raise ValueError(f"xent_triton.distributed: every rank must pass the same rows (batch shape); got {desc}")
        if len({(row[2], row[3]) for row in table}) > 1:
            raise TypeError(f"xent_triton.distributed: every rank must pass logits (and labels) of the same dtypes; "
                            f"got {desc}")
        if any(row[0] < 1 for row in table):
            raise ValueError(f"xent_triton.distributed: every rank must own at least one class; got {desc}")
        sizes = tuple(row[0] for row in table)
        _SIZES[key] = sizes
    return sum(sizes[:rank]), sum(sizes)


def _combine(gathered: Tensor) -> Tuple[Tensor, Tensor]:
    """Global (loss, stats) per row from the gathered (world, N, 4) shard losses and statistics."""
    loss_k, m_k, log_s_k, q_k = gathered.unbind(2)
    finite = log_s_k != float("-inf")  # the shard has a finite logit in the row (its m_k is then its max)
    m = torch.where(finite, m_k, float("-inf")).amax(dim=0)
    m = torch.where(m == float("-inf"), 0.0, m)  # no finite logit in any shard: -inf replaced by 0, as a kernel
    # exp((m_k - m) + log_s_k): at most exp(log V_k) for the shard of the max, 0 for a shard without softmax.
    log_s = torch.exp((m_k - m) + log_s_k).sum(dim=0).log()  # -inf only where every shard is -inf
    q = q_k.sum(dim=0)
    has_mass = q_k != 0
    shifted = loss_k + torch.where(has_mass, ((m - m_k) + (log_s - log_s_k)) * q_k, 0.0)
    # Label mass on a shard whose logits are all -inf in that row: its kernel
    # loss is -inf - -inf = NaN, while one process sees sum q * (lse - -inf),
    # i.e. +inf (for non-negative q) when some other shard has a finite logit.
    lost = has_mass & ~finite & (log_s != float("-inf"))
    shifted = torch.where(lost, q_k * float("inf"), shifted)
    return shifted.sum(dim=0), torch.stack((m, log_s, q), dim=1)


class _VocabParallelXent(torch.autograd.Function):
    """Per-row loss (accumulation dtype) of a vocabulary-sharded cross entropy.

    ``forward(logits, labels, target, axis, ignore_index, label_smoothing, class_offset, n_classes, world, group)``:
    exactly one of ``labels`` (soft, the logits' shape) / ``target`` (global class
    indices) is given. Inputs are assumed validated.
    """

    @staticmethod
    def forward(ctx, logits, labels, target, axis, ignore_index, label_smoothing, class_offset, n_classes, world,
                group):
        loss_k, lse_k, stats_k = ops.forward(
            logits, labels, target, None, axis, ignore_index, label_smoothing, 0.0, 0.0, True, class_offset, n_classes)
        acc = stats_k.dtype
        shape = lse_k.shape
        n = lse_k.numel()
        if n:
            packed = torch.cat([loss_k.reshape(n, 1).to(acc), stats_k], dim=1).reshape(-1)
            loss, stats = _combine(_all_gather(packed, world, group).view(world, n, 4))
        else:  # the row count is the same on every rank: they all skip the collective
            loss, stats = loss_k.to(acc).reshape(0), stats_k
        if target is not None:
            active = (target != ignore_index).reshape(n)
            loss = torch.where(active, loss, 0.0)
            stats = torch.where(active[:, None], stats, 0.0)  # as the single-process op reports them
        ctx.save_for_backward(logits, labels, target, stats)
        ctx.params = (axis, ignore_index, label_smoothing, class_offset, n_classes)
        return loss.view(shape)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError("xent_triton.distributed: double backward (create_graph=True through the loss) is "
                               "not supported")
        logits, labels, target, stats = ctx.saved_tensors
        need_dx, need_dy = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dx or need_dy):
            return (None,) * 10
        axis, ignore_index, label_smoothing, class_offset, n_classes = ctx.params
        dlogits, dlabels = ops.backward(
            grad, logits, labels, target, None, stats, axis, ignore_index, label_smoothing, 0.0, 0.0,
            need_dx, need_dy, class_offset, n_classes)
        return (dlogits if need_dx else None, dlabels if need_dy else None) + (None,) * 8


def _per_row(logits, labels, target, axis, ignore_index, label_smoothing, group):
    group, rank, world = _group_and_rank(group)
    stat_dtype = acc_dtype(logits.dtype, labels.dtype if labels is not None else logits.dtype)
    n_rows = 1
    for s in batch_shape(logits.shape, axis):
        n_rows *= s
    offset, n_classes = _shard_layout(group, rank, world, logits.shape[axis], n_rows, logits.dtype, stat_dtype,
                                      logits.device)
    return _VocabParallelXent.apply(logits, labels, target, axis, int(ignore_index), float(label_smoothing),
                                    offset, n_classes, world, group)


def softmax_cross_entropy_with_logits(labels: Tensor, logits: Tensor, group=None) -> Tensor:
    r"""Vocabulary-parallel ``tf.nn.softmax_cross_entropy_with_logits``: the per-row loss.

    Args:
        labels (Tensor): this rank's shard of the soft labels: floating, the logits'
            shape (or broadcastable to it along non-class axes). Labels get a
            gradient (for this shard) when they require one.
        logits (Tensor): this rank's shard of the logits, ``(..., V_local)``, class
            axis last. Shards may differ in size; rank ``r`` of ``group`` holds the
            ``r``-th contiguous block of classes (at least one class each).
        group (ProcessGroup, optional): the group that shares the vocabulary
            (default: the world group).

    Returns:
        The per-row loss over the whole vocabulary, of shape ``logits.shape[:-1]``,
        identical on every rank, in the logits' dtype (float32 under autocast),
        accumulated in float32 (float64 for float64 inputs).
    """
    v.check_logits(logits)
    axis = logits.dim() - 1
    v.check_soft_labels(labels, logits, axis)
    v.check_same_device(labels=labels, logits=logits)
    out_dtype = tf_result_dtype(logits.dtype, torch.is_autocast_enabled(logits.device.type))
    return _per_row(logits, labels, None, axis, -100, 0.0, group).to(out_dtype)


def cross_entropy(input: Tensor, target: Tensor, group=None, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> Tensor:
    r"""Vocabulary-parallel :func:`torch.nn.functional.cross_entropy`.

    Args:
        input (Tensor): this rank's shard of the logits, laid out as torch's
            ``input``: ``(C_local,)``, ``(N, C_local)`` or ``(N, C_local, d1, ...)``
            (class axis 1, or 0 for 1-D). For ``(B, T, V)`` language-model logits
            pass ``logits.view(-1, V_local)``.
        target (Tensor): int64/int32 GLOBAL class indices (the same tensor on every
            rank), of the input's shape without the class axis; or this rank's shard
            of class probabilities (the input's shape).
        group (ProcessGroup, optional): the group that shares the vocabulary.
        ignore_index, reduction, label_smoothing: as in torch (``ignore_index``
            applies to class indices only; ``label_smoothing`` spreads over all
            classes of all shards).

    Returns:
        The loss, identical on every rank, in torch's dtype: the input's, promoted
        with probabilities' (float32 under autocast). ``mean`` divides by the number of non-ignored rows, computed
        locally from ``target`` (no collective).
    """
    v.check_options(reduction, label_smoothing, None, ignore_index)
    ignore_index = int(ignore_index)
    axis, hard = v.check_cross_entropy_target(input, target, ignore_index)
    v.check_same_device(input=input, target=target)
    labels = None if hard else target
    out_dtype = torch_result_dtype(input.dtype, None if labels is None else labels.dtype, None,
                                   torch.is_autocast_enabled(input.device.type))
    loss = _per_row(input, labels, target if hard else None, axis, ignore_index, label_smoothing, group)
    denom = mean_denominator(loss.numel(), target if hard else None, ignore_index, None) \
        if reduction == "mean" else None
    return reduce(loss, reduction, denom, out_dtype)
