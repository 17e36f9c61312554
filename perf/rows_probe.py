"""Device time of the short-row kernels (kernels/xent_rows.py) by rows per program, against one row per program.

    python -m perf.rows_probe --out DIR      # ~40 s on a GPU machine; writes rows_probe.csv row by row

The sweep's small-V rows (32768 x 1024) include host time; this probe replays each launch in a CUDA
graph (triton.testing.do_bench_cudagraph), so it times the kernels alone. ROWS = 1 is the per-row kernel
(xent_triton.config.overrides(rows=1)); the others force that many rows per program (num_warps follows
launch_config.rows_launch: rows x BLOCK / 128, at most 16). perf/tune_tiles.py does not cover these kernels.
% of copy is against perf.common.copy_gbps, the copy bandwidth the sweep and every probe use.
"""
import argparse

import torch

from .common import CsvRows, copy_gbps as run_copy_gbps, op_backward, op_forward

SHAPES = [(32768, 1024), (131072, 128)]
ROWS = (1, 2, 4, 8, 16)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("rows_probe: no CUDA GPU; nothing to measure")
        return 0
    import triton

    from xent_triton import config
    from xent_triton import launch_config as lc

    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}, triton {triton.__version__}")
    copy_gbps = run_copy_gbps(dev)
    rows_out = CsvRows(args.out, "rows_probe.csv")
    for n, v in SHAPES:
        x = torch.randn(n, v, device=dev, dtype=torch.bfloat16)
        y = torch.softmax(torch.randn(n, v, device=dev), -1).to(torch.bfloat16)
        t = torch.randint(0, v, (n,), device=dev)
        g = torch.rand(n, device=dev)
        for kind, labels, target in (("hard", None, t), ("soft", y, None)):
            n_tensors = 1 if kind == "hard" else 2
            for r in ROWS:
                with config.overrides(rows=r):
                    def fwd(x=x, labels=labels, target=target):
                        return op_forward(x, labels, target)

                    stats = fwd()[-1]

                    def bwd(g=g, x=x, labels=labels, target=target, stats=stats):
                        return op_backward(g, x, labels, target, stats)

                    bwd()  # compile outside the graph capture
                    torch.cuda.synchronize()

                    for pass_name, fn, nbytes in (("forward", fwd, n_tensors * x.numel() * 2),
                                                  ("backward", bwd, (n_tensors + 1) * x.numel() * 2)):
                        ms = triton.testing.do_bench_cudagraph(fn, rep=50)
                        pct = 100 * nbytes / ms / 1e6 / copy_gbps
                        launch = lc.rows_launch(n, v, dev)
                        warps = launch.num_warps if launch else "-"
                        rows_out.write(dict(N=n, V=v, labels=kind, pass_=pass_name, rows=r, num_warps=warps,
                                            us=round(ms * 1e3, 2), pct_of_copy=round(pct, 1), copy_gbps=round(copy_gbps)))
                        print(f"{n:>6} x {v:<5} {kind} {pass_name:<8} rows {r:>2} warps {warps!s:>2}: "
                              f"{ms * 1e3:8.2f} us  {pct:5.1f}% of copy", flush=True)
        del x, y, t, g
        torch.cuda.empty_cache()
    rows_out.close()
    print(f"wrote {rows_out.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
