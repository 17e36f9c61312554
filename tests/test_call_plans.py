"""Call plans (xent_triton/call_plans.py): a signature's checks and launch choices kept from its first call.

A planned call must launch exactly what the general path launches (same kernels, grids, arguments and
constexprs), give the same bits, and never be used where the general path decides something else."""
import pytest
import torch

import xent_triton
from xent_triton import call_plans, launch_config, ops, triton_backend
from helpers import rand_logits, rand_probs

V = 37


@pytest.fixture(autouse=True)
def _no_plans():
    call_plans.clear()
    yield
    call_plans.clear()


def _count_plans(monkeypatch):
    """Counts the calls that returned through a plan, at both entry points."""
    used = []
    for name in ("cross_entropy", "softmax_cross_entropy_with_logits"):
        def counted(*args, _original=getattr(call_plans, name)):
            out = _original(*args)
            used.append(out is not None)
            return out

        monkeypatch.setattr(call_plans, name, counted)
    return used


def _general_path(monkeypatch):
    monkeypatch.setattr(call_plans, "ENABLED", False)


def _cases(device):
    """(name, make inputs, kwargs) of calls that should be planned."""
    def hard(n, dtype=torch.float32, v=V):
        def make():
            t = torch.randint(0, v, (n,), device=device)
            t[::3] = -100
            return rand_logits((n, v), dtype, device), t
        return make

    def soft(n, dtype=torch.float32, v=V, grad_labels=False):
        return lambda: (rand_logits((n, v), dtype, device), rand_probs((n, v), dtype, device,
                                                                       requires_grad=grad_labels))

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
        ("soft mean", soft(6), {}),
        ("soft dlabels", soft(4, grad_labels=True), dict(reduction="sum")),
        ("soft smoothing bf16", soft(5, torch.bfloat16), dict(label_smoothing=0.2)),
        ("soft split rows", soft(2, v=3000), dict(lse_square_scale=1e-2)),
        ("soft float64", soft(3, torch.float64), {}),
        ("hard none", hard(6), dict(reduction="none")),
        ("hard none extras bf16", hard(5, torch.bfloat16), dict(reduction="none", weight=w, label_smoothing=0.1)),
        ("soft none dlabels", soft(4, grad_labels=True), dict(reduction="none", lse_square_scale=1e-3)),
        ("soft none split rows bf16", soft(2, torch.bfloat16, v=3000), dict(reduction="none")),
        ("tf", soft(5, grad_labels=True), dict(api="tf")),
        ("tf bf16 batch of 2 dims", lambda: (rand_logits((2, 3, V), torch.bfloat16, device),
                                             rand_probs((2, 3, V), torch.bfloat16, device, requires_grad=True)),
         dict(api="tf")),
        ("tf split rows", soft(2, v=3000), dict(api="tf")),
    ]


def _run(make, kwargs, seed):
    """Loss, lse (if asked) and gradients of one call on fresh inputs drawn from ``seed``; a per-row loss
    gets a random upstream gradient."""
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
def test_planned_equals_general(backend, device, monkeypatch, case):
    """Loss, lse and gradients of a signature's first and later calls (planned on the kernels' backend) equal
    the general path's bits; on the torch backend no plan is made."""
    name, make, kwargs = _cases(device)[case]
    used = _count_plans(monkeypatch)
    planned = [_run(make, kwargs, seed) for seed in (1, 2, 3)]
    assert used == [backend == "triton"] * 3, name
    _general_path(monkeypatch)
    general = [_run(make, kwargs, seed) for seed in (1, 2, 3)]
    for a, b in zip(planned, general):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=0, atol=0, equal_nan=True)


def _record_launches(monkeypatch, log):
    """Replace every kernel by a recorder of its grid, arguments and keywords; input tensors are named,
    other tensors (fresh outputs) described by dtype, shape and strides."""
    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: log.append((self.name, grid, args, kwargs))

    for name in dir(triton_backend):
        if name.endswith("_kernel"):
            monkeypatch.setattr(triton_backend, name, Recorder(name))


def _describe(launches, inputs):
    def one(a):
        if isinstance(a, torch.Tensor):
            for i, t in enumerate(inputs):
                if a is t:
                    return f"input{i}"
            return ("tensor", a.dtype, tuple(a.shape), a.stride())
        return type(a), a
    return [(name, grid, [one(a) for a in args], sorted((k, one(v)) for k, v in kwargs.items()))
            for name, grid, args, kwargs in launches]


