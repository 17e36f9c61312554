"""xent_triton/launcher.py: launches that skip Triton's per-call binding must be Triton's own launches.

Needs only xent_triton.launcher, xent_triton.config and the kernels. In this process: the key is
never coarser than Triton's specialization (else a call would run a kernel compiled for other
arguments), and every knob JITFunction.run reads is one the launcher tracks, both checked against
this machine's Triton. In a subprocess, with kernels compiled for sm_90 and a stand-in CUDA driver
(perf/host_overhead.py): every launch reaches the C launcher with the same compiled kernel and the
same arguments on both paths, repeated calls skip Triton's binding, and each way the first-call
check can fail warns once and falls back.
"""
import ast
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from xent_triton import launcher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_tested_triton = pytest.mark.skipif(launcher.TRITON_VERSION not in launcher.TESTED_TRITON,
                            reason=f"Triton {launcher.TRITON_VERSION} is not in launcher.TESTED_TRITON: "
                                   "every launch takes Triton's own path")


def _cuda_backend():
    return pytest.importorskip("triton.backends.nvidia.compiler").CUDABackend


def test_tested_versions():
    assert {"3.6", "3.9"} <= set(launcher.TESTED_TRITON)


@needs_tested_triton
def test_key_is_as_fine_as_tritons_specialization():
    assert launcher.key_is_exact(_cuda_backend())


@needs_tested_triton
@pytest.mark.parametrize("coarser", ["no_alignment", "no_one", "one_int_width"])
def test_a_coarser_key_is_refused(coarser, monkeypatch):
    """The check itself: a key that forgets any case Triton specializes on must fail it."""
    exact = launcher._arg_key

    def key(a):
        if isinstance(a, torch.Tensor) and coarser == "no_alignment":
            return a.dtype
        if type(a) is int and coarser == "no_one":
            return a % 16 == 0
        if type(a) is int and coarser == "one_int_width" and a != 1:
            return a % 16 == 0
        return exact(a)

    monkeypatch.setattr(launcher, "_arg_key", key)
    assert not launcher.key_is_exact(_cuda_backend())


def test_uncovered_arguments_take_tritons_path():
    with pytest.raises(launcher._Unkeyed):
        launcher._arg_key(object())
    with pytest.raises(launcher._Unkeyed):
        launcher._arg_key(2 ** 64)
    assert launcher._arg_key(1) != launcher._arg_key(17)
    assert launcher._arg_key(16) != launcher._arg_key(2 ** 31 + 16)
    assert launcher._arg_key(True) != launcher._arg_key(1)


def _knobs_read(*functions):
    """``group.name`` of every ``knobs.group.name`` the functions read; any other use of ``knobs``
    (an alias, ``knobs.group`` alone) comes back whole, so that it cannot pass unnoticed."""
    found = set()
    for f in functions:
        tree = ast.parse(textwrap.dedent(inspect.getsource(f)))
        chains = set()
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and isinstance(node.value.value, ast.Name) and node.value.value.id == "knobs"):
                found.add(f"{node.value.attr}.{node.attr}")
                chains.add(id(node.value.value))
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == "knobs" and id(node) not in chains:
                found.add(ast.unparse(node))
    return found


def _cache_hit_path():
    """What runs between a call and Triton's kernel cache lookup: run, its binder's maker, its key."""
    from triton.runtime import jit
    return [jit.JITFunction.run] + [getattr(jit, f) for f in ("create_function_from_signature", "compute_cache_key")
                                    if hasattr(jit, f)]


@needs_tested_triton
def test_the_launcher_tracks_every_knob_triton_reads():
    """A knob JITFunction.run reads decides the kernel (folded into its options) or the launch: one the
    launcher does not list could serve a kernel compiled under another setting, or launch differently."""
    listed = set(launcher.KEYED_KNOBS + launcher.ROUTED_KNOBS + launcher.LAUNCH_KNOBS)
    read = _knobs_read(*_cache_hit_path())
    assert read <= listed, f"JITFunction.run reads knobs the launcher does not track: {sorted(read - listed)}"
    assert {"runtime.debug", "compilation.instrumentation_mode"} <= read  # the check sees run's knobs at all
    # And run's own per-function state: debug is keyed, pre_run_hooks routed, the rest is compile-time.
    from triton.runtime.jit import JITFunction
    tree = ast.parse(textwrap.dedent(inspect.getsource(JITFunction.run)))
    state = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
             and n.value.id == "self"}
    assert state <= {"debug", "pre_run_hooks", "device_caches", "_pack_args", "_do_compile", "used_global_vals"}, state


