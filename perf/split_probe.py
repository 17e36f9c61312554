"""Device time of the few-row forward: the split rule (a row split across programs, then a combine
launch) against one program per row with pipelined loads (perf/NOTES.md P18).

    python -m perf.split_probe --out DIR      # ~30 s on a GPU machine; writes split_probe.csv row by row

Below 2 x SMs rows the forward splits each row (launch_config._launch) so that more programs share the
memory latency; that costs a second launch (the combine: 15-50 us of host time, P18) and a partial
buffer. A program with STAGES - 1 blocks in flight (P17) may cover the latency alone. Each
configuration's forward (the package's forward op: both launches where the row is split; the split and
tile forced through xent_triton.config.overrides) is replayed in a CUDA graph,
so the times are the device's; the host time of one launch fewer is in perf.host_overhead. These problems
fit in L2 (50 MB), and a graph replays the same addresses: each captured call reads the next of enough
copies of the inputs (up to 256 MiB; a graph of ~50 ms holds a few hundred calls) that its data has left
L2 before it comes round again, as a training step's fresh logits would have. Each result is checked
against float64 torch first. Without CUDA the same checks run through the Triton interpreter on small
rows and nothing is timed. perf/tune_tiles.py times the same choice for its "forward_few" rows.
"""
import argparse
import itertools

import torch

from .common import CsvRows, forward_error, op_forward, probe_device

SHAPES = [(1, 128256), (8, 128256), (64, 256000), (128, 50257)]
ROTATE_BYTES = 256 * 2**20  # inputs replayed from copies that add up to this much, far past L2
# (name, split, tile) for xent_triton.config.overrides: None keeps what the package chooses.
CONFIGS = [("shipped", None, None), ("no_split", 1, None), ("no_split_2048_8_s3", 1, (2048, 8, 3)),
           ("no_split_4096_16_s3", 1, (4096, 16, 3)), ("no_split_4096_16_s4", 1, (4096, 16, 4)),
           ("no_split_8192_16_s3", 1, (8192, 16, 3))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    cuda, dev = probe_device()
    import triton

    from xent_triton import config
    from xent_triton import launch_config as lc

    shapes = SHAPES if cuda else [(2, 20000)]  # the interpreter has 4 nominal SMs: the shipped rule splits
    configs = CONFIGS if cuda else [(name, split, tile and (256, 1, tile[2])) for name, split, tile in CONFIGS]
    if cuda:
        print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}, triton {triton.__version__}")
    else:
        print("split_probe: no CUDA GPU; checking each configuration under the Triton interpreter, timing nothing")
    out, failed = CsvRows(args.out, "split_probe.csv"), 0
    for n, v in shapes:
        x = torch.randn(n, v, device=dev, dtype=torch.bfloat16) * 3
        y = torch.softmax(torch.randn(n, v, device=dev), -1).to(torch.bfloat16)
        t = torch.randint(0, v, (n,), device=dev)
        for kind, labels, target in (("soft", y, None), ("hard", None, t)):
            per_copy = x.numel() * x.element_size() * (2 if labels is not None else 1)
            copies = [(x.clone(), labels if labels is None else labels.clone())
                      for _ in range(max(1, ROTATE_BYTES // per_copy) if cuda else 1)]
            for name, split, tile in configs:
                with config.overrides(split=split, tile=tile):
                    turn = itertools.cycle(copies)

                    def fwd():
                        xi, yi = next(turn)
                        return op_forward(xi, yi, target)[0]

                    err = forward_error(fwd(), x, labels, target)
                    ok = err < 1e-4
                    failed += not ok
                    f = lc.forward_launch(n, v, 2, dev)
                    ms = triton.testing.do_bench_cudagraph(fwd, rep=25) if cuda and ok else float("nan")
                out.write(dict(N=n, V=v, labels=kind, config=name, block=f.block, num_warps=f.num_warps,
                                stages=f.stages, split=f.split, us=round(ms * 1e3, 2), max_rel_err=f"{err:.1e}",
                                check="ok" if ok else "FAIL"))
                print(f"{n:>4} x {v:<6} {kind} {name:<20} BLOCK {f.block:>5}/{f.num_warps:<2} stages {f.stages} "
                      f"split {f.split:>2}: {ms * 1e3:8.2f} us  err {err:.1e} {'ok' if ok else 'FAIL'}", flush=True)
            del copies
        del x, y, t
        if cuda:
            torch.cuda.empty_cache()
    out.close()
    print(f"wrote {out.path}; {failed} check(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
