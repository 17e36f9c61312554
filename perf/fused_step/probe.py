"""The fused step (one kernel: the forward that also writes dlogits) against the package's training step
(xent_triton.cross_entropy, reduction "mean", then torch.autograd.grad: its forward and backward
kernels), on one card in one run. perf/fused_step/README.md says why this is an experiment.

    python -m perf.fused_step.probe --out DIR     # ~40-60 s on an H100; writes fused_step.csv row by row

Order: the measurement owed since perf/NOTES.md P17 comes first, class indices 8192 x 32000 bf16 with
the pipelined tile (2048/8, 2 programs per SM, 3 stages), next to the same tile without pipelining (P9's
kernel as measured) and a 4096/16 one-program-per-SM tile; then 8192 x 128256, probabilities at both,
and 2048 x 256000. Each row is written to the CSV as soon as it is measured, so a run stopped at its cap
keeps what it has.

Columns: graph_us is the step replayed in a CUDA graph (triton.testing.do_bench_cudagraph, median):
device time alone, each method's small torch ops included; eager_us is triton.testing.do_bench (median,
host included: what an eager training loop sees). pct_of_copy: the single-touch floor (class indices
2NVb: read the logits, write dlogits; probabilities 3NVb) over graph_us, against the copy bandwidth every
perf tool uses (perf.common.copy_gbps; perf/gpu_check.sh measures it once per run). Before timing,
each method's loss and dlogits (first and last 64 rows) are checked against float64 torch.

Without CUDA it runs the fused step under the Triton interpreter at tiny shapes (class indices with
ignored rows and with label smoothing, probabilities; fp32 and bf16; several rows per persistent
program; unaligned rows) and checks loss and dlogits against float64 torch, timing nothing:
tests/test_perf_tools.py runs that, so CI catches a change of the shared row math that breaks it.
"""
import argparse
import sys
import time

import torch

from ..common import CsvRows, copy_gbps, probe_device

TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-9}
FUSED_LOSS_TOL = 1e-4  # the fused step's loss is an fp32 sum of fp32 row losses: tighter than a bf16 loss

P17 = (2048, 8, 2, 3)  # the pipelined default tile (perf/NOTES.md P17)
P9 = (2048, 8, 2, 1)  # the same without pipelining: P9's measured kernel
ONE_PER_SM = (4096, 16, 1, 4)
# (labels, N, V, dtype, fused tiles): the owed measurement first.
GPU_CASES = [
    ("hard", 8192, 32000, torch.bfloat16, [P17, P9, ONE_PER_SM]),
    ("hard", 8192, 128256, torch.bfloat16, [P17, ONE_PER_SM]),
    ("soft", 8192, 32000, torch.bfloat16, [P17]),
    ("soft", 8192, 128256, torch.bfloat16, [P17]),
    ("hard", 2048, 256000, torch.bfloat16, [P17]),
]
# Interpreter: 4 nominal SMs, so 2 programs per SM make 8 persistent programs and 11 rows loop; V not a
# multiple of 8 puts the rows at every offset from a 16-byte boundary (partial head and tail blocks).
CPU_CASES = [
    ("hard", 11, 300, torch.float32, [(64, 1, 2, 1), (64, 1, 2, 3)]),
    ("soft", 11, 300, torch.float32, [(64, 1, 2, 3)]),
    ("hard_smooth", 7, 130, torch.bfloat16, [(32, 1, 1, 3)]),
    ("soft", 5, 77, torch.bfloat16, [(32, 1, 2, 1)]),
]
FIELDS = ["gpu", "labels", "dtype", "N", "V", "method", "tile", "programs", "graph_us", "eager_us", "pct_of_copy",
          "pct_of_copy_eager", "copy_gbps", "loss_err", "grad_err", "check", "note"]


