"""Host (CPU) time per call of small problems, where it, not the GPU, sets the time.

    python -m perf.host_overhead --out DIR      # ~30 s on a GPU machine; writes host_overhead.csv/.md

For each shape and label kind it times a forward and a training step (forward + backward of the mean
loss) of: torch eager (F.cross_entropy), xent_triton as shipped ("direct": eager calls skip the
dispatcher, prepare.direct), the same with every kernel launched by Triton's own ``fn[grid]`` instead of
xent_triton.launcher ("direct_triton_launch"), and xent_triton through the torch.library custom ops
("dispatcher", the path torch.compile and tensor subclasses take).
Two numbers per row:

* host_us: CPU wall time per call of a loop of 50 calls that does not wait for the GPU (best of 5); on
  small problems it is the time a training loop sees. Where the GPU is slower, the loop can still
  block on a full launch queue: read it against gpu_us.
* gpu_us: triton.testing.do_bench (CUDA events, median): the larger of host and device time.
* device_us (torch eager and "direct" only): the same call replayed in a CUDA graph
  (triton.testing.do_bench_cudagraph, median): device time alone, with no host in it. Where it is below
  eager's and gpu_us is above, the miss is the host's, not the kernels'.

It ends with a cProfile of xent_triton's step at the smallest shape: where the host time goes.

Without CUDA (``--stubbed``, the default there) it times the package's own host work instead: the
Triton backend's host code on CPU tensors with every kernel launch replaced by a recorder, so neither
Triton's launcher nor any kernel runs, and counts the torch ops and launches of one step. That part
of the host time, and its op count, can be compared before and after a change on any machine.

``--stubbed-driver`` keeps Triton's launch path in it: the kernels are compiled for sm_90 (no GPU
needed) and every launch goes through Triton's Python launch code; only the CUDA driver is a stand-in
(module loading and the C launcher do nothing). Each call is timed three ways, taking turns: launched
by Triton's ``JITFunction.run`` (argument binding, specialization and the cache lookup on every call;
"triton_launch"), by xent_triton.launcher without call plans ("no_plans"), and as shipped ("shipped").
Each call is timed two ways, taking turns: launched by Triton's ``JITFunction.run`` (argument binding,
specialization and the cache lookup on every call; "triton_launch") and as shipped, through
xent_triton.launcher ("shipped"). The difference from ``--stubbed`` is the Python cost of the launches.

Both stubbed modes also time torch eager (``F.cross_entropy``, class indices and probabilities, forward
and step) on a tiny CPU problem in the same run and thread ("torch_eager" rows): the dispatcher and
autograd, which any PyTorch loss pays. Issue 22's goals: the shipped step at most 2x eager's step, the
shipped forward at most 6x eager's forward, for each label kind (host_ratios.csv).
"""
import argparse
import cProfile
import io
import itertools
import os
import pstats
import time

import torch
import torch.nn.functional as F

from .common import CsvRows, write_csv

SHAPES = [(1, 128256), (64, 256000), (32768, 1024), (8192, 32000)]
TINY = (4, 16)  # torch eager's CPU problem: its host cost, dispatcher and autograd, with next to no math
EXTRA = ("torch_ops", "dispatcher_calls", "launches", "launch_args", "ops")
# Calls per timed loop: few enough that their launches (~8 a step) fit CUDA's launch queue (~1024), so
# the loop does not wait for the GPU; the best of TRIES loops is kept.
REPS, TRIES = 50, 5


def device_us(fn):
    """Device time of fn alone (replayed in a CUDA graph, median us); None where the capture fails."""
    import triton

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3
    except Exception as e:
        print(f"  CUDA graph capture failed: {type(e).__name__}: {str(e)[:200]}")
        try:
            torch.cuda.synchronize()
        except Exception:  # a failed capture can leave the stream in an error state: the run goes on
            pass
        return None


def best_eager_us(fn, reps):
    """Best us per call of many loops (see stubbed's best_us)."""
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(3 * TRIES):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps * 1e6)
    return best


