"""Every dtype rule of the package: what is accepted, what accumulates, what comes back."""
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)


def acc_dtype(*dtypes) -> torch.dtype:
    """The accumulation dtype: float32, float64 when any input is float64. Also the dtype of the
    row statistics and of the lse."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def row_loss_dtype(logits: torch.dtype, labels: Optional[torch.dtype], wide: bool) -> torch.dtype:
    """The dtype the kernels store the per-row loss in: the logits', or the accumulation dtype when
    the loss is reduced or cast afterwards (``wide``), so that it is rounded once."""
    return acc_dtype(logits, labels or logits) if wide else logits


def wide_row_loss(input: torch.dtype, out_dtype: torch.dtype, reduction: str, autocast: bool) -> bool:
    """Whether ``cross_entropy``'s per-row loss is kept in the accumulation dtype: reductions sum it there
    and round once; so does a result wider than the input, and autocast's float32."""
    return autocast or reduction != "none" or out_dtype != input


def dlabels_dtype(logits, labels) -> torch.dtype:
    """The dtype dlabels is written in: the labels', or the accumulation dtype for labels read with stride
    0 (broadcast), whose gradient is summed over those axes and rounded once, after the sum."""
    if tuple(labels.shape) != tuple(logits.shape):
        return acc_dtype(logits.dtype, labels.dtype)
    return labels.dtype


def torch_result_dtype(logits: torch.dtype, labels: Optional[torch.dtype], weight: Optional[torch.dtype],
                       autocast: bool) -> torch.dtype:
    """The dtype torch's ``cross_entropy`` returns: the logits' (float32 under autocast, which leaves
    float64 alone), promoted with probability targets' (``labels``) and, with them, the class weights'."""
    dtype = logits
    if autocast and dtype != torch.float64:
        dtype = torch.float32
    if labels is not None:
        dtype = torch.promote_types(dtype, labels)
        if weight is not None:
            dtype = torch.promote_types(dtype, weight)
    return dtype


def tf_result_dtype(logits: torch.dtype, autocast: bool) -> torch.dtype:
    """The dtype ``softmax_cross_entropy_with_logits`` returns: the logits' (float32 under autocast,
    as TF's mixed precision; float64 stays)."""
    return acc_dtype(logits) if autocast else logits


def linear_compute_dtype(input, linear_weight, linear_bias) -> torch.dtype:
    """The dtype ``F.linear`` computes in: autocast's when it is on (float64 is never cast), else the
    inputs' one dtype."""
    dev = input.device.type
    tensors = [t for t in (input, linear_weight, linear_bias) if t is not None]
    if torch.is_autocast_enabled(dev) and all(t.dtype != torch.float64 for t in tensors):
        return torch.get_autocast_dtype(dev)
    if any(t.dtype != input.dtype for t in tensors):
        desc = ", ".join(f"{n} {t.dtype}" for n, t in
                         (("input", input), ("linear_weight", linear_weight), ("linear_bias", linear_bias))
                         if t is not None)
        raise TypeError(f"input, linear_weight and linear_bias must have one dtype (as for F.linear), got {desc}")
    return input.dtype