@pytest.mark.parametrize("split", [None, 3])
def test_planned_launches_equal_general(device, monkeypatch, split):
    """With the kernels replaced by recorders, a planned call's forward and backward launches equal the
    general path's: kernel, grid, every argument (inputs by identity) and every constexpr."""
    monkeypatch.setenv("XENT_TRITON_BACKEND", "triton")
    monkeypatch.setattr(launch_config, "FORCE_SPLIT", split)
    log = []
    _record_launches(monkeypatch, log)
    w = torch.rand(300, device=device) + 0.5
    cases = [
        (lambda: rand_logits((9, 300), torch.bfloat16, device), lambda: torch.randint(0, 300, (9,), device=device),
         dict(weight=w, label_smoothing=0.1, softcap=3.0)),
        (lambda: rand_logits((9, 300), torch.float32, device)[:, :290],
         lambda: torch.randint(0, 290, (9,), device=device), dict(reduction="sum")),
        (lambda: rand_logits((600, 64), torch.float32, device), lambda: torch.randint(0, 64, (600,), device=device),
         {}),
        (lambda: rand_logits((5, 300), torch.float16, device),
         lambda: rand_probs((5, 300), torch.float16, device, requires_grad=True), dict(lse_square_scale=1e-3)),
        # The per-row loss (ops._PlannedForwardFunction), the TF API with two batch dims, the row tiles.
        (lambda: rand_logits((9, 300), torch.bfloat16, device), lambda: torch.randint(0, 300, (9,), device=device),
         dict(reduction="none", label_smoothing=0.1)),
        (lambda: rand_logits((2, 3, 300), torch.float32, device),
         lambda: rand_probs((2, 3, 300), torch.float32, device, requires_grad=True), dict(api="tf")),
        (lambda: rand_logits((600, 64), torch.bfloat16, device), lambda: rand_probs((600, 64), torch.bfloat16, device),
         {}),
    ]
    for make_x, make_t, kwargs in cases:
        per_path = []
        for general in (False, True):
            monkeypatch.setattr(call_plans, "ENABLED", not general)
            for repeat in range(2):  # the first call of a signature builds its plan, the second reuses it
                x, t = make_x(), make_t()
                log.clear()
                loss = _call(x, t, kwargs)
                loss.backward(torch.randn_like(loss))
                per_path.append(_describe(log, [x, t, kwargs.get("weight")]))
        assert per_path[0] == per_path[1] == per_path[2] == per_path[3]
        assert len(per_path[0]) >= 2  # a forward and a backward


def _call(x, t, kwargs):
    kwargs = dict(kwargs)
    if kwargs.pop("api", None) == "tf":
        return xent_triton.softmax_cross_entropy_with_logits(t, x)
    return xent_triton.cross_entropy(x, t, **kwargs)


def _launches_both_paths(monkeypatch, log, calls):
    """The recorded launches of ``calls()`` (a list of launch logs it returns) with call plans and without."""
    out = []
    for enabled in (True, False):
        call_plans.clear()
        monkeypatch.setattr(call_plans, "ENABLED", enabled)
        out.append(calls())
    return out


def test_a_signature_at_other_addresses(device, monkeypatch):
    """One signature whose tensors sit at other 16-byte offsets (same shapes and strides): the launches'
    alignment flags follow each call's addresses, as on the general path."""
    monkeypatch.setenv("XENT_TRITON_BACKEND", "triton")
    log = []
    _record_launches(monkeypatch, log)
    base = rand_logits((6, 304), torch.bfloat16, device)
    labels = rand_probs((6, 304), torch.bfloat16, device)

    def calls():
        seen = []
        for offset in (0, 1, 0, 3):  # logits columns [offset, offset + 300) of the same storage
            log.clear()
            x = base[:, offset:offset + 300]
            xent_triton.cross_entropy(x, labels[:, :300]).backward()
            seen.append(_describe(log, [x, labels]))
        return seen

    planned, general = _launches_both_paths(monkeypatch, log, calls)
    assert planned == general
    flags = [dict(launch[3])["Y_ALIGNED"] for launches in planned for launch in launches
             if launch[0] == "xent_forward_kernel"]
    assert flags == [(bool, True), (bool, False), (bool, True), (bool, False)]


def _recorded_problem(monkeypatch, device, n, v):
    """The kernels' backend with every kernel replaced by a recorder, its log, and a class-index problem."""
    monkeypatch.setenv("XENT_TRITON_BACKEND", "triton")
    log = []
    _record_launches(monkeypatch, log)
    return log, rand_logits((n, v), torch.float32, device), torch.randint(0, v, (n,), device=device)


