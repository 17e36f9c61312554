"""xent_triton/launcher.py: launches that skip Triton's per-call binding must be Triton's own launches.

The key must never be coarser than Triton's specialization (else a call would run a kernel compiled
for other arguments): checked against Triton's specializer on this machine's Triton. Then, with the
kernels compiled for sm_90 and a stand-in CUDA driver (perf/host_overhead.py), every launch of a
range of calls must reach the C launcher with the same compiled kernel and the same arguments on
both paths, and the calls after the first of each key must skip Triton's binding.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from xent_triton import launcher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_backend():
    return pytest.importorskip("triton.backends.nvidia.compiler").CUDABackend


def test_key_is_as_fine_as_tritons_specialization():
    assert launcher.key_is_exact(_cuda_backend())


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


SCRIPT = textwrap.dedent(r'''
    import os
    os.environ["XENT_TRITON_BACKEND"] = "triton"
    os.environ.pop("TRITON_INTERPRET", None)
    from perf.host_overhead import _install_fake_cuda_driver
    launches = []
    _install_fake_cuda_driver(launches, describe=True)
    import torch
    import xent_triton
    from xent_triton import launcher, triton_backend
    os.environ["TRITON_INTERPRET"] = "1"  # the backend takes CPU tensors; the kernels stay compiled ones

    exact_pointers = False  # the small kernel's calls below use no fresh outputs: compare their addresses

    def canon(record):
        """A launch as the C launcher sees it; a tensor by its layout and 16-byte phase (fresh outputs have
        other addresses on each path), or by its address where every tensor is an input."""
        name, args = record
        out = [name]
        for a in args:
            if isinstance(a, tuple) and a and a[0] == "tensor":
                out.append((a[1], a[2], a[3], a[4] if exact_pointers else a[4] % 16))
            elif isinstance(getattr(a, "data", None), dict):  # launch metadata for the launch hooks
                out.append(sorted((k, v if isinstance(v, (int, str)) else id(v)) for k, v in a.data.items()))
            else:
                out.append(a if isinstance(a, (int, float, str, type(None), tuple)) else id(a))
        return out

    def kernels():
        return [getattr(triton_backend, k) for k in dir(triton_backend) if k.endswith("_kernel")]

    def run(call, enabled):
        launcher.ENABLED = enabled
        launches.clear()
        misses = sum(k.misses for k in kernels())
        call()
        return [canon(r) for r in launches], sum(k.misses for k in kernels()) - misses

    g = torch.Generator().manual_seed(0)
    def logits(n, v, dtype=torch.bfloat16, offset=0):
        return torch.randn(n, v + offset, generator=g).to(dtype)[:, offset:].requires_grad_()

    def step(x, *args, **kw):
        def call():
            x.grad = None
            xent_triton.cross_entropy(x, *args, **kw).backward()
        return call

    cases = []
    for n, v in ((1, 128256), (48, 32000), (64, 1000)):  # split + combine; whole rows; several rows a program
        for offset in (0, 1):  # aligned and unaligned rows compile apart
            x = logits(n, v, offset=offset)
            hard = torch.randint(0, v, (n,), generator=g)
            soft = torch.rand(n, v, generator=g).to(torch.bfloat16)
            cases.append((f"{n}x{v}+{offset} hard", step(x, hard)))
            cases.append((f"{n}x{v}+{offset} soft", step(x, soft)))
    x = logits(48, 32000, torch.float32)
    t = torch.randint(0, 32000, (48,), generator=g)
    t[3] = -100
    w = torch.rand(32000, generator=g)
    cases.append(("options", step(x, t, weight=w, label_smoothing=0.1, lse_square_scale=1e-4, softcap=30.0)))
    cases.append(("per-row", lambda: xent_triton.cross_entropy(x, t, reduction="none").sum().backward()))

    def fused(call):
        def run():
            os.environ["XENT_TRITON_FUSED_STEP"] = "1"
            try:
                call()
            finally:
                os.environ["XENT_TRITON_FUSED_STEP"] = "0"
        return run

    os.environ["XENT_TRITON_FUSED_STEP"] = "0"
    cases.append(("fused step", fused(step(logits(48, 32000), torch.randint(0, 32000, (48,), generator=g)))))

    total = 0
    for name, call in cases:
        reference, _ = run(call, False)
        run(call, True)  # first calls of new keys compile or find their kernel through fn[grid]
        fast, misses = run(call, True)
        assert reference, name
        assert fast == reference, (name, fast, reference)
        assert misses == 0, (name, misses)
        total += len(fast)
    # The cases alternate alignments: each call must still find its own variant.
    for name, call in cases[::-1]:
        reference, _ = run(call, False)
        fast, misses = run(call, True)
        assert fast == reference and misses == 0, name

    # The Launcher alone, on a small kernel: Triton's integer cases, a default, and calls it must not keep.
    import triton
    import triton.language as tl

    os.environ.pop("TRITON_INTERPRET")  # triton.jit decides at definition: a compiled kernel, not interpreted

    @triton.jit
    def scale_kernel(X, Y, n, scale, BLOCK: tl.constexpr, NEG: tl.constexpr = False):
        offs = tl.arange(0, BLOCK)
        x = tl.load(X + offs, mask=offs < n)
        tl.store(Y + offs, -x * scale if NEG else x * scale, mask=offs < n)

    os.environ["TRITON_INTERPRET"] = "1"
    tiny = launcher.Launcher(scale_kernel)
    assert tiny._usable
    kernels = lambda: [tiny]
    exact_pointers = True
    buf = torch.randn(64)
    calls = {
        "n=1": lambda: tiny[(1,)](buf, buf[32:], 1, 2.0, BLOCK=16),
        "n=16": lambda: tiny[(1,)](buf, buf[32:], 16, 2.0, BLOCK=16),
        "n=17": lambda: tiny[(2, 1)](buf, buf[32:], 17, 2.0, BLOCK=32),
        "n=2**31+1": lambda: tiny[(1, 1, 1)](buf, buf[32:], 2 ** 31 + 1, 2.0, BLOCK=32),
        "unaligned": lambda: tiny[(1,)](buf[1:], buf[32:], 16, 2.0, BLOCK=16),
        "default given": lambda: tiny[(1,)](buf, buf[32:], 16, 2.0, BLOCK=16, NEG=True),
    }
    for _ in range(2):
        for name, call in calls.items():
            reference, _ = run(call, False)
            run(call, True)
            fast, misses = run(call, True)
            assert fast == reference and misses == 0, (name, fast, reference)

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
    }
    for name, call in never_kept.items():
        reference, _ = run(call, False)
        for _ in range(2):
            fast, misses = run(call, True)
            assert fast == reference and misses == 1, (name, misses)
    print("LAUNCHES", total)
''')


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="on a GPU the whole suite launches through the Launcher for real; this stand-in check "
                           "compiles ~20 kernels, which costs device time there")
def test_fast_launches_are_tritons_launches(tmp_path):
    """The compiled kernel, grid, stream and every argument reaching the C launcher, on both paths."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    script = tmp_path / "launch_check.py"  # a file: triton.jit reads a kernel's source from one
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert int(r.stdout.split("LAUNCHES")[1]) >= 30


def test_bad_launch_mode_is_refused():
    env = dict(os.environ, XENT_TRITON_LAUNCH="off", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", "import xent_triton.launcher"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    assert "XENT_TRITON_LAUNCH must be one of 'fast', 'jit', got 'off'" in r.stderr
