"""Over 2**31 elements (GPU only): 64-bit offsets, checked on rows at both ends."""
import pytest
import torch
import torch.nn.functional as F

import xent_triton
from helpers import close

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
    reason="needs a CUDA GPU with 40 GiB")


def test_more_than_2_31_elements():
    N, V = 16384, 152064  # 2.49e9 elements, 4.6 GiB in bf16
    assert N * V > 2**31
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    x = (torch.randn(N, V, device=dev, dtype=torch.bfloat16, generator=gen) * 2).requires_grad_()
    t = torch.randint(0, V, (N,), device=dev, generator=gen)
    loss = xent_triton.cross_entropy(x, t, reduction="none")
    (g,) = torch.autograd.grad(loss.sum(), x)
    rows = torch.tensor([0, 1, N // 2, N - 2, N - 1], device=dev)  # the last rows sit past 2**31
    x64 = x.detach()[rows].double().requires_grad_()
    ref = F.cross_entropy(x64, t[rows], reduction="none")
    (r,) = torch.autograd.grad(ref.sum(), x64)
    close(loss[rows], ref, rtol=1e-2, atol=1e-2)
    close(g[rows], r, rtol=1e-2, atol=1e-2)
    del g
    y = torch.softmax(x.detach()[:2].float(), -1).to(torch.bfloat16).expand(N // 2, 2, V).reshape(N, V)
    soft = xent_triton.softmax_cross_entropy_with_logits(y, x.detach())
    ys = y[rows].double()
    close(soft[rows], -(ys * torch.log_softmax(x.detach()[rows].double(), -1)).sum(-1), rtol=1e-2, atol=1e-2)
