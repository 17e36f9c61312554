"""xent_triton.patch_torch: torch.nn.functional.cross_entropy routed to the kernels, everything else to torch's."""
import inspect
import io

import pytest
import torch
import torch.nn.functional as F

import xent_triton
from xent_triton import functional
from helpers import close, rand_logits, set_config

C = 13
F64 = dict(rtol=1e-10, atol=1e-10)
ORIGINAL = F.cross_entropy


@pytest.fixture
def routed(monkeypatch):
    """The calls that reached xent_triton's cross_entropy / linear_cross_entropy, by name."""
    seen = []
    for name in ("cross_entropy", "linear_cross_entropy"):
        real = getattr(functional, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(functional, name, spy)
    return seen


@pytest.fixture
def patched():
    linear = getattr(F, "linear_cross_entropy", None)
    with xent_triton.patch_torch(linear_cross_entropy=True) as patch:
        yield patch
    assert F.cross_entropy is ORIGINAL and getattr(F, "linear_cross_entropy", None) is linear


def _inputs(device, n=7):
    x = rand_logits((n, C), torch.float64, device)
    t = torch.randint(0, C, (n,), device=device)
    t[1] = 4
    return x, t


def _loss_and_grad(fn, x, *args, **kwargs):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, *args, **kwargs)
    (g,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), g


@pytest.mark.parametrize("call", [
    lambda x, t, w: F.cross_entropy(x, t),
    lambda x, t, w: F.cross_entropy(x, t, w, None, 4, None, "sum", 0.1),  # torch's positional order
    lambda x, t, w: F.cross_entropy(x, t, weight=w, ignore_index=4, reduction="none", label_smoothing=0.2),
    lambda x, t, w: torch.nn.CrossEntropyLoss(weight=w, ignore_index=4, label_smoothing=0.05)(x, t),
    lambda x, t, w: F.cross_entropy(x, torch.softmax(x.detach() * 2, 1), w, label_smoothing=0.1),
])
def test_routes_to_the_kernels_with_torchs_results(backend, device, patched, routed, call):
    """The Triton backend's calls go to xent_triton (the torch backend's keep torch's function), and the
    loss and gradient are torch's, in float64."""
    x, t = _inputs(device)
    w = torch.rand(C, dtype=torch.float64, device=device) + 0.1
    ours = _loss_and_grad(lambda z: call(z, t, w), x)
    assert routed == (["cross_entropy"] if backend == "triton" else [])
    patched.remove()
    theirs = _loss_and_grad(lambda z: call(z, t, w), x)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape
        close(a, b, **F64)


def test_what_stays_with_torch(backend, device, patched, routed):
    """weight that requires grad (torch differentiates it for probability targets), torch.func transforms,
    forward-mode AD and tensor subclasses get torch's function, with its gradients."""
    import torch.autograd.forward_ad as fwAD
    x, t = _inputs(device)
    w = (torch.rand(C, dtype=torch.float64, device=device) + 0.1).requires_grad_()
    p = torch.softmax(torch.randn_like(x), 1)
    (gw,) = torch.autograd.grad(F.cross_entropy(x, p, w), w)
    (gw_ref,) = torch.autograd.grad(ORIGINAL(x, p, w), w)
    close(gw, gw_ref, **F64)
    g = torch.func.grad(lambda z: F.cross_entropy(z, t))(x)
    close(g, torch.func.grad(lambda z: ORIGINAL(z, t))(x), **F64)
    v = torch.randn_like(x)
    _, tangent = torch.func.jvp(lambda z: F.cross_entropy(z, t), (x,), (v,))
    close(tangent, torch.func.jvp(lambda z: ORIGINAL(z, t), (x,), (v,))[1], **F64)
    with fwAD.dual_level():
        dual = F.cross_entropy(fwAD.make_dual(x, v), t)
        close(fwAD.unpack_dual(dual).tangent, tangent, **F64)

    class Logged(torch.Tensor):
        pass

    close(F.cross_entropy(x.as_subclass(Logged), t).as_subclass(torch.Tensor), ORIGINAL(x, t), **F64)
    close(F.cross_entropy(x, t.to(torch.uint8)), ORIGINAL(x, t.to(torch.uint8)), **F64)  # torch takes uint8
    empty = torch.empty(3, 0, dtype=torch.float64, device=device)
    close(F.cross_entropy(empty, empty), ORIGINAL(empty, empty), **F64)  # NaN, as torch
    assert routed == []
    torch._dynamo.reset()
    g = torch.compile(torch.func.grad(lambda z: F.cross_entropy(z, t)), backend="aot_eager", fullgraph=True)(x)
    close(g, torch.func.grad(lambda z: ORIGINAL(z, t))(x), **F64)


