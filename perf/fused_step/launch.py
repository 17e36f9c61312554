"""Host side of the fused step (xent_step.py) for contiguous 2-D inputs: one launch that returns the
reduced loss and its dlogits, as ``loss = xent_triton.cross_entropy(x, target_or_probs, reduction=...)``
followed by ``torch.autograd.grad(loss, x)`` would (an unscaled loss: the gradient is for S = 1 with
"sum" and 1 / denominator with "mean", torch's denominators). No autograd, no class weights, no
z-loss or softcap: an experiment's launcher, not the package's route.

    from perf.fused_step.launch import StepTile, fused_step
    res = fused_step(x, target=t)                         # class indices, reduction="mean"
    res = fused_step(x, labels=probs, reduction="sum", tile=StepTile(4096, 16, 1, 4))
    res.loss, res.dlogits, res.row_loss
"""
from dataclasses import dataclass
from typing import Optional

import torch

from ..common import aligned_with, launch, row_kernel_args, slice_width

# The Triton interpreter has no SMs: a nominal count (as xent_triton.launch_config's) makes small
# problems loop several rows per persistent program.
INTERPRETER_SMS = 4


@dataclass(frozen=True)
class StepTile:
    block: int
    num_warps: int
    programs_per_sm: int = 2  # persistent programs per SM: few, so that programs x row bytes fit in L2
    stages: int = 3  # pipeline depth of both walks' loads (perf/NOTES.md P17); 1: none (as measured in P9)

    def label(self) -> str:
        return f"{self.block}/{self.num_warps} x{self.programs_per_sm}/SM s{self.stages}"


@dataclass
class StepResult:
    loss: torch.Tensor  # the reduced loss, fp32 (fp64 for fp64 logits)
    dlogits: torch.Tensor  # d loss / d logits, the logits' dtype and shape
    row_loss: torch.Tensor  # per-row losses before the reduction
    lse: torch.Tensor
    tile: StepTile
    programs: int


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def default_tile(n_cols: int, itemsize: int) -> StepTile:
    """The tile the package's step_launch chose without a measured row (until issue 22): 8 elements per
    thread (bf16 2048/8: 69-99 registers on sm_90 with 3 stages, so two programs fit an SM), two
    persistent programs per SM, 3 stages."""
    block = min(_next_pow2(max(n_cols, 1)), {1: 4096, 2: 2048, 4: 1024}.get(itemsize, 512))
    return StepTile(block, max(1, min(16, block // 256)), 2, 3)


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS


def fused_step(logits: torch.Tensor, target: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
               *, reduction: str = "mean", ignore_index: int = -100, label_smoothing: float = 0.0,
               tile: Optional[StepTile] = None) -> StepResult:
    """Loss and dlogits of a training step in one launch of xent_step_kernel.

    ``logits``: contiguous (N, V). Either ``target``: int64 class indices (N,) (``ignore_index`` rows cost
    nothing; ``label_smoothing`` as torch's), or ``labels``: contiguous probabilities (N, V).
    ``reduction``: "mean" (torch's: over the rows not ignored, for class indices) or "sum"."""
    from .xent_step import xent_step_kernel

    if (target is None) == (labels is None):
        raise ValueError("give exactly one of target (class indices) and labels (probabilities)")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    x = logits.detach()
    n, V = x.shape
    dev = x.device
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    tile = tile or default_tile(V, x.element_size())
    block = min(tile.block, _next_pow2(V))
    warps = max(1, min(tile.num_warps, block // 32))
    programs = max(1, min(n, tile.programs_per_sm * sm_count(dev)))

    if reduction == "sum":
        scale = torch.ones(1, dtype=acc, device=dev)
        denom = None
    elif target is not None:
        denom = (target != ignore_index).sum().to(acc)  # on the device: no host sync
        scale = (1.0 / denom).reshape(1)
    else:
        denom = torch.full((), float(n), dtype=acc, device=dev)
        scale = torch.full((1,), 1.0 / n, dtype=acc, device=dev)

    row_loss = torch.empty(n, dtype=acc, device=dev)
    lse = torch.empty(n, dtype=acc, device=dev)
    stats = torch.empty(n, 3, dtype=acc, device=dev)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if n:
        args = row_kernel_args(x, labels.detach() if labels is not None else None, target,
                               ignore_index=ignore_index, smoothing=label_smoothing)
        args.update(S=scale, WROTE=torch.ones(1, dtype=torch.int32, device=dev), LOSS=row_loss, LSE=lse,
                    STATS=stats, DX=dx, DX_ALIGNED=aligned_with(x, dx), BLOCK=block,
                    EPT=slice_width(block, warps, x.element_size()), STAGES=tile.stages)
        launch(xent_step_kernel, (programs,), args, num_warps=warps)
    loss = row_loss.sum() if denom is None else row_loss.sum() / denom
    return StepResult(loss, dx, row_loss, lse, StepTile(block, warps, tile.programs_per_sm, tile.stages), programs)
