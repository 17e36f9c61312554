"""Device time of the forward's row loop: per-slice statistics (the shipped kernel), with and without
pipelined loads (STAGES 3, perf/NOTES.md P17), against block-wide ones (the loop before perf/NOTES.md P16,
kept in perf/forward_block_state.py), in one run on one card.

    python -m perf.loop_ab --out DIR      # ~1-2 min on a GPU machine; writes loop_ab.csv

Both kernels get the same rows, the same tile (BLOCK, num_warps) and one program per row (no split), and
each launch is replayed in a CUDA graph (triton.testing.do_bench_cudagraph): kernel time alone, no host
time. Each result is checked against float64 torch on its first rows before it is timed. Without CUDA it
runs the same checks through the Triton interpreter on a small problem and times nothing.
"""
import argparse

import torch

from .common import forward_error, graph_copy_gbps, probe_device, write_csv

SHAPES = [(8192, 128256), (8192, 32000), (2048, 256000)]
TILES = [(1024, 4), (1024, 8), (2048, 8), (2048, 16)]


def _launch(kernel, rows, block, warps, stages):
    """The forward of one problem through ``kernel`` with the host code of triton_backend.forward."""
    from xent_triton import launch_config, triton_backend as tb

    n = rows.n_rows
    loss, lse, stats = tb._row_outputs(rows, torch.float32)
    extra = {}
    if stages:  # the shipped kernel; 0: the old loop, which has neither EPT nor STAGES
        extra = dict(EPT=launch_config.slice_width(block, warps, rows.logits.element_size()), STAGES=stages)
    kernel[(n, 1)](
        # PART is never written with SPLIT == 1; cols_per_split is the whole row.
        *tb._inputs(rows), loss, lse, stats, lse, *tb._row_geometry(rows), rows.n_cols,
        *tb._options(-100, 0.0, 0.0, 0.0),
        SPLIT=1, Y_ALIGNED=tb._aligned_like(rows, rows.labels, rows.y_strides), BLOCK=block, num_warps=warps,
        HAS_Z=False, **tb._flags(rows, 0.0, 0.0), **extra,
    )
    return loss


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    cuda, dev = probe_device()
    import triton

    from xent_triton.kernels import xent_forward_kernel
    from xent_triton.layout import make_rows

    from .forward_block_state import block_state_forward_kernel

    shapes = SHAPES if cuda else [(16, 5000)]
    tiles = TILES if cuda else [(256, 1)]
    copy_gbps = None
    if cuda:
        copy_gbps = graph_copy_gbps(dev)
        print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}, triton {triton.__version__}, "
              f"copy {copy_gbps:.0f} GB/s (graph-replayed)")
    else:
        print("loop_ab: no CUDA GPU; checking both loops under the Triton interpreter, timing nothing")
    out, failed = [], 0
    for n, v in shapes:
        x = torch.randn(n, v, device=dev, dtype=torch.bfloat16) * 3
        y = torch.softmax(torch.randn(n, v, device=dev), -1).to(torch.bfloat16)
        t = torch.randint(0, v, (n,), device=dev)
        for kind, labels, target in (("soft", y, None), ("hard", None, t)):
            rows = make_rows(x, labels, target, None, 1)
            nbytes = (2 if kind == "soft" else 1) * x.numel() * 2
            for block, warps in tiles:
                for loop, kernel, stages in (("per_slice", xent_forward_kernel, 1),
                                             ("per_slice_s3", xent_forward_kernel, 3),
                                             ("block_wide", block_state_forward_kernel, 0)):
                    def fwd():
                        return _launch(kernel, rows, block, warps, stages)

                    err = forward_error(fwd(), x, labels, target)
                    ok = err < 1e-4
                    failed += not ok
                    ms = triton.testing.do_bench_cudagraph(fwd, rep=50) if cuda and ok else float("nan")
                    pct = 100 * nbytes / ms / 1e6 / copy_gbps if cuda and ok else float("nan")
                    out.append(dict(N=n, V=v, labels=kind, block=block, num_warps=warps, loop=loop,
                                    us=round(ms * 1e3, 2), pct_of_copy=round(pct, 1), max_rel_err=f"{err:.1e}",
                                    check="ok" if ok else "FAIL"))
                    print(f"{n:>5} x {v:<6} {kind} {block:>4}/{warps:<2} {loop:<12} {ms * 1e3:9.2f} us "
                          f"{pct:5.1f}% of copy  err {err:.1e} {'ok' if ok else 'FAIL'}", flush=True)
        del x, y, t
        if cuda:
            torch.cuda.empty_cache()
    write_csv(args.out, "loop_ab.csv", out)
    print(f"wrote {args.out}/loop_ab.csv; {failed} check(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