def test_torch_function_overrides_see_torchs_function(backend, device, patched, routed):
    """A subclass whose __torch_function__ handles torch's F.cross_entropy, and a TorchFunctionMode, see
    torch's function (not the patch's) and their results stand, as before the patch."""
    x, t = _inputs(device)

    class Handled(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is ORIGINAL:
                return torch.tensor(42.0)
            return super().__torch_function__(func, types, args, kwargs or {})

    assert F.cross_entropy(x.as_subclass(Handled), t).item() == 42.0
    seen = []

    class Log(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Log():
        loss = F.cross_entropy(x, t, label_smoothing=0.1)
    assert ORIGINAL in seen
    close(loss, ORIGINAL(x, t, label_smoothing=0.1), **F64)
    assert routed == []


def test_double_backward_like_torch(backend, device, patched):
    """create_graph=True through the patched loss: a gradient penalty's gradient equals torch's."""
    x, t = _inputs(device)
    hvps = []
    for fn in (F.cross_entropy, ORIGINAL):
        z = x.detach().clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(z, t, label_smoothing=0.1), z, create_graph=True)
        hvps.append(torch.autograd.grad(g.square().sum(), z)[0])
    close(hvps[0], hvps[1], **F64)


def test_cpu_tensors_keep_torch_by_default(monkeypatch, patched, routed):
    """Without TRITON_INTERPRET (the auto backend on the CPU), torch's own kernels run: the fallback is
    slower than they are."""
    set_config(monkeypatch, backend="auto", interpreter=False)
    x, t = _inputs("cpu")
    close(F.cross_entropy(x, t), ORIGINAL(x, t), **F64)
    assert routed == []


def _params(fn):
    return [(p.name, p.default, p.kind) for p in inspect.signature(fn).parameters.values()]


def test_route_is_marked_constant_as_torchs_decorator_marks_it():
    """torch_patch marks its route function the way torch.compiler.assume_constant_result does, without
    importing torch._dynamo: the decorator must still mark with that flag (and return the function)."""
    from xent_triton import torch_patch

    def probe():
        return True

    assert torch.compiler.assume_constant_result(probe) is probe
    marked = [k for k, v in vars(probe).items() if v is True]
    assert marked == ["_dynamo_marked_constant"]
    assert torch_patch._runs_kernels._dynamo_marked_constant is True


def test_signature_name_and_removal():
    names = ("cross_entropy", "linear_cross_entropy")
    before = {n: getattr(F, n) for n in names if hasattr(F, n)}
    outer = xent_triton.patch_torch(linear_cross_entropy=True)
    try:
        for name, original in before.items():
            wrapper = getattr(F, name)
            assert wrapper is not original
            assert (wrapper.__name__, wrapper.__module__) == (name, "torch.nn.functional")
            assert _params(wrapper) == _params(original)
        with xent_triton.patch_torch(linear_cross_entropy=False) as inner:
            assert F.cross_entropy is not outer._installed["cross_entropy"]
            with pytest.raises(RuntimeError, match="replaced again after this patch"):
                outer.remove()
        assert not inner._installed
        assert F.cross_entropy is outer._installed["cross_entropy"]
    finally:
        outer.remove()
    assert {n: getattr(F, n) for n in before} == before
    outer.remove()  # a second remove does nothing
    assert F.cross_entropy is ORIGINAL
    with pytest.raises(KeyError):  # the block's own error, though its patch cannot be removed at its end
        with xent_triton.patch_torch() as block:
            later = xent_triton.patch_torch()
            raise KeyError("in the block")
    later.remove()
    assert F.cross_entropy is block._installed["cross_entropy"]
    block.remove()
    assert F.cross_entropy is ORIGINAL
    default = xent_triton.patch_torch()
    assert list(default._installed) == ["cross_entropy"]  # the linear form only when asked for
    default.remove()
    assert {n: getattr(F, n) for n in before} == before


def test_compile_and_export_take_the_custom_op(backend, device, patched, routed):
    x, t = _inputs(device)
    module = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    exported = torch.export.export(module, (x, t))
    assert ("xent_triton.forward" in exported.graph_module.code) == (backend == "triton")
    close(exported.module()(x, t), ORIGINAL(x, t, label_smoothing=0.1), **F64)
    torch._dynamo.reset()
    compiled = torch.compile(lambda z: F.cross_entropy(z, t, reduction="sum"), fullgraph=True, backend="aot_eager")
    ours, g = _loss_and_grad(compiled, x)
    ref, g_ref = _loss_and_grad(lambda z: ORIGINAL(z, t, reduction="sum"), x)
    close(ours, ref, **F64)
    close(g, g_ref, **F64)
    assert bool(routed) == (backend == "triton")


def test_torchscript_keeps_torchs_function(backend, device, patched):
    """A module scripted under the patch runs torch's loss in TorchScript, and saves and loads."""
    x, t = _inputs(device)
    scripted = torch.jit.script(torch.nn.CrossEntropyLoss(ignore_index=4, label_smoothing=0.1))
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    ref = ORIGINAL(x, t, ignore_index=4, label_smoothing=0.1)
    close(scripted(x, t), ref, **F64)
    close(torch.jit.load(buffer)(x, t), ref, **F64)


@pytest.mark.skipif(not hasattr(torch.nn, "LinearCrossEntropyLoss"), reason="torch < 2.13")
def test_linear_cross_entropy_module(backend, device, patched, routed):
    torch.manual_seed(3)
    loss_fn = torch.nn.LinearCrossEntropyLoss(8, C, bias=True, device=device, dtype=torch.float64,
                                              ignore_index=4, label_smoothing=0.1)
    h = torch.randn(9, 8, dtype=torch.float64, device=device)
    t = torch.randint(0, C, (9,), device=device)
    ours = loss_fn(h, t)
    g = torch.autograd.grad(ours, loss_fn.linear.weight)[0]
    assert routed == (["linear_cross_entropy"] if backend == "triton" else [])
    patched.remove()
    ref = loss_fn(h, t)
    close(ours, ref, **F64)
    close(g, torch.autograd.grad(ref, loss_fn.linear.weight)[0], **F64)


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch < 2.13")
def test_linear_cross_entropy_what_stays_with_torch(backend, device, patched, routed):
    """Probability targets that require grad and uint8 class indices get torch's linear_cross_entropy."""
    original = patched._installed["linear_cross_entropy"].__xent_triton_replaces__
    h = torch.randn(6, 8, dtype=torch.float64, device=device)
    w = torch.randn(C, 8, dtype=torch.float64, device=device)
    p = torch.softmax(torch.randn(6, C, dtype=torch.float64, device=device), 1).requires_grad_()
    (gp,) = torch.autograd.grad(F.linear_cross_entropy(h, w, p), p)
    close(gp, torch.autograd.grad(original(h, w, p), p)[0], **F64)
    t = torch.randint(0, C, (6,), device=device, dtype=torch.uint8)
    close(F.linear_cross_entropy(h, w, t), original(h, w, t), **F64)
    assert "linear_cross_entropy" not in routed  # (torch's calls F.cross_entropy, which may be ours)
    close(F.linear_cross_entropy(h, w, p.detach()), original(h, w, p.detach()), **F64)
    assert ("linear_cross_entropy" in routed) == (backend == "triton")