@needs_tested_triton
def test_knob_check_catches_a_new_knob(tmp_path, monkeypatch):
    source = tmp_path / "fake_run.py"
    source.write_text("from triton import knobs\n"
                      "def run(self):\n"
                      "    kwargs = {'debug': knobs.runtime.debug, 'x': knobs.compilation.new_knob}\n"
                      "    rt = knobs.runtime\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import fake_run
    finally:
        sys.path.remove(str(tmp_path))
    assert _knobs_read(fake_run.run) == {"runtime.debug", "compilation.new_knob", "knobs"}


@needs_tested_triton
def test_every_keyed_knob_changes_the_key(monkeypatch):
    from triton import knobs
    before = launcher._knob_state(knobs)
    for name in launcher._KEYED:
        group, attr = name.split(".")
        old = getattr(getattr(knobs, group), attr)
        monkeypatch.setattr(getattr(knobs, group), attr, "x" if isinstance(old, str) else not old)
        assert launcher._knob_state(knobs) != before, name
        monkeypatch.undo()
    assert launcher._knob_state(knobs) == before


@needs_tested_triton
def test_an_untested_triton_takes_its_own_path(monkeypatch):
    tl = pytest.importorskip("triton.language")
    from triton.runtime.jit import JITFunction

    def plain(X, n, BLOCK: tl.constexpr):
        pass

    k = JITFunction(plain)  # not triton.jit: under the interpreter that gives an interpreted function
    assert launcher.Launcher(k)._usable and launcher.Launcher(k)._lead == 2
    monkeypatch.setattr(launcher, "TRITON_VERSION", "3.5")
    assert not launcher.Launcher(k)._usable


SCRIPT = textwrap.dedent(r'''
    import os
    import warnings
    os.environ.pop("TRITON_INTERPRET", None)  # triton.jit decides at definition: compiled kernels, not interpreted
    from perf.host_overhead import _install_fake_cuda_driver
    launches = []
    _install_fake_cuda_driver(launches, describe=True)
    import torch
    import triton
    import triton.language as tl
    from xent_triton import config, kernels, launcher

    warnings.simplefilter("error", launcher.FastLaunchWarning)  # a failed check fails this run, unless caught

    # The package's kernels: constexprs after every runtime parameter, so positional runtime arguments
    # and keyword constexprs (how triton_backend calls them) can take the fast path.
    names = [n for n in dir(kernels) if n.endswith("_kernel")]
    assert len(names) >= 5, names
    for name in names:
        k = launcher.Launcher(getattr(kernels, name))
        assert k._usable and k._lead == len(k._runtime), name

    @triton.jit
    def scale_kernel(X, Y, n, scale, BLOCK: tl.constexpr, NEG: tl.constexpr = False):
        offs = tl.arange(0, BLOCK)
        x = tl.load(X + offs, mask=offs < n)
        tl.store(Y + offs, -x * scale if NEG else x * scale, mask=offs < n)

    # The argument kinds of the package's kernels: tensors of several dtypes, a None pointer, strides
    # and sizes, floats, a runtime default, flags, a tl.dtype constexpr, launch options.
    @triton.jit
    def wide_kernel(X, sx, Y, T, W, LOSS, STATS, n_rows, V, ignore_index, smoothing, softcap, lo=0.0,
                    HARD: tl.constexpr = True, HAS_WEIGHT: tl.constexpr = False, ACC: tl.constexpr = tl.float32,
                    BLOCK: tl.constexpr = 16, SPLIT: tl.constexpr = 1):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        x = tl.load(X + row * sx + offs, mask=offs < V).to(ACC)
        if HARD:
            t = tl.load(T + row)
            x = tl.where(t == ignore_index, 0.0, x)
        else:
            x = x * tl.load(Y + row * sx + offs, mask=offs < V).to(ACC)
        if HAS_WEIGHT:
            x = x * tl.load(W + offs, mask=offs < V)
        tl.store(LOSS + row, tl.sum(x) * smoothing + softcap + lo)
        tl.store(STATS + row * 3, tl.max(x))

    tiny = launcher.Launcher(scale_kernel)
    wide = launcher.Launcher(wide_kernel)
    assert tiny._usable and wide._usable

    def canon(record):
        """A launch as the C launcher sees it (tensors by layout and address)."""
        name, args = record
        out = [name]
        for a in args:
            if isinstance(getattr(a, "data", None), dict):  # launch metadata for the launch hooks
                out.append(sorted((k, v if isinstance(v, (int, str)) else id(v)) for k, v in a.data.items()))
            else:
                out.append(a if isinstance(a, (int, float, str, type(None), tuple)) else id(a))
        return out

    def run(call, fast, launchers=(tiny, wide)):
        launches.clear()
        misses = sum(k.misses for k in launchers)
        with config.overrides(fast_launch=fast):
            call()
        return [canon(r) for r in launches], sum(k.misses for k in launchers) - misses

    def same_launches(calls, first_misses=1):
        for name, call in calls.items():
            reference, misses = run(call, False)
            assert reference and misses == 1, (name, misses)  # fast_launch=False: Triton's own path
            first, misses = run(call, True)
            assert first == reference and misses == first_misses, (name, first, reference, misses)
            fast, misses = run(call, True)
            assert fast == reference and misses == 0, (name, fast, reference, misses)

    buf = torch.randn(64)
    same_launches({
        "n=1": lambda: tiny[(1,)](buf, buf[32:], 1, 2.0, BLOCK=16),
        "n=16": lambda: tiny[(1,)](buf, buf[32:], 16, 2.0, BLOCK=16),
        "n=17": lambda: tiny[(2, 1)](buf, buf[32:], 17, 2.0, BLOCK=32),
        "n=2**31+1": lambda: tiny[(1, 1, 1)](buf, buf[32:], 2 ** 31 + 1, 2.0, BLOCK=32),
        "unaligned": lambda: tiny[(1,)](buf[1:], buf[32:], 16, 2.0, BLOCK=16),
        "default given": lambda: tiny[(1,)](buf, buf[32:], 16, 2.0, BLOCK=16, NEG=True),
    })

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 40, generator=g).to(torch.bfloat16)
    y = torch.rand(8, 40, generator=g).to(torch.bfloat16)
    t = torch.randint(0, 40, (8,), generator=g)
    w = torch.rand(40, generator=g)
    loss, stats = torch.empty(8), torch.empty(8, 3)
    same_launches({
        "hard": lambda: wide[(8,)](x, 40, None, t, None, loss, stats, 8, 40, -100, 0.0, 0.0, BLOCK=64),
        "soft, weight, options": lambda: wide[(8,)](x, 40, y, None, w, loss, stats, 8, 40, -100, 0.1, 30.0, 1e-9,
                                                    HARD=False, HAS_WEIGHT=True, BLOCK=64, num_warps=2,
                                                    num_stages=2),
        "fp32 accumulator given": lambda: wide[(8, 1)](x[1:], 40, None, t, None, loss, stats, 8, 39, -100, 0.0,
                                                       0.0, BLOCK=64, ACC=tl.float32, SPLIT=1),
        "fp64 accumulator": lambda: wide[(8,)](x, 40, None, t, None, loss, stats, 8, 40, -100, 0.0, 0.0,
                                               BLOCK=64, ACC=tl.float64),
    })

    # One key, other values: a launch must carry this call's arguments and grid, not the first call's.
    first = lambda: tiny[(1,)](buf, buf[32:], 17, 2.0, BLOCK=32)
    second = lambda: tiny[(2,)](buf[16:], buf[48:], 33, 3.0, BLOCK=32)
    run(first, True)
    reference, _ = run(second, False)
    fast, misses = run(second, True)
    assert fast == reference and misses == 0, (fast, reference)
    # The current stream goes to each launch; another device, or a debug knob, is another key.
    driver = triton.runtime.driver.active
    driver.stream = 7
    reference, _ = run(second, False)
    fast, misses = run(second, True)
    assert fast == reference and misses == 0 and fast[0][4] == 7, fast
    driver.stream = 0
    for change, undo in ((lambda: setattr(driver, "device", 1), lambda: setattr(driver, "device", 0)),
                         (lambda: setattr(triton.knobs.runtime, "debug", True),
                          lambda: setattr(triton.knobs.runtime, "debug", False))):
        change()
        try:
            reference, _ = run(second, False)
            fast, misses = run(second, True)
            assert fast == reference and misses == 1, (fast, reference, misses)
            fast, misses = run(second, True)
            assert fast == reference and misses == 0
        finally:
            undo()
        assert run(second, True)[1] == 0  # back to the first key's kernel

    class Count(int):
        pass

    never_kept = {
        "runtime by keyword": lambda: tiny[(1,)](buf, buf[32:], n=16, scale=2.0, BLOCK=16),
        "int subclass": lambda: tiny[(1,)](buf, buf[32:], Count(16), 2.0, BLOCK=16),
        "grid function": lambda: tiny[lambda meta: (1,)](buf, buf[32:], 16, 2.0, BLOCK=16),
        "constexpr by position": lambda: tiny[(1,)](buf, buf[32:], 16, 2.0, 16),
    }
    for name, call in never_kept.items():
        reference, _ = run(call, False)
        for _ in range(2):
            fast, misses = run(call, True)
            assert fast == reference and misses == 1, (name, misses)

    # The first-call check: each way a fast launch could differ from Triton's warns once, naming the
    # kernel, and sends that kernel through Triton's own path from then on, with the right launches.
    def fails_check(make, call, expect):
        k = make()
        reference, _ = run(call(k), False, [k])
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(3):
                fast, misses = run(call(k), True, [k])
                assert fast == reference and misses == 1, (expect, fast, reference, misses)
        messages = [str(w.message) for w in seen if issubclass(w.category, launcher.FastLaunchWarning)]
        assert len(messages) == 1 and "scale_kernel" in messages[0] and expect in messages[0], messages
        assert k._fallback and not k._kernels

    call = lambda k: (lambda: k[(2, 3)](buf, buf[32:], 17, 2.0, BLOCK=32))

    class DropsGrid(launcher.Launcher):  # a fast path that loses the grid's second dimension
        def _launch(self, grid, *args, **kwargs):
            return super()._launch(grid[:1] if self._checking else grid, *args, **kwargs)

    fails_check(lambda: DropsGrid(scale_kernel), call, "grid")

    def wrong_default():
        k = launcher.Launcher(scale_kernel)
        k._defaults["NEG"] = True  # the tail a key keeps: here a wrong default
        return k

    fails_check(wrong_default, call, "argument 5 is True where Triton passes False")

    class OtherKernel(launcher.Launcher):  # Triton's choice differs from the kernel the launcher keeps
        def _through_triton(self, grid, args, kwargs):
            self.misses += 1
            self.fn[grid](*args, **kwargs)
            return object()

    fails_check(lambda: OtherKernel(scale_kernel), call, "another compiled kernel")

    # A key coarser than Triton's specialization (here: told so): one warning, then Triton's path.
    launcher._exact = None
    launcher.key_is_exact = lambda backend=None: False
    k = launcher.Launcher(scale_kernel)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            assert run(call(k), True, [k])[1] == 1
    seen = [str(w.message) for w in seen if issubclass(w.category, launcher.FastLaunchWarning)]
    assert len(seen) == 1 and "specialization" in seen[0], seen

    # A Triton version not in TESTED_TRITON: Triton's own path, always, without a warning.
    launcher.TRITON_VERSION = "3.5"
    k = launcher.Launcher(scale_kernel)
    assert [run(call(k), True, [k])[1] for _ in range(2)] == [1, 1]
    print("CHECKED")
''')


@needs_tested_triton
@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="on a GPU the whole suite launches through the Launcher for real, and each key's "
                           "first call checks itself; this stand-in check compiles kernels, which costs device time")
def test_fast_launches_are_tritons_launches(tmp_path):
    """The compiled kernel, grid, stream and every argument reaching the C launcher, on both paths."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    script = tmp_path / "launch_check.py"  # a file: triton.jit reads a kernel's source from one
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0 and "CHECKED" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]
