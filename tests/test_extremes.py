"""Extreme values: each rule here is documented in the README ("NaN and inf rules")."""
import math

import pytest
import torch
import torch.nn.functional as F

import xent_triton
from helpers import close, rand_logits, rand_probs, ref_soft, set_config
from xent_triton import softmax_cross_entropy_with_logits as sce

pytestmark = pytest.mark.usefixtures("row_kernels")


def test_fp16_near_max(backend, device):
    x = torch.tensor([[65504.0, 65000.0, -65504.0, 0.0], [-65504.0, -65504.0, -65000.0, 60000.0]],
                     dtype=torch.float16, device=device, requires_grad=True)
    # The fp16 loss stays finite only while 2*y[0,2] + y[0,3] < 1 and y[1,3] > 0.48 (the true values,
    # 504*y1 + 131008*y2 + 65504*y3 for row 0, must stay below 65504): random labels near fixed ones.
    base = torch.tensor([[0.5, 0.3, 0.05, 0.15], [0.1, 0.1, 0.1, 0.7]], dtype=torch.float64)
    y = (0.9 * base + 0.1 * rand_probs((2, 4), torch.float64, "cpu")).to(device, torch.float16)
    out = sce(y, x)
    assert torch.isfinite(out).all()
    close(out, ref_soft(y, x.detach()), rtol=1e-2, atol=1e-2)
    (g,) = torch.autograd.grad(out.sum(), x)
    ref = torch.softmax(x.detach().double(), -1) * y.double().sum(-1, keepdim=True) - y.double()
    close(g, ref, rtol=1e-2, atol=1e-2)


def test_huge_fp32_logits(backend, device):
    """1e30 logits: computed relative to the row max, so no cancellation."""
    x = torch.randn(3, 100, device=device, dtype=torch.float64) * 1e30
    x[:, 5] = x.max(1).values - 1.0
    x = x.float().requires_grad_()
    t = torch.full((3,), 5, device=device)
    out = xent_triton.cross_entropy(x, t, reduction="none")
    close(out, F.cross_entropy(x.detach().double(), t, reduction="none"), rtol=1e-5, atol=1e-5)
    y = rand_probs((3, 100), torch.float32, device)
    close(sce(y, x), ref_soft(y, x.detach()), rtol=1e-5, atol=0)


def test_fully_masked_rows(backend, device):
    """All -inf: no label mass -> loss 0, gradient 0; label mass -> NaN loss, gradient -labels."""
    x = rand_logits((3, 10), torch.float32, device, requires_grad=False)
    x[0] = float("-inf")
    x[1] = float("-inf")
    x.requires_grad_()
    y = rand_probs((3, 10), torch.float32, device)
    y[0] = 0
    out = sce(y, x)
    assert out[0].item() == 0.0 and math.isnan(out[1].item()) and math.isfinite(out[2].item())
    (g,) = torch.autograd.grad(out.sum(), x)
    assert (g[0] == 0).all()
    close(g[1], -y[1], rtol=0, atol=0)
    # Hard labels: a masked target row is NaN, an ignored one costs nothing.
    t = torch.tensor([-100, 3, 2], device=device)
    loss = xent_triton.cross_entropy(x, t, reduction="none")
    assert loss[0].item() == 0.0 and math.isnan(loss[1].item()) and math.isfinite(loss[2].item())


def test_single_class(backend, device):
    x = rand_logits((5, 1), torch.float32, device)
    y = torch.rand(5, 1, device=device) + 0.5
    out = sce(y, x)
    assert (out == 0).all()
    (g,) = torch.autograd.grad(out.sum(), x)
    assert (g == 0).all()
    t = torch.zeros(5, dtype=torch.int64, device=device)
    assert (xent_triton.cross_entropy(x, t, reduction="none") == 0).all()


