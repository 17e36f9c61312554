"""Device time of the forward's row loop: per-slice statistics (the shipped kernel), with and without
pipelined loads (STAGES 3, perf/NOTES.md P17), against block-wide ones (the loop before perf/NOTES.md P16,
kept in perf/forward_block_state.py), in one run on one card.

    python -m perf.loop_ab --out DIR      # ~40 s on a GPU machine; writes loop_ab.csv row by row

Both kernels get the same rows, the same tile (BLOCK, num_warps) and one program per row (no split), and
each launch is replayed in a CUDA graph (triton.testing.do_bench_cudagraph): kernel time alone, no host
time. Each result is checked against float64 torch on its first rows before it is timed; % of copy is
against perf.common.copy_gbps, the copy bandwidth the sweep and every probe use. The kernels are launched
by this tool's own host code (perf.common.launch: arguments by name), so the package's host side can
change under it. Without CUDA it runs the same checks through the Triton interpreter on a small problem
and times nothing.
"""
import argparse

import torch

from .common import (CsvRows, copy_gbps as run_copy_gbps, forward_error, launch, probe_device, row_kernel_args,
                     slice_width)

SHAPES = [(8192, 128256), (8192, 32000), (2048, 256000)]  # most important first: a capped run keeps them
TILES = [(1024, 4), (2048, 8)]  # the tuned forward tile (P15), and the larger one that pipelining may rescue


def _launch(kernel, x, labels, target, block, warps, stages):
    """The forward of contiguous (N, V) ``x`` through ``kernel``, one program per row (SPLIT 1), with this
    tool's own host code (perf.common: every argument passed by name), not the package's."""
    n, V = x.shape
    loss = torch.empty(n, dtype=torch.float32, device=x.device)
    lse = torch.empty(n, dtype=torch.float32, device=x.device)
    stats = torch.empty(n, 3, dtype=torch.float32, device=x.device)
    args = row_kernel_args(x, labels, target)
    # PART is never written with SPLIT == 1; cols_per_split is the whole row.
    args.update(LOSS=loss, LSE=lse, STATS=stats, PART=lse, cols_per_split=V, SPLIT=1, BLOCK=block)
    if stages:  # the shipped kernel; 0: the old loop, which has neither EPT nor STAGES
        args.update(EPT=slice_width(block, warps, x.element_size()), STAGES=stages)
    launch(kernel, (n, 1), args, num_warps=warps)
    return loss


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    cuda, dev = probe_device()
    import triton

    from xent_triton.kernels import xent_forward_kernel

    from .forward_block_state import block_state_forward_kernel

    shapes = SHAPES if cuda else [(8, 1500)]  # several whole 256-blocks and a partial tail per row
    tiles = TILES if cuda else [(256, 1)]
    copy_gbps = None
    if cuda:
        print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}, triton {triton.__version__}")
        copy_gbps = run_copy_gbps(dev)
    else:
        print("loop_ab: no CUDA GPU; checking both loops under the Triton interpreter, timing nothing")
    out, failed = CsvRows(args.out, "loop_ab.csv"), 0
    for n, v in shapes:
        x = torch.randn(n, v, device=dev, dtype=torch.bfloat16) * 3
        y = torch.softmax(torch.randn(n, v, device=dev), -1).to(torch.bfloat16)
        t = torch.randint(0, v, (n,), device=dev)
        for kind, labels, target in (("soft", y, None), ("hard", None, t)):
            nbytes = (2 if kind == "soft" else 1) * x.numel() * 2
            for block, warps in tiles:
                for loop, kernel, stages in (("per_slice", xent_forward_kernel, 1),
                                             ("per_slice_s3", xent_forward_kernel, 3),
                                             ("block_wide", block_state_forward_kernel, 0)):
                    def fwd(kernel=kernel, x=x, labels=labels, target=target, block=block, warps=warps,
                            stages=stages):
                        return _launch(kernel, x, labels, target, block, warps, stages)

                    err = forward_error(fwd(), x, labels, target)
                    ok = err < 1e-4
                    failed += not ok
                    ms = triton.testing.do_bench_cudagraph(fwd, rep=25) if cuda and ok else float("nan")
                    pct = 100 * nbytes / ms / 1e6 / copy_gbps if cuda and ok else float("nan")
                    out.write(dict(N=n, V=v, labels=kind, block=block, num_warps=warps, loop=loop,
                                   us=round(ms * 1e3, 2), pct_of_copy=round(pct, 1), copy_gbps=copy_gbps and round(copy_gbps),
                                   max_rel_err=f"{err:.1e}", check="ok" if ok else "FAIL"))
                    print(f"{n:>5} x {v:<6} {kind} {block:>4}/{warps:<2} {loop:<12} {ms * 1e3:9.2f} us "
                          f"{pct:5.1f}% of copy  err {err:.1e} {'ok' if ok else 'FAIL'}", flush=True)
        del x, y, t
        if cuda:
            torch.cuda.empty_cache()
    out.close()
    print(f"wrote {out.path}; {failed} check(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