def host_us(fn):
    best = float("inf")
    for _ in range(TRIES):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(REPS):
            fn()
        best = min(best, time.perf_counter() - t0)
        torch.cuda.synchronize()
    return best / REPS * 1e6


_VIEW_OPS = {"view", "_unsafe_view", "reshape", "_reshape_alias", "permute", "expand", "as_strided", "detach",
             "alias", "select", "empty", "empty_strided", "new_empty", "t", "squeeze", "unsqueeze"}


def _describe(a):
    if isinstance(a, torch.Tensor):
        return "tensor", a.dtype, tuple(a.shape), a.stride(), a.data_ptr()
    return a


def _install_fake_cuda_driver(launches, describe=False):
    """Make Triton's launch path run without a GPU: compile for sm_90, load nothing, launch nothing.

    Each launch appends (kernel name, argument count) to ``launches``, or with ``describe`` (name, every
    argument the C launcher gets, tensors by description), which costs more host time than a launch.
    Only the pieces of Triton's driver interface that JITFunction.run and CompiledKernel touch are
    provided; a Triton that needs more fails here with an AttributeError, not with a wrong number."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class Utils:
        def load_binary(self, name, kernel, shared, device):
            return object(), object(), 0, 0, 1024  # module, function, registers, spills, max threads

        def unload_module(self, module):
            pass

        def get_device_properties(self, device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132}

    class FakeCudaDriver:
        utils = Utils()
        device, stream = 0, 0  # what the "current" device and stream are; a test may change them

        def is_active(self):
            return True

        def get_current_device(self):
            return self.device

        def get_current_stream(self, device):
            return self.stream

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def launcher_cls(self, src, metadata):
            # The C launcher's arguments: grid (3), stream, function, packed metadata, launch metadata,
            # two hooks, then the kernel's arguments (all of them, constexprs included). Tensors are
            # described: a reference kept here would make autograd copy the gradient.
            if describe:
                return lambda *args: launches.append((src.fn.__name__, tuple(map(_describe, args))))
            return lambda *args: launches.append((src.fn.__name__, len(args) - 9))

    driver.set_active(FakeCudaDriver())


def stubbed(out_dir, reps=200, driver=False):
    """The package's host work per call, kernels stubbed out (see the module docstring)."""
    launches = []
    if driver:
        # The kernels must be JITFunctions (decided when they are defined): import them with the
        # interpreter off, then turn it on so that the backend accepts CPU tensors.
        os.environ.pop("TRITON_INTERPRET", None)
        _install_fake_cuda_driver(launches)
    else:
        os.environ["TRITON_INTERPRET"] = "1"  # the Triton backend accepts CPU tensors; nothing is interpreted
    from torch.utils._python_dispatch import TorchDispatchMode

    import xent_triton
    from xent_triton import config, prepare, triton_backend

    # The Triton backend on CPU tensors: with the stand-in driver the kernels compile for sm_90 (they were
    # imported above with the interpreter off); stubbed, nothing runs at all.
    xent_triton.set_backend("triton")
    config.active = config.Config(backend="triton", interpreter=True, fast_launch=True)

    class Stub:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **k: launches.append((self.name, len(a) + len(k)))

    if not driver:
        for name in dir(triton_backend):
            if name.endswith("_kernel"):
                setattr(triton_backend, name, Stub(name))
    # (name, launches through xent_triton.launcher). With the stand-in driver, Triton's own launch path
    # (fn[grid]) against xent_triton.launcher's; stubbed, the launches are recorded only.
    launch_modes = (("triton_launch", False), ("shipped", True)) if driver else (("shipped", True),)
    torch.set_num_threads(1)
    base = config.active

    def use(fast):
        config.active = base if fast else config.Config(backend="triton", interpreter=True, fast_launch=False)

    def best_us(fn):
        """{launch mode: best us per call}: the best of many loops on a shared machine, the launch
        modes taking turns loop by loop, since its speed drifts by more than they differ."""
        for _ in range(20):
            fn()
        best = {}
        for i in range(3 * TRIES * len(launch_modes)):
            launch, fast = launch_modes[i % len(launch_modes)]
            use(fast)
            fn()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            best[launch] = min(best.get(launch, float("inf")), (time.perf_counter() - t0) / reps * 1e6)
        return best

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []
            self.calls = 0  # every op the dispatcher sees, views and allocations included

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            if func.overloadpacket.__name__ not in _VIEW_OPS:
                self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    rows = []
    import triton

    eager = {}
    n0, v0 = TINY
    xe = torch.randn(n0, v0, requires_grad=True)
    for kind, target in (("hard", torch.randint(0, v0, (n0,))), ("soft", torch.softmax(torch.randn(n0, v0), -1))):
        def eager_fwd():
            with torch.no_grad():
                F.cross_entropy(xe, target)

        def eager_step():
            xe.grad = None
            F.cross_entropy(xe, target).backward()

        for pass_name, fn in (("forward", eager_fwd), ("step", eager_step)):
            us = best_eager_us(fn, reps)
            eager[kind, pass_name] = us
            rows.append(dict(N=n0, V=v0, labels=kind, pass_=pass_name, path="torch_eager", host_us=round(us, 1)))
            print(f"{n0:>6} x {v0:<7} {kind} {pass_name:<8} {'torch_eager':<13} {us:7.1f} us")

    what = ("Triton's launch path with a stand-in CUDA driver (kernels compiled for sm_90)" if driver
            else "kernel launches stubbed")
    print(f"host_overhead --stubbed{'-driver' if driver else ''}: CPU, torch {torch.__version__}, "
          f"triton {triton.__version__}; {what}, 1 thread")
    for n, v in ((1, 128256), (256, 32000)):  # one split row and its combine; whole rows
        x = torch.randn(n, v, dtype=torch.bfloat16, requires_grad=True)
        targets = {"hard": torch.randint(0, v, (n,)), "soft": torch.rand(n, v).to(torch.bfloat16)}
        for kind, target in targets.items():
            def fwd():
                with torch.no_grad():
                    xent_triton.cross_entropy(x, target)

            def step():
                x.grad = None
                xent_triton.cross_entropy(x, target).backward()

            for (pass_name, fn), (launch, fast) in itertools.product((("forward", fwd), ("step", step)),
                                                                     launch_modes):
                if launch == launch_modes[0][0]:
                    times = best_us(fn)
                us = times[launch]
                use(fast)
                direct = prepare.direct
                prepare.direct = lambda *t: True  # the counting mode would turn the direct path off
                try:
                    launches.clear()
                    with CountOps() as mode:
                        fn()
                finally:
                    prepare.direct = direct
                row = dict(N=n, V=v, labels=kind, pass_=pass_name, path=launch, host_us=round(us, 1),
                           torch_ops=len(mode.names), dispatcher_calls=mode.calls, launches=len(launches),
                           launch_args=sum(a for _, a in launches), ops=" ".join(mode.names))
                rows.append(row)
                print(f"{n:>6} x {v:<7} {kind} {pass_name:<8} {launch:<13} {us:7.1f} us  {len(mode.names)} torch ops "
                      f"({row['ops']}; {mode.calls} dispatcher calls with views and allocations), "
                      f"{len(launches)} launches of {row['launch_args']} args")
    use(True)
    name = "host_stubbed_driver.csv" if driver else "host_stubbed.csv"
    write_csv(out_dir, name, [dict(path=r["path"], labels=r["labels"], pass_=r["pass_"], N=r["N"], V=r["V"],
                                   host_us=r["host_us"], **{k: r.get(k) for k in EXTRA}) for r in rows])
    ratios = []
    for r in rows:
        if r["path"] == "shipped":
            e = eager[r["labels"], r["pass_"]]
            goal = 2.0 if r["pass_"] == "step" else 6.0
            ratios.append(dict(labels=r["labels"], pass_=r["pass_"], N=r["N"], V=r["V"], shipped_us=r["host_us"],
                               eager_us=round(e, 1), ratio=round(r["host_us"] / e, 2), goal=goal,
                               met=r["host_us"] / e <= goal))
            print(f"{r['N']:>6} x {r['V']:<7} {r['labels']} {r['pass_']:<8} shipped / eager = "
                  f"{r['host_us'] / e:5.2f} (goal <= {goal})")
    write_csv(out_dir, "host_ratios.csv" if driver else "host_ratios_stubbed.csv", ratios)
    print(f"wrote {out_dir}/{name}")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--stubbed", action="store_true", help="time the package's host work with kernels stubbed out")
    ap.add_argument("--stubbed-driver", action="store_true",
                    help="the same with Triton's launch path included: only the CUDA driver is stubbed")
    args = ap.parse_args(argv)
    if args.stubbed_driver:
        return stubbed(args.out, driver=True)
    if args.stubbed or not torch.cuda.is_available():
        if not args.stubbed:
            print("host_overhead: no CUDA GPU; timing the host work with the kernels stubbed out instead")
        return stubbed(args.out)
    import triton

    import xent_triton
    from xent_triton import config, prepare

    direct = prepare.direct
    # (eager path, launches through xent_triton.launcher): "direct_triton_launch" is the shipped path with
    # every kernel launched by Triton's own fn[grid] instead.
    modes = {"direct": (direct, True), "direct_triton_launch": (direct, False), "dispatcher": (lambda *t: False, True)}
    os.makedirs(args.out, exist_ok=True)
    out = CsvRows(args.out, "host_overhead.csv")  # row by row: a run stopped at its cap keeps what it measured
    rows = out.rows
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}, triton {triton.__version__}")
    for n, v in SHAPES:
        x0 = torch.randn(n, v, device=dev, dtype=torch.bfloat16)
        x = x0.clone().requires_grad_()
        t = torch.randint(0, v, (n,), device=dev)
        y = torch.softmax(torch.randn(n, v, device=dev), -1).to(torch.bfloat16)
        for kind, target in (("hard", t), ("soft", y)):
            def torch_fwd():
                return F.cross_entropy(x, target)

            def xt_fwd():
                return xent_triton.cross_entropy(x, target)

            def step(f):
                def run():
                    x.grad = None
                    f().backward()
                return run

            cases = [("torch_eager", None, torch_fwd)] + [("xt_" + m, m, xt_fwd) for m in modes]
            for name, mode, f in cases:
                prepare.direct, fast = modes[mode] if mode else (direct, True)
                try:
                    for pass_name, fn in (("forward", f), ("step", step(f))):
                        with config.overrides(fast_launch=fast):
                            h = host_us(fn)
                            g = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
                            d = device_us(fn) if name in ("torch_eager", "xt_direct") else None
                        out.write(dict(N=n, V=v, labels=kind, pass_=pass_name, method=name,
                                       host_us=round(h, 1), gpu_us=round(g, 1),
                                       device_us=None if d is None else round(d, 1)))
                        print(f"{n:>6} x {v:<7} {kind} {pass_name:<8} {name:<20} host {h:8.1f} us   "
                              f"do_bench {g:8.1f} us" + ("" if d is None else f"   graph {d:8.1f} us"))
                finally:
                    prepare.direct = direct
        del x0, x, t, y
        torch.cuda.empty_cache()

    out.close()
    with open(os.path.join(args.out, "host_overhead.md"), "w") as fh:
        fh.write(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
                 "bf16; host = CPU us per call, do_bench = median us, graph = median us replayed in a CUDA graph "
                 "(device time alone)\n\n")
        fh.write("| N | V | labels | pass | method | host us | do_bench us | graph us |\n"
                 "|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            fh.write(f"| {r['N']} | {r['V']} | {r['labels']} | {r['pass_']} | {r['method']} | {r['host_us']} "
                     f"| {r['gpu_us']} | {'-' if r['device_us'] is None else r['device_us']} |\n")

    # Where the host time of one step goes (smallest shape, class indices).
    x = torch.randn(1, 128256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 128256, (1,), device=dev)

    def one():
        x.grad = None
        xent_triton.cross_entropy(x, t).backward()

    for _ in range(20):
        one()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        one()
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue())
    print(f"wrote {args.out}/host_overhead.csv, host_overhead.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