def test_positive_inf_logit_gives_nan_row(backend, device):
    x = rand_logits((3, 8), torch.float32, device, requires_grad=False)
    x[1, 2] = float("inf")
    y = rand_probs((3, 8), torch.float32, device)
    out = sce(y, x)
    assert math.isnan(out[1].item()) and torch.isfinite(out[[0, 2]]).all()
    # With a softcap, +inf is capped to the cap and the row is finite.
    t = torch.tensor([0, 2, 1], device=device)
    capped = xent_triton.cross_entropy(x, t, softcap=10.0, reduction="none")
    assert torch.isfinite(capped).all()
    close(capped[1], F.cross_entropy((10 * torch.tanh(x.double() / 10))[1:2], t[1:2], reduction="none")[0],
          rtol=1e-5, atol=1e-5)


def test_label_mass_on_masked_logits(backend, device):
    x = rand_logits((2, 6), torch.float32, device, requires_grad=False)
    x[:, 0] = float("-inf")
    y = rand_probs((2, 6), torch.float32, device)
    y[1, 0] = 0
    out = sce(y, x)
    assert out[0].item() == math.inf and math.isfinite(out[1].item())
    t = torch.tensor([0, 1], device=device)
    hard = xent_triton.cross_entropy(x, t, reduction="none")
    assert hard[0].item() == math.inf and math.isfinite(hard[1].item())