def test_settings_changed_between_forward_and_backward(device, monkeypatch):
    """A backward follows the launch settings and backend of its own time, as on the general path."""
    log, x, t = _recorded_problem(monkeypatch, device, 64, 100)

    def calls():
        seen = []
        for force in (None, 1, None):
            monkeypatch.setattr(launch_config, "FORCE_ROWS", None)
            log.clear()
            loss = xent_triton.cross_entropy(x, t)
            monkeypatch.setattr(launch_config, "FORCE_ROWS", force)  # between the forward and its backward
            loss.backward()
            seen.append(_describe(log, [x, t]))
        return seen

    planned, general = _launches_both_paths(monkeypatch, log, calls)
    assert planned == general
    assert [launches[-1][0] for launches in planned] == [
        "xent_rows_backward_kernel", "xent_backward_kernel", "xent_rows_backward_kernel"]


def test_tiles_table_swapped_or_read_again(device, monkeypatch, tmp_path):
    """A tiles table swapped in (a function, as perf/tune_tiles.py does) or read again after
    ``measured_tiles.cache_clear()`` gets new plans: launches follow the table in force."""
    import json

    log, x, t = _recorded_problem(monkeypatch, device, 300, 3000)

    def forward_tile():
        log.clear()
        with torch.no_grad():
            xent_triton.cross_entropy(x, t)
        return [dict(kw)["BLOCK"] for name, _, _, kw in log if name == "xent_forward_kernel"][0]

    path = tmp_path / "tiles.json"
    monkeypatch.setattr(launch_config, "TILES_FILE", str(path))
    for block, warps in ((64, 1), (1024, 4), (256, 2)):
        path.write_text(json.dumps({"tiles": {"forward": {"4": [[100000, block, warps]]}}}))
        launch_config.measured_tiles.cache_clear()
        assert [forward_tile() for _ in range(2)] == [block, block]
    launch_config.measured_tiles.cache_clear()
    monkeypatch.setattr(launch_config, "measured_tiles", lambda: {"forward": {4: [[100000, 128, 1]]}})
    assert [forward_tile() for _ in range(2)] == [128, 128]
    monkeypatch.undo()
    launch_config.measured_tiles.cache_clear()


def test_none_and_other_bad_inputs_get_the_general_paths_errors(device):
    t = torch.randint(0, V, (4,), device=device)
    x = rand_logits((4, V), torch.float32, device)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        xent_triton.cross_entropy(None, t)
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        xent_triton.cross_entropy(x, None)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        xent_triton.softmax_cross_entropy_with_logits(rand_probs((4, V), torch.float32, device), None)
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        xent_triton.softmax_cross_entropy_with_logits(None, x)


def test_signatures_that_take_the_general_path(device, monkeypatch):
    """No plan where the general path decides something a plan does not hold."""
    monkeypatch.setenv("XENT_TRITON_BACKEND", "triton")
    used = _count_plans(monkeypatch)
    x = rand_logits((4, V), torch.float32, device)
    t = torch.randint(0, V, (4,), device=device)

    def planned(fn):
        used.clear()
        fn()
        return used[-1] if used else None

    assert planned(lambda: xent_triton.cross_entropy(x, t)) is True
    assert planned(lambda: xent_triton.cross_entropy(x, t, reduction="none")) is True
    y = rand_probs((4, V), torch.float32, device)
    assert planned(lambda: xent_triton.softmax_cross_entropy_with_logits(y, x)) is True
    assert planned(lambda: xent_triton.softmax_cross_entropy_with_logits(y[:1], x)) is False  # broadcast labels
    assert planned(lambda: xent_triton.softmax_cross_entropy_with_logits(y.t(), x.t(), axis=0)) is False
    assert planned(lambda: xent_triton.cross_entropy(x * 1.0, t, inplace_backward=True)) is None  # not asked
    assert planned(lambda: xent_triton.cross_entropy(rand_logits((2, V, 3), torch.float32, device),
                                                     torch.randint(0, V, (2, 3), device=device))) is False
    assert planned(lambda: xent_triton.cross_entropy(rand_logits((V,), torch.float32, device), t[0])) is False
    assert planned(lambda: xent_triton.cross_entropy(x.t().contiguous().t(), t)) is False  # class stride != 1
    assert planned(lambda: xent_triton.cross_entropy(x, t, label_smoothing=torch.tensor(0.1))) is False
    assert planned(lambda: xent_triton.cross_entropy(x, t, weight=(torch.rand(2 * V, device=device))[::2])) is False
    monkeypatch.setenv(launch_config.FUSED_STEP_ENV, "1")
    assert planned(lambda: xent_triton.cross_entropy(x, t)) is False  # the fused step
    with torch.no_grad():
        assert planned(lambda: xent_triton.cross_entropy(x, t)) is True  # no training step: no fused step
    monkeypatch.delenv(launch_config.FUSED_STEP_ENV)
    monkeypatch.setattr(ops, "_direct", lambda *a: False)  # torch.compile, subclasses, modes, tracing
    assert planned(lambda: xent_triton.cross_entropy(x, t)) is False


