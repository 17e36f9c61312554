"""Benchmark of the fused linear + cross entropy (an LLM head's training step).

Run from the repository root:

    python -m perf.linear_bench                 # LLM head shapes in bf16, ~1-2 min on one H100
    python -m perf.linear_bench --points 8192x4096x128256 --out /tmp/lb

Each method makes one training step, ``loss = mean cross entropy of x @ W.T against class
indices``, and its gradients for x and W:

* ``torch_unfused``: ``F.cross_entropy(F.linear(x, W), t)``, the whole logits and their gradient;
* ``xent_unfused``: ``xent_triton.cross_entropy(F.linear(x, W), t)``;
* ``xent_linear``: ``xent_triton.linear_cross_entropy(x, W, t)`` (row chunks, fp32 weight-gradient sum);
* ``xent_linear_bf16acc``: the same, summing the weight gradient in bf16 (``accum_dtype``);
* ``torch_linear``: torch's own chunked ``F.linear_cross_entropy`` (torch >= 2.13; skipped before);
* ``liger``: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (skipped when not installed).

Columns: ms (``triton.testing.do_bench`` median of a step), tflops (6 N H V over ms: the three
matmuls of an unfused step), copy_gbps (perf.common.copy_gbps, the run's copy bandwidth, for reference), peak_extra_mib (``max_memory_allocated`` during a step over what was
allocated before it; the returned gradients are counted), and the errors of the loss and of both
gradients against a float32 computation from the same bf16 inputs (relative Frobenius). linear.csv is
written row by row, so a run stopped at its time cap keeps what it measured. Without CUDA a tiny CPU
comparison runs instead, and says so.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import CsvRows, copy_gbps
from .sweep import Timer

xt = None  # xent_triton, imported by main(): --help works while the package does not import

POINTS_GPU = [(4096, 4096, 128256), (8192, 4096, 128256), (8192, 2304, 256000), (16384, 4096, 32000)]
POINTS_CPU = [(256, 64, 1000)]
COLUMNS = ["gpu", "method", "N", "H", "V", "dtype", "ms", "tflops", "peak_extra_mib", "loss_err", "dx_err",
           "dw_err", "check", "copy_gbps", "note"]


def _methods(log):
    methods = {
        "torch_unfused": lambda x, w, t: F.cross_entropy(F.linear(x, w), t),
        "xent_unfused": lambda x, w, t: xt.cross_entropy(F.linear(x, w), t),
        "xent_linear": lambda x, w, t: xt.linear_cross_entropy(x, w, t),
        "xent_linear_bf16acc": lambda x, w, t: xt.linear_cross_entropy(x, w, t, accum_dtype=x.dtype),
    }
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        opts = torch.nn.LinearCrossEntropyOptions()
        methods["torch_linear"] = lambda x, w, t: F.linear_cross_entropy(x, w, t, options=opts)
    else:
        log(f"note: torch {torch.__version__} has no F.linear_cross_entropy; skipping torch_linear")
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss()
        methods["liger"] = lambda x, w, t: liger(w, x, t)
    except Exception as e:  # ImportError, or a broken install
        log(f"note: liger is not installed ({type(e).__name__}: {e}); skipping liger")
    return methods


def _reference(x, w, t):
    """Loss and gradients in float32 from the same (bf16) inputs."""
    xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    loss = F.cross_entropy(F.linear(xf, wf), t)
    dx, dw = torch.autograd.grad(loss, (xf, wf))
    return loss.detach(), dx, dw


def _rel(a, b):
    return ((a.float() - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_point(N, H, V, dtype, device, methods, timer, log, gpu, emit=lambda row: None, copy=None):
    torch.manual_seed(0)
    x = (torch.randn(N, H, device=device) * 1.0).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device=device) / math.sqrt(H) * 4).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), device=device)
    ref = _reference(x, w, t)
    cuda = device.type == "cuda"
    rows = []
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    for name, fn in methods.items():
        row = dict(gpu=gpu, method=name, N=N, H=H, V=V, dtype=str(dtype).replace("torch.", ""), note="",
                   copy_gbps=copy)

        def step():
            loss = fn(x, w, t)
            return (loss,) + torch.autograd.grad(loss, (x, w))

        try:
            out = step()
            errs = [_rel(a, b) for a, b in zip(out, ref)]
            row.update(loss_err=errs[0], dx_err=errs[1], dw_err=errs[2],
                       check="ok" if max(errs) <= tol else "FAIL")
            del out
            if cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                out = step()
                torch.cuda.synchronize()
                row["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                del out
            ms = timer(step)
            row.update(ms=ms, tflops=6 * N * H * V / (ms * 1e-3) / 1e12)
        except torch.cuda.OutOfMemoryError as e:
            row.update(check="OOM", note=str(e).splitlines()[0][:120])
        except Exception as e:  # a broken peer must not stop the benchmark
            row.update(check="ERROR", note=f"{type(e).__name__}: {e}"[:160])
        log(f"{name:>20} N={N} H={H} V={V}: " + ", ".join(
            f"{k}={row[k]:.4g}" if isinstance(row.get(k), float) else f"{k}={row.get(k)}"
            for k in ("ms", "tflops", "peak_extra_mib", "loss_err", "dx_err", "dw_err", "check", "note")
            if row.get(k) not in (None, "")))
        rows.append(row)
        emit(row)
        if cuda:
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", help="comma list of NxHxV (default: LLM heads on a GPU, one tiny point on the CPU)")
    p.add_argument("--out", help="output directory (default: perf/results/linear-<gpu>-<date>/)")
    p.add_argument("--rep-ms", type=float, default=200.0)
    args = p.parse_args(argv)
    global xt
    import xent_triton as xt

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu"
    lines = []

    def log(msg):
        lines.append(msg)
        print(msg, flush=True)

    if not cuda:
        log("NOTE: no CUDA device: a tiny CPU comparison of the torch fallback, not a GPU benchmark")
    if args.points:
        points = [tuple(int(v) for v in s.lower().split("x")) for s in args.points.split(",")]
    else:
        points = POINTS_GPU if cuda else POINTS_CPU
    slug = "".join(c if c.isalnum() else "-" for c in gpu.lower()).strip("-")
    out = Path(args.out) if args.out else Path("perf/results") / f"linear-{slug}-{_dt.date.today()}"
    out.mkdir(parents=True, exist_ok=True)
    timer = Timer(cuda, 25.0, args.rep_ms)
    log(f"{gpu}: torch {torch.__version__}")
    copy = copy_gbps(device, log)
    methods = _methods(log)
    rows = []
    with CsvRows(str(out), "linear.csv", COLUMNS) as csv_out:
        for N, H, V in points:
            rows += run_point(N, H, V, torch.bfloat16, device, methods, timer, log, gpu, csv_out.write, copy)
    if cuda:
        # Older torch rejects an fp32 addend with bf16 factors in addmm(out_dtype=): the sum then takes
        # one more pass per chunk (xent_triton/linear.py). Informational; the package may not expose it.
        try:
            from xent_triton import linear as _linear
            log("xent_linear's fp32 weight-gradient sum: "
                + ("addmm(out_dtype=float32) into the sum" if _linear._MIXED_ADDMM["ok"]
                   else "bf16 product + add (addmm with out_dtype refused here)"))
        except Exception:
            pass
    md = ["| method | N | H | V | ms | TFLOP/s | peak extra MiB | loss err | dx err | dw err | check |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, ""))
                 for k in ("ms", "tflops", "peak_extra_mib", "loss_err", "dx_err", "dw_err")]
        md.append(f"| {r['method']} | {r['N']} | {r['H']} | {r['V']} | " + " | ".join(cells) + f" | {r['check']} |")
    (out / "linear.md").write_text(f"# linear + cross entropy step, bf16, {gpu}\n\n" + "\n".join(md) + "\n")
    (out / "linear_log.txt").write_text("\n".join(lines) + "\n")
    log("\n".join(md))
    log(f"wrote {out}/linear.csv, linear.md, linear_log.txt")
    return 0 if all(r["check"] in ("ok", "OOM") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