def make_inputs(labels, n, v, dtype, device, seed):
    """Logits ~ 2 N(0, 1) and probabilities or class indices, made on the device."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(n, v, generator=g, device=device) * 2).to(dtype)
    if labels == "soft":
        return x, None, torch.softmax(torch.randn(n, v, generator=g, device=device), -1).to(dtype)
    t = torch.randint(0, v, (n,), generator=g, device=device)
    if device.type == "cpu":
        t[1::4] = -100  # ignored rows: they cost nothing and count for nothing in the mean
    return x, t, None


def check_rows(n, device):
    k = min(n, 64)
    return torch.tensor(sorted(set(range(k)) | set(range(n - k, n))), device=device)


@torch.no_grad()
def reference(x, target, probs, smoothing, rows):
    """float64: the mean loss (torch's denominators) over all rows (in chunks) and dlogits of ``rows``."""
    n, v = x.shape
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    step = max(1, (1 << 24) // v)
    for r0 in range(0, n, step):
        xd = x[r0:r0 + step].double()
        if probs is None:
            total += torch.nn.functional.cross_entropy(xd, target[r0:r0 + step], reduction="sum",
                                                       label_smoothing=smoothing)
        else:
            total -= (probs[r0:r0 + step].double() * torch.log_softmax(xd, -1)).sum()
    if probs is None:
        denom = (target != -100).sum().double()
    else:
        denom = torch.tensor(float(n), dtype=torch.float64, device=x.device)
    with torch.enable_grad():
        xr = x[rows].double().requires_grad_()
        if probs is None:
            lr = torch.nn.functional.cross_entropy(xr, target[rows], reduction="sum", label_smoothing=smoothing)
        else:
            lr = -(probs[rows].double() * torch.log_softmax(xr, -1)).sum()
        (g,) = torch.autograd.grad(lr / denom, xr)
    return float(total / denom), g


def errors(loss, dlogits, ref_loss, ref_g, rows):
    loss_err = abs(float(loss) - ref_loss) / max(abs(ref_loss), 1e-30)
    gr = dlogits.detach()[rows].double()
    grad_err = float((gr - ref_g).norm() / ref_g.norm().clamp_min(1e-300))
    return loss_err, grad_err


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m perf.fused_step.probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".", help="folder for fused_step.csv")
    ap.add_argument("--rep-ms", type=int, default=50, help="do_bench(_cudagraph) rep, ms (default 50)")
    args = ap.parse_args(argv)
    cuda, dev = probe_device()
    import triton

    from .launch import StepTile, fused_step

    gpu = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    copy = None
    if cuda:
        import xent_triton as xt

        print(f"{gpu}: torch {torch.__version__}, triton {triton.__version__}", flush=True)
        copy = copy_gbps(dev)
    else:
        xt = None
        print("fused_step probe: no CUDA GPU; checking the fused step under the Triton interpreter against "
              "float64 torch, timing nothing", flush=True)
    failed = 0
    t_start = time.monotonic()
    with CsvRows(args.out, "fused_step.csv", FIELDS) as out:
        for i, (labels, n, v, dtype, tiles) in enumerate(GPU_CASES if cuda else CPU_CASES):
            smoothing = 0.1 if labels == "hard_smooth" else 0.0
            x, target, probs = make_inputs("soft" if labels == "soft" else "hard", n, v, dtype, dev, seed=i)
            rows = check_rows(n, dev)
            ref_loss, ref_g = reference(x, target, probs, smoothing, rows)
            floor = (3 if probs is not None else 2) * x.numel() * x.element_size()
            tgt = probs if probs is not None else target
            methods = []
            if cuda:
                xl = x.detach().requires_grad_()

                def package_step(xl=xl, tgt=tgt, smoothing=smoothing):
                    loss = xt.cross_entropy(xl, tgt, reduction="mean", label_smoothing=smoothing)
                    return loss, torch.autograd.grad(loss, xl)[0]

                methods.append(("xent_triton", "-", package_step, TOL[dtype], None))
            for tile in tiles:
                st = StepTile(*tile)

                def step(st=st, x=x, target=target, probs=probs, smoothing=smoothing):
                    r = fused_step(x, target=target, labels=probs, reduction="mean", label_smoothing=smoothing,
                                   tile=st)
                    return r.loss, r.dlogits, r

                methods.append(("fused_step", st.label(), step, FUSED_LOSS_TOL, st))
            for method, tile_label, fn, loss_tol, st in methods:
                row = dict(gpu=gpu, labels=labels, dtype=str(dtype).replace("torch.", ""), N=n, V=v, method=method,
                           tile=tile_label, copy_gbps=copy)
                note = []
                try:
                    res = fn()
                    if st is not None:
                        row["programs"] = res[2].programs
                        row["tile"] = res[2].tile.label()
                    loss_err, grad_err = errors(res[0], res[1], ref_loss, ref_g, rows)
                    ok = loss_err <= loss_tol and grad_err <= TOL[dtype]
                    row.update(loss_err=loss_err, grad_err=grad_err, check="ok" if ok else "FAIL")
                    del res
                    if cuda:
                        try:
                            us = triton.testing.do_bench_cudagraph(fn, rep=args.rep_ms, return_mode="median") * 1e3
                            row.update(graph_us=us, pct_of_copy=100 * floor / (us * 1e-6) / 1e9 / copy)
                        except Exception as e:  # a capture that fails: the eager time still comes
                            note.append(f"graph capture failed: {type(e).__name__}: {str(e)[:120]}")
                            torch.cuda.synchronize()
                        us = triton.testing.do_bench(fn, warmup=25, rep=args.rep_ms, return_mode="median") * 1e3
                        row.update(eager_us=us, pct_of_copy_eager=100 * floor / (us * 1e-6) / 1e9 / copy)
                except torch.cuda.OutOfMemoryError as e:
                    row["check"] = "OOM"
                    note.append(str(e).splitlines()[0][:120])
                except Exception as e:
                    row["check"] = "ERROR"
                    note.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                failed += row["check"] != "ok"
                row["note"] = "; ".join(note)
                out.write(row)
                timing = "" if not cuda else (
                    f"graph {row.get('graph_us', float('nan')):9.1f} us ({row.get('pct_of_copy', float('nan')):5.1f}% of "
                    f"copy), eager {row.get('eager_us', float('nan')):9.1f} us  ")
                print(f"{labels:<11} {n:>5} x {v:<6} {row['dtype']:<8} {method:<11} {row['tile']:<22} {timing}"
                      f"loss err {row.get('loss_err', float('nan')):.1e} dlogits err {row.get('grad_err', float('nan')):.1e} "
                      f"{row['check']} {row['note']}", flush=True)
            del x, target, probs, methods, ref_g
            if cuda:
                torch.cuda.empty_cache()
    print(f"wrote {out.path} in {time.monotonic() - t_start:.0f} s; {failed} check(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