def test_dlabels_rules(backend, device):
    """dlabels = g * (lse - x) per the README's table: +inf at a -inf logit, NaN on a row whose logits are all
    -inf (there is no lse: with or without label mass), finite on a row with a NaN label (lse does not
    depend on the labels, while its loss and dlogits are NaN); other rows exact."""
    inf, nan = float("inf"), float("nan")
    x = rand_logits((5, 6), torch.float32, device, requires_grad=False)
    y = rand_probs((5, 6), torch.float32, device)
    x[0, 2] = -inf
    y[0, 2] = 0.0  # a masked logit without label mass
    x[1] = -inf
    y[1] = 0.0  # all -inf, no label mass
    x[2] = -inf  # all -inf, label mass
    y[3, 4] = nan
    x.requires_grad_()
    y.requires_grad_()
    out = sce(y, x)
    dx, dy = torch.autograd.grad(out.sum(), (x, y))
    assert dy[0, 2].item() == inf and out[1].item() == 0.0 and (dx[1] == 0).all()
    assert dy[1].isnan().all() and dy[2].isnan().all() and torch.isfinite(dy[3]).all()
    assert out[3].isnan() and dx[3].isnan().all()
    xr = x.detach().double().requires_grad_()
    (dyr,) = torch.autograd.grad(ref_soft(y.detach()[[0, 3, 4]], xr[[0, 3, 4]]).sum(), xr)
    lse = torch.logsumexp(x.detach().double(), -1, keepdim=True)
    close(dy[[0, 3, 4]], (lse - x.detach().double())[[0, 3, 4]], rtol=1e-5, atol=1e-5)
    close(dx[[0, 4]], dyr[[0, 4]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", ["logits", "labels"])
def test_nan_inputs(backend, device, where):
    x = rand_logits((4, 300), torch.bfloat16, device, requires_grad=False)
    y = rand_probs((4, 300), torch.bfloat16, device)
    (x if where == "logits" else y)[3, 299] = float("nan")
    out = sce(y, x)
    assert math.isnan(out[3].item()) and torch.isfinite(out[:3]).all()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("V", [64, 300])
def test_nan_logit_with_class_indices(backend, device, V, smoothing):
    """A NaN logit makes its row's loss NaN and leaves the other rows exact, with label smoothing too (whose
    kernels zero the target mass of a NaN lane: kernels/row_math.tie_to_logits), in row tiles and per row."""
    x = rand_logits((40, V), torch.float32, device, requires_grad=False)
    x[3, 7] = float("nan")
    t = torch.randint(0, V, (40,), device=device)
    t[5] = -100
    out = xent_triton.cross_entropy(x, t, reduction="none", label_smoothing=smoothing)
    assert math.isnan(out[3].item()) and out[5].item() == 0.0
    keep = torch.arange(40, device=device) != 3
    ref = F.cross_entropy(x.double()[keep], t[keep], reduction="none", label_smoothing=smoothing)
    close(out[keep], ref, rtol=1e-5, atol=1e-5)


def test_large_vocab_small_batch_exactness(backend, device):
    """256k classes, one row: every row statistic stays exact across many blocks."""
    x = rand_logits((1, 256000), torch.float32, device, scale=4)
    t = torch.tensor([123457], device=device)
    out = xent_triton.cross_entropy(x, t, label_smoothing=0.1)
    x64 = x.detach().double().requires_grad_()
    ref = F.cross_entropy(x64, t, label_smoothing=0.1)
    close(out, ref, rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(out, x)
    (r,) = torch.autograd.grad(ref, x64)
    close(g, r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("split", [1, 2])
def test_very_negative_finite_rows(backend, device, split, monkeypatch):
    """A first max below -88 (fp32 exp underflow range) must not turn into 0 * inf."""

    set_config(monkeypatch, split=split)
    x = torch.randn(3, 4096, device=device) - 100.0
    x[1, :2048] = torch.finfo(torch.float32).min  # a masked vocabulary half, masked with a finite value
    x[2, :3000] = float("-inf")
    x[2, 3000:] -= 1e4
    t = torch.tensor([5, 3000, 3500], device=device)
    y = rand_probs((3, 4096), torch.float32, device).masked_fill(x == float("-inf"), 0)
    x.requires_grad_()
    out = xent_triton.cross_entropy(x, t, reduction="none")
    close(out, F.cross_entropy(x.detach().double(), t, reduction="none"), rtol=1e-5, atol=1e-5)
    soft = sce(y, x)
    close(soft, ref_soft(y, x.detach()), rtol=1e-5, atol=1e-3)
    (g,) = torch.autograd.grad(out.sum() + soft.sum(), x)
    assert torch.isfinite(g).all()
    x64 = torch.tensor([[-800.0, -801.0, -803.0]], dtype=torch.float64, device=device)
    close(xent_triton.cross_entropy(x64, torch.tensor([1], device=device)),
          F.cross_entropy(x64, torch.tensor([1], device=device)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("stages", [1, 3])
@pytest.mark.parametrize("split", [1, 3])
def test_statistics_merged_across_slices(backend, device, split, stages, monkeypatch):
    """The forward keeps its statistics per slice of a block and merges them after the loop
    (kernels/xent_forward.combine_parts): slices wholly -inf, slices far below the row's max, label mass
    only on a few finite columns, and one -inf logit under a label deep in the row, across many blocks
    and split parts; with the loads pipelined (STAGES 3) or not."""

    set_config(monkeypatch, split=split)
    set_config(monkeypatch, tile=(512, 4, stages))
    V = 5000
    x = rand_logits((5, V), torch.float32, device, requires_grad=False)
    cols = torch.arange(V, device=device)
    x[0, (cols // 8) % 3 == 0] = float("-inf")  # every third run of 8 columns masked
    x[1, :2100] = float("-inf")  # the first blocks wholly masked
    x[2, cols % 64 < 4] += 60.0  # a few slices far above the others: every merge rescales
    x[2, cols % 64 >= 60] -= 60.0
    x[3] = float("-inf")
    x[3, 4321] = 2.0  # one finite logit: softmax one-hot
    x[4, 3999] = float("-inf")  # under a label below: an infinite loss
    y = rand_probs((5, V), torch.float32, device).masked_fill(x == float("-inf"), 0)
    y[0, (cols % 97) != 5] = 0  # sparse label mass, on finite columns
    y[4, 3999] = 0.25
    x.requires_grad_()
    out = sce(y, x)
    ref = ref_soft(y, x.detach())
    assert out[4].item() == math.inf
    close(out[:4], ref[:4], rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(out[:4].sum(), x)
    p = torch.softmax(x.detach()[:4].double(), -1)
    close(g[:4], p * y[:4].double().sum(-1, keepdim=True) - y[:4].double(), rtol=1e-5, atol=1e-7)
    t = torch.tensor([8, 2500, 3, 4321, 3999], device=device)
    hard = xent_triton.cross_entropy(x, t, reduction="none")
    assert hard[4].item() == math.inf
    close(hard[:4], F.cross_entropy(x.detach()[:4].double(), t[:4], reduction="none"), rtol=1e-5, atol=1e-5)
