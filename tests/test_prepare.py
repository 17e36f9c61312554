"""Prepared calls (xent_triton/prepare.py): a Call kept for a signature gives the bits a freshly prepared one
gives, its key follows everything the Call depends on, and the cache stays bounded and holds no tensor."""
import numpy as np
import pytest
import torch

import xent_triton
from xent_triton import config, prepare, triton_backend
from helpers import rand_logits, rand_probs, set_config

V = 37


@pytest.fixture(autouse=True)
def _empty_cache():
    prepare.clear_cache()
    yield
    prepare.clear_cache()


def _cases(device):
    """(name, make inputs, kwargs) of calls that are kept."""
    def hard(n, dtype=torch.float32, v=V):
        def make():
            t = torch.randint(0, v, (n,), device=device)
            t[::3] = -100
            return rand_logits((n, v), dtype, device), t
        return make

    def soft(n, dtype=torch.float32, v=V, grad_labels=False, labels_rows=None):
        return lambda: (rand_logits((n, v), dtype, device),
                        rand_probs((labels_rows or n, v), dtype, device, requires_grad=grad_labels))

    w = torch.rand(V, device=device) + 0.5
    return [
        ("hard mean", hard(6), {}),
        ("hard sum bf16", hard(5, torch.bfloat16), dict(reduction="sum")),
        ("hard extras", hard(7), dict(weight=w, label_smoothing=0.1, lse_square_scale=1e-3, softcap=4.0)),
        ("hard float64 weight", hard(4), dict(weight=w.double())),
        ("hard return_lse", hard(3), dict(return_lse=True)),
        ("hard split rows", hard(2, v=3000), {}),
        ("hard int32", lambda: (rand_logits((4, V), torch.float32, device),
                                torch.randint(0, V, (4,), device=device, dtype=torch.int32)), {}),
        ("hard in place", lambda: (rand_logits((4, V), torch.float32, device) * 1.0,
                                   torch.randint(0, V, (4,), device=device)), dict(inplace_backward=True)),
        ("soft mean", soft(6), {}),
        ("soft dlabels", soft(4, grad_labels=True), dict(reduction="sum")),
        ("soft smoothing bf16", soft(5, torch.bfloat16), dict(label_smoothing=0.2)),
        ("soft split rows", soft(2, v=3000), dict(lse_square_scale=1e-2)),
        ("soft float64", soft(3, torch.float64), {}),
        ("hard none", hard(6), dict(reduction="none")),
        ("hard none extras bf16", hard(5, torch.bfloat16), dict(reduction="none", weight=w, label_smoothing=0.1)),
        ("soft none dlabels", soft(4, grad_labels=True), dict(reduction="none", lse_square_scale=1e-3)),
        ("tf", soft(5, grad_labels=True), dict(api="tf")),
        ("tf broadcast labels", soft(5, grad_labels=True, labels_rows=1), dict(api="tf")),
        ("tf bf16 batch of 2 dims", lambda: (rand_logits((2, 3, V), torch.bfloat16, device),
                                             rand_probs((2, 3, V), torch.bfloat16, device, requires_grad=True)),
         dict(api="tf")),
        ("class axis 1 of 3 dims", lambda: (rand_logits((2, V, 3), torch.float32, device),
                                            torch.randint(0, V, (2, 3), device=device)), {}),
    ]


def _run(make, kwargs, seed):
    """Loss, lse (if asked) and gradients of one call on fresh inputs drawn from ``seed``."""
    torch.manual_seed(seed)
    x, t = make()
    kwargs = dict(kwargs)
    if kwargs.pop("api", None) == "tf":
        out = xent_triton.softmax_cross_entropy_with_logits(t, x)
    else:
        out = xent_triton.cross_entropy(x, t, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    wrt = [a for a in (x, t) if a.requires_grad]
    grads = torch.autograd.grad(loss, wrt, torch.randn(loss.shape, dtype=loss.dtype, device=loss.device))
    return (*(out if isinstance(out, tuple) else (out,)), *grads)


@pytest.mark.parametrize("case", range(len(_cases(torch.device("cpu")))))
def test_kept_call_equals_fresh_one(backend, device, case):
    """A signature's repeat calls, which reuse its Call, give the bits of calls prepared afresh."""
    name, make, kwargs = _cases(device)[case]
    kept = [_run(make, kwargs, seed) for seed in (1, 2, 3)]
    assert len(prepare._CACHE) >= 1, name
    fresh = []
    for seed in (1, 2, 3):
        prepare.clear_cache()
        fresh.append(_run(make, kwargs, seed))
    for a, b in zip(kept, fresh):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=0, atol=0, equal_nan=True)


def test_a_signature_is_prepared_once(device):
    x = rand_logits((4, V), torch.float32, device)
    t = torch.randint(0, V, (4,), device=device)
    first = prepare.cross_entropy(x, t, None, -100, "mean", 0.0, 0.0, None, False)
    assert prepare.cross_entropy(x.detach().clone().requires_grad_(), t.clone(), None, -100, "mean", 0.0, 0.0,
                                 None, False) is first
    assert prepare.cross_entropy(x, t, None, -100, "sum", 0.0, 0.0, None, False) is not first
    with torch.no_grad():
        assert prepare.cross_entropy(x, t, None, -100, "mean", 0.0, 0.0, None, False) is not first
    # Options the key cannot hold by value (a numpy integer, a tensor) are prepared each time.
    a = prepare.cross_entropy(x, t, None, np.int64(-100), "mean", 0.0, 0.0, None, False)
    assert prepare.cross_entropy(x, t, None, np.int64(-100), "mean", 0.0, 0.0, None, False) is not a
    assert prepare.cross_entropy(x, t, None, -100, "mean", torch.tensor(0.1), 0.0, None, False).options[1] == \
        pytest.approx(0.1)


