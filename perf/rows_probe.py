"""Device time of the short-row kernels (kernels/xent_rows.py) by rows per program, against one row per program.

    python -m perf.rows_probe --out DIR      # ~40 s on a GPU machine; writes rows_probe.csv

The sweep's small-V rows (32768 x 1024) include host time; this probe replays each launch in a CUDA
graph (triton.testing.do_bench_cudagraph), so it times the kernels alone. ROWS = 1 is the per-row kernel
(launch_config.FORCE_ROWS = 1); the others force that many rows per program (num_warps follows
launch_config.rows_launch: rows x BLOCK / 128, at most 16). perf/tune_tiles.py does not cover these kernels.
"""
import argparse

import torch

from .common import graph_copy_gbps, write_csv

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

    from xent_triton import launch_config as lc
    from xent_triton import ops

    dev = torch.device("cuda")
    copy_gbps = graph_copy_gbps(dev)
    print(f"{torch.cuda.get_device_name()}: copy {copy_gbps:.0f} GB/s (graph-replayed)")
    rows_out = []
    for n, v in SHAPES:
        x = torch.randn(n, v, device=dev, dtype=torch.bfloat16)
        y = torch.softmax(torch.randn(n, v, device=dev), -1).to(torch.bfloat16)
        t = torch.randint(0, v, (n,), device=dev)
        g = torch.rand(n, device=dev)
        for kind, labels, target in (("hard", None, t), ("soft", y, None)):
            n_tensors = 1 if kind == "hard" else 2
            for r in ROWS:
                lc.FORCE_ROWS = r
                try:
                    def fwd():
                        return ops.forward(x, labels, target, None, 1, -100, 0.0, 0.0, 0.0, True)

                    loss, lse, stats = fwd()

                    def bwd():
                        return ops.backward(g, x, labels, target, None, stats, 1, -100, 0.0, 0.0, 0.0, True,
                                            False)

                    bwd()  # compile outside the graph capture
                    torch.cuda.synchronize()

                    for pass_name, fn, nbytes in (("forward", fwd, n_tensors * x.numel() * 2),
                                                  ("backward", bwd, (n_tensors + 1) * x.numel() * 2)):
                        ms = triton.testing.do_bench_cudagraph(fn, rep=50)
                        pct = 100 * nbytes / ms / 1e6 / copy_gbps
                        launch = lc.rows_launch(n, v, dev)
                        warps = launch.num_warps if launch else "-"
                        rows_out.append(dict(N=n, V=v, labels=kind, pass_=pass_name, rows=r, num_warps=warps,
                                             us=round(ms * 1e3, 2), pct_of_copy=round(pct, 1)))
                        print(f"{n:>6} x {v:<5} {kind} {pass_name:<8} rows {r:>2} warps {warps!s:>2}: "
                              f"{ms * 1e3:8.2f} us  {pct:5.1f}% of copy")
                finally:
                    lc.FORCE_ROWS = None
        del x, y, t, g
        torch.cuda.empty_cache()
    write_csv(args.out, "rows_probe.csv", rows_out)
    print(f"wrote {args.out}/rows_probe.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
