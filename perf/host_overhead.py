"""Host (CPU) time per call of small problems, where it, not the GPU, sets the time.

    python -m perf.host_overhead --out DIR      # ~30 s on a GPU machine; writes host_overhead.csv/.md

For each shape and label kind it times a forward and a training step (forward + backward of the mean
loss) of: torch eager (F.cross_entropy), xent_triton as shipped ("direct": eager calls skip the
dispatcher, ops._direct) and xent_triton through the torch.library custom ops ("dispatcher", the path
torch.compile and tensor subclasses take). Two numbers per row:

* host_us: CPU wall time per call of a loop of 50 calls that does not wait for the GPU (best of 5); on
  small problems it is the time a training loop sees. Where the GPU is slower, the loop can still
  block on a full launch queue: read it against gpu_us.
* gpu_us: triton.testing.do_bench (CUDA events, median): the larger of host and device time.

It ends with a cProfile of xent_triton's step at the smallest shape: where the host time goes.
"""
import argparse
import cProfile
import csv
import io
import os
import pstats
import time

import torch
import torch.nn.functional as F

SHAPES = [(1, 128256), (64, 256000), (32768, 1024), (8192, 32000)]
# Calls per timed loop: few enough that their launches (~8 a step) fit CUDA's launch queue (~1024), so
# the loop does not wait for the GPU; the best of TRIES loops is kept.
REPS, TRIES = 50, 5


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("host_overhead: no CUDA GPU; nothing to measure")
        return 0
    import triton

    import xent_triton
    from xent_triton import ops

    direct = ops._direct
    modes = {"direct": direct, "dispatcher": lambda *t: False}
    os.makedirs(args.out, exist_ok=True)
    rows = []
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
                ops._direct = modes[mode] if mode else direct
                try:
                    for pass_name, fn in (("forward", f), ("step", step(f))):
                        h = host_us(fn)
                        g = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
                        rows.append(dict(N=n, V=v, labels=kind, pass_=pass_name, method=name,
                                         host_us=round(h, 1), gpu_us=round(g, 1)))
                        print(f"{n:>6} x {v:<7} {kind} {pass_name:<8} {name:<14} host {h:8.1f} us   "
                              f"do_bench {g:8.1f} us")
                finally:
                    ops._direct = direct
        del x0, x, t, y
        torch.cuda.empty_cache()

    with open(os.path.join(args.out, "host_overhead.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, "host_overhead.md"), "w") as fh:
        fh.write(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
                 "bf16; host = CPU us per call, gpu = do_bench median us\n\n")
        fh.write("| N | V | labels | pass | method | host us | do_bench us |\n|---|---|---|---|---|---|---|\n")
        for r in rows:
            fh.write(f"| {r['N']} | {r['V']} | {r['labels']} | {r['pass_']} | {r['method']} | {r['host_us']} "
                     f"| {r['gpu_us']} |\n")

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