class _Recorder:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.name, grid, args, kwargs))


def _record_launches(monkeypatch):
    log = []
    for name in dir(triton_backend):
        if name.endswith("_kernel"):
            monkeypatch.setattr(triton_backend, name, _Recorder(log, name))
    return log


def test_alignment_follows_each_call(device, monkeypatch):
    """One signature whose tensors sit at other 16-byte offsets (same shapes and strides): the launches'
    alignment flags follow each call's addresses."""
    set_config(monkeypatch, backend="triton", rows=1)
    log = _record_launches(monkeypatch)
    base = rand_logits((6, 304), torch.bfloat16, device)
    labels = rand_probs((6, 304), torch.bfloat16, device)
    flags = []
    for offset in (0, 1, 0, 3):  # logits columns [offset, offset + 300) of the same storage
        log.clear()
        x = base[:, offset:offset + 300]
        xent_triton.cross_entropy(x, labels[:, :300]).backward()
        flags.append([kw["Y_ALIGNED"] for name, _, _, kw in log if name == "xent_forward_kernel"][0])
    assert flags == [True, False, True, False]


def test_key_follows_the_configuration(device, monkeypatch):
    """set_backend and config.overrides between calls are obeyed: the configuration is in the key."""
    set_config(monkeypatch, backend="triton")
    log = _record_launches(monkeypatch)
    x = rand_logits((2, 30000), torch.float32, device)
    t = torch.randint(0, 30000, (2,), device=device)

    def forward_grid():
        return [grid for name, grid, _, _ in log if name == "xent_forward_kernel"][-1]

    with torch.no_grad():
        for split in (4, 1, 4):
            with config.overrides(split=split):
                xent_triton.cross_entropy(x, t)
                assert forward_grid() == (2, split)
        with config.overrides(backend="torch"):
            log.clear()
            xent_triton.cross_entropy(x, t)
            assert not log  # the fallback ran


def test_bad_arguments_raise_on_every_call(device):
    """Only calls that pass the checks are kept: a bad call raises each time, also after a good call of the
    same tensors."""
    x = rand_logits((4, V), torch.float32, device)
    t = torch.randint(0, V, (4,), device=device)
    xent_triton.cross_entropy(x, t)
    for _ in range(2):
        with pytest.raises(ValueError, match="target shape"):
            xent_triton.cross_entropy(x, t[:3])
        with pytest.raises(ValueError, match="label_smoothing"):
            xent_triton.cross_entropy(x, t, label_smoothing=1.5)
        with pytest.raises(ValueError, match="reduction"):
            xent_triton.cross_entropy(x, t, reduction="avg")
        with pytest.raises(NotImplementedError, match="weight"):
            xent_triton.cross_entropy(x, t, weight=torch.rand(V, device=device, requires_grad=True))
        with pytest.raises(TypeError, match="input must be a torch.Tensor"):
            xent_triton.cross_entropy(None, t)
        with pytest.raises(TypeError, match="target must be a torch.Tensor"):
            xent_triton.cross_entropy(x, None)
        with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
            xent_triton.softmax_cross_entropy_with_logits(rand_probs((4, V), torch.float32, device), None)


def test_cache_is_bounded_and_holds_no_tensor(device, monkeypatch):
    monkeypatch.setattr(prepare, "MAX_CACHED", 4)
    with torch.no_grad():
        for n in range(1, 11):
            xent_triton.cross_entropy(rand_logits((n, V), torch.float32, device),
                                      torch.randint(0, V, (n,), device=device))
            assert len(prepare._CACHE) <= 4
    for call in prepare._CACHE.values():
        held = [getattr(call, name) for name in prepare.Call.__slots__]
        held += [vars(p) if hasattr(p, "__dict__") else p for p in (call.forward_plan, call.backward_plan)]
        assert not any(isinstance(a, torch.Tensor) for a in torch.utils._pytree.tree_leaves(held))


def test_one_shape_many_signatures(backend, device):
    """Calls on the same tensors that differ only in options, modes or dtypes get their own Calls: each
    matches a freshly prepared call's result, whatever the order they come in."""
    x = rand_logits((6, V), torch.float32, device)
    t = torch.randint(0, V, (6,), device=device)
    w = torch.rand(V, device=device) + 0.5
    signatures = [dict(), dict(label_smoothing=0.1), dict(reduction="sum"), dict(weight=w),
                  dict(ignore_index=int(t[1])), dict(lse_square_scale=1e-2), dict(softcap=2.0),
                  dict(weight=w.double()), dict(label_smoothing=0.3)]

    def results(fresh):
        out = []
        for kwargs in signatures + signatures[::-1]:
            for step in range(4):
                if fresh:
                    prepare.clear_cache()
                if step == 0:
                    out.append(xent_triton.cross_entropy(x, t, **kwargs))
                elif step == 1:
                    out.append(torch.autograd.grad(xent_triton.cross_entropy(x, t, **kwargs), x)[0])
                elif step == 2:
                    with torch.no_grad():
                        out.append(xent_triton.cross_entropy(x.bfloat16(), t, **kwargs))
                else:
                    with torch.autocast(device.type, dtype=torch.bfloat16):
                        out.append(xent_triton.cross_entropy(x.bfloat16(), t, **kwargs))  # a float32 result
        return out

    for a, b in zip(results(False), results(True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