def test_key_follows_environment_and_launch_state(device, monkeypatch):
    """A plan is per environment and launch_config state: changing either between calls is obeyed."""
    used = _count_plans(monkeypatch)
    log, x, t = _recorded_problem(monkeypatch, device, 2, 30000)

    def forward_grid():
        return [grid for name, grid, _, _ in log if name == "xent_forward_kernel"][-1]

    with torch.no_grad():
        monkeypatch.setattr(launch_config, "FORCE_SPLIT", 4)
        xent_triton.cross_entropy(x, t)
        assert used[-1] and forward_grid() == (2, 4)
        monkeypatch.setattr(launch_config, "FORCE_SPLIT", 1)
        xent_triton.cross_entropy(x, t)
        assert used[-1] and forward_grid() == (2, 1)
        monkeypatch.setenv("XENT_TRITON_BACKEND", "torch")
        log.clear()
        xent_triton.cross_entropy(x, t)
        assert not used[-1] and not log  # the fallback ran
        monkeypatch.setenv("XENT_TRITON_BACKEND", "bogus")
        with pytest.raises(ValueError, match="XENT_TRITON_BACKEND"):
            xent_triton.cross_entropy(x, t)
        monkeypatch.setenv("XENT_TRITON_BACKEND", "triton")
        monkeypatch.setenv(launch_config.FUSED_STEP_ENV, "sometimes")
        for _ in range(2):  # a bad value raises on every call, as in the general path
            with pytest.raises(ValueError, match=launch_config.FUSED_STEP_ENV):
                xent_triton.cross_entropy(x, t)


def test_bad_arguments_raise_on_every_call(device):
    """A plan is only made for arguments that pass the checks: a bad call raises each time, and a good
    signature's plan never lets a bad one through."""
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


def test_plans_are_bounded(device, monkeypatch):
    """A run whose shapes keep changing keeps at most MAX_PLANS plans, which hold no tensor."""
    monkeypatch.setattr(call_plans, "MAX_PLANS", 4)
    with torch.no_grad():
        for n in range(1, 11):
            xent_triton.cross_entropy(rand_logits((n, V), torch.float32, device), torch.randint(0, V, (n,),
                                                                                             device=device))
            assert len(call_plans._PLANS) <= 4
    for plan, _table in call_plans._PLANS.values():
        if plan is not None:
            held = [plan.params, plan.row_plan.geometry, plan.row_plan.options, vars(plan.row_plan.forward_plan)]
            assert not any(isinstance(a, torch.Tensor) for a in torch.utils._pytree.tree_leaves(held))


def test_one_shape_many_signatures(backend, device, monkeypatch):
    """Calls on the same tensors that differ only in options, modes or dtypes get their own plans: each
    matches the general path's result, whatever the order they come in."""
    x = rand_logits((6, V), torch.float32, device)
    t = torch.randint(0, V, (6,), device=device)
    w = torch.rand(V, device=device) + 0.5
    signatures = [dict(), dict(label_smoothing=0.1), dict(reduction="sum"), dict(weight=w),
                  dict(ignore_index=int(t[1])),
                  dict(lse_square_scale=1e-2), dict(softcap=2.0), dict(weight=w.double()), dict(label_smoothing=0.3)]

    def results():
        out = []
        for kwargs in signatures + signatures[::-1]:
            out.append(xent_triton.cross_entropy(x, t, **kwargs))
            out.append(torch.autograd.grad(xent_triton.cross_entropy(x, t, **kwargs), x)[0])
            with torch.no_grad():
                out.append(xent_triton.cross_entropy(x.bfloat16(), t, **kwargs))
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out.append(xent_triton.cross_entropy(x.bfloat16(), t, **kwargs))  # a float32 result
        return out

    planned = results()
    _general_path(monkeypatch)
    for a, b in zip(planned, results()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
