"""Measure the (BLOCK, num_warps, stages) tile of each kernel pass on this GPU and write tiles.json.

    python -m perf.tune_tiles --out $OUT            # ~4-6 min on an H100: 2 dtypes x 4 V x (18 + 9 tiles
                                                    # + 2 x (1 + 12) steps + 4 x 5 few-row forwards);
                                                    # tiles.json is rewritten after every V
    python -m perf.tune_tiles --quick --out $OUT    # bf16 only, 2 V

For each element size (bf16, fp32), class count V and pass (forward of the soft loss, backward of the soft
loss; then the training step with class indices and with probabilities, two kernels against every
fused-step candidate), every candidate tile is timed at N rows chosen so that one tensor holds about
512 MiB (large enough that no row is split and the data is far past L2), replayed in a CUDA graph
(triton.testing.do_bench_cudagraph, median): device time alone. Timed with plain do_bench, as before
2026-11-26's eighth session, a step at these sizes measured the host's ~1 ms per call on the H100
machine, not the kernels (perf/NOTES.md P17); where a capture fails, the candidate falls back to
do_bench and the log says so. The fastest tile per (pass, element size, V) becomes a row of the table
that xent_triton/launch_config.py reads
(copy the written tiles.json to xent_triton/tiles.json and commit it with the card named in it). Results
are also printed as % of the copy bandwidth measured in the same run, on the byte model of
../shared/ANCHORS.md (forward 2NVb, backward 3NVb, step 2NVb with class indices, 3NVb with probabilities).
A "step_hard" / "step_soft" row records the best fused tile where the fused step beat the two kernels, and
programs_per_sm 0 where it did not: with XENT_TRITON_FUSED_STEP=auto (the default) the fused step runs
only where it won, for that label kind. A "forward_few" row records, per V, up to
how many rows (of FEW_ROWS, all below the split rule's 2 x SMs) one pipelined program per row kept up
with the split and its combine launch on the device, and with which tile (few_rows_row; perf/NOTES.md
P18); the forward then skips the split there.
"""
import argparse
import copy as copy_module
import datetime
import itertools
import json
import os
import sys

import torch

CANDIDATES = [(b, w) for b in (1024, 2048, 4096) for w in (4, 8, 16)]
# The forward's candidates also try pipelined loads (kernels/xent_forward._row_partial, STAGES).
FORWARD_CANDIDATES = [(b, w, s) for b, w in CANDIDATES for s in (1, 3)]
# Fused step (kernels/xent_step.py): (BLOCK, num_warps, persistent programs per SM, stages). Registers
# (sm_90, bf16, 3-4 stages, Triton 3.9 / 3.6): 2048/8 69-98 / 99-128, 4096/16 98 / 99, 8192/16 83 / 125,
# so 2048/8 fits two programs per SM and the others one (a persistent program that is not resident
# waits for a whole program's rows). 4096 and 8192 at 8 warps need 160-200: left out.
STEP_CANDIDATES = ([(2048, 8, p, s) for p in (1, 2) for s in (1, 3, 4)]
                   + [(4096, 16, 1, s) for s in (1, 3, 4)]
                   + [(8192, 16, 1, s) for s in (1, 3, 4)])
# Few rows (perf/NOTES.md P18): the row counts below 2 x SMs (264 on an H100/H200), where the split rule
# splits each row and adds a combine launch, are timed with that rule and with one pipelined program per
# row (each candidate a (BLOCK, num_warps, stages) tile). A candidate may be FEW_SLACK_US slower on the
# device than the split and still win: it saves the combine launch's 15-50 us of host time. Inputs are
# replayed from copies adding up to FEW_ROTATE_BYTES, so that they come from HBM, not from L2.
FEW_ROWS = (1, 16, 64, 192)
FEW_CANDIDATES = [(2048, 8, 3), (4096, 16, 3), (4096, 16, 4), (8192, 16, 3)]
FEW_SLACK_US = 2.0
FEW_ROTATE_BYTES = 256 * 2**20
V_POINTS = (128256, 32000, 256000, 4096)  # most important first: a run cut short keeps them
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TARGET_BYTES = 512 * 2**20


def copy_gbps(do_bench):
    src = torch.empty(2**30 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def few_rows_row(dtype, V, do_bench, baseline_tiles, device="cuda", rows=FEW_ROWS, candidates=FEW_CANDIDATES,
                 rotate_bytes=FEW_ROTATE_BYTES):
    """The soft forward at few rows: the split rule (with the tiles ``baseline_tiles()`` returns) against
    one program per row with each candidate tile, every call timed by ``do_bench`` (ms). Returns the
    "forward_few" row [V, max_rows, block, num_warps, stages] of the candidate that kept up (within
    FEW_SLACK_US) at the most row counts, max_rows being the largest count up to which it never fell behind
    (0: the split won already at the fewest rows), and the log lines."""
    import xent_triton
    from xent_triton import launch_config as lc

    kept = {cand: 0 for cand in candidates}  # the largest N up to which the candidate kept up
    total = {cand: 0.0 for cand in candidates}
    log = []
    installed = lc.measured_tiles
    lc.measured_tiles = baseline_tiles
    try:
        for i, N in enumerate(rows):
            x = torch.randn(N, V, device=device, dtype=dtype) * 2
            y = torch.softmax(torch.randn(N, V, device=device), -1).to(dtype)
            n_copies = max(1, rotate_bytes // (2 * x.numel() * x.element_size()))
            copies = [(x.clone(), y.clone()) for _ in range(n_copies)]
            turn = itertools.cycle(copies)

            def fwd():
                xi, yi = next(turn)
                return xent_triton.softmax_cross_entropy_with_logits(yi, xi)

            with torch.no_grad():
                split_us = do_bench(fwd) * 1e3
                times = []
                for cand in candidates:
                    lc.FORCE_SPLIT, lc.FORCE_TILE = 1, cand
                    try:
                        us = do_bench(fwd) * 1e3
                    except Exception as e:  # a tile that does not compile or runs out of resources
                        log.append(f"N={N} one program per row {cand}: {type(e).__name__}: {e}")
                        us = float("inf")
                    finally:
                        lc.FORCE_SPLIT = lc.FORCE_TILE = None
                    if us <= split_us + FEW_SLACK_US and kept[cand] == (rows[i - 1] if i else 0):
                        kept[cand] = N
                    total[cand] += us
                    times.append(f"{cand} {us:.1f}")
            log.append(f"N={N:>4} few rows: split {split_us:.1f} us; one program per row: " + ", ".join(times))
            del x, y, copies
    finally:
        lc.measured_tiles = installed
    best = max(candidates, key=lambda c: (kept[c], -total[c]))
    log.append(f"few rows: {best} up to {kept[best]} rows (0: the split stays)")
    return [V, kept[best], *best], log


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".", help="folder for tiles.json")
    ap.add_argument("--quick", action="store_true", help="bf16 only, V in (32000, 128256)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_tiles: no CUDA GPU found; nothing to tune (the table only matters on a GPU)")
        return 0
    import triton

    import xent_triton
    from xent_triton import launch_config as lc

    graph_failures = []

    def do_bench(fn):
        fn()  # compile (or fail to) outside the capture: only a failed capture falls back below
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
        except Exception as e:  # a capture that fails: time it with the host in the loop, and say so
            graph_failures.append(f"{type(e).__name__}: {e}")
            print(f"  CUDA graph capture failed ({graph_failures[-1]}); timed with do_bench (host included)",
                  flush=True)
            torch.cuda.synchronize()
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    dtypes = {"bf16": DTYPES["bf16"]} if args.quick else DTYPES
    vs = (32000, 128256) if args.quick else V_POINTS
    copy = copy_gbps(do_bench)  # graph-replayed too
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: copy {copy:.0f} GB/s; torch {torch.__version__}, triton {triton.__version__}", flush=True)
    table = {"forward": {}, "backward": {}, "step_hard": {}, "step_soft": {}, "forward_few": {}}
    lines = ["| dtype | V | pass | best tile | ms | % of copy | worst tile | worst % |", "|---|---|---|---|---|---|---|---|"]
    def current_tiles():
        """The forward/backward rows measured so far, in launch_config.measured_tiles' form."""
        return {p: {int(k): sorted(v) for k, v in by_size.items()} for p, by_size in table.items()
                if p in ("forward", "backward")}

    def time_few_rows(name, dtype, V):
        try:
            row, log = few_rows_row(dtype, V, do_bench, current_tiles)
        except Exception as e:  # a probe that fails must not cost the table what is already measured
            print(f"  {name} V={V} few rows: {type(e).__name__}: {e}", flush=True)
            return
        for line in log:
            print(f"{name} V={V:>6} {line}", flush=True)
        lines.append(f"| {name} | {V} | forward, few rows | {tuple(row[2:])} up to {row[1]} rows | - | - | - | - |")
        table["forward_few"].setdefault(str(torch.tensor([], dtype=dtype).element_size()), []).append(row)

    def time_point(name, dtype, V):
        """Every candidate tile of both passes at one (dtype, V); tensors are freed on return."""
        b = torch.tensor([], dtype=dtype).element_size()
        N = max(1024, TARGET_BYTES // (V * b))
        x = torch.randn(N, V, device="cuda", dtype=dtype) * 2
        y = torch.softmax(torch.randn(N, V, device="cuda"), -1).to(dtype)
        loss, lse, stats = torch.ops.xent_triton.forward(x, y, None, None, 1, -100, 0.0, 0.0, 0.0, False)
        g = torch.ones_like(loss)
        passes = {
            "forward": (lambda: xent_triton.softmax_cross_entropy_with_logits(y, x), 2 * N * V * b),
            "backward": (lambda: torch.ops.xent_triton.backward(
                g, x, y, None, None, stats, 1, -100, 0.0, 0.0, 0.0, True, False), 3 * N * V * b),
        }
        for pass_name, (fn, nbytes) in passes.items():
            timings = []
            for tile in FORWARD_CANDIDATES if pass_name == "forward" else CANDIDATES:
                lc.FORCE_TILE = tile
                try:
                    with torch.no_grad():
                        timings.append((do_bench(fn), tile))
                except Exception as e:  # a tile that does not compile or runs out of resources
                    print(f"  {name} V={V} {pass_name} {tile}: {type(e).__name__}: {e}", flush=True)
                finally:
                    lc.FORCE_TILE = None
            timings.sort()
            (ms, best), (worst_ms, worst) = timings[0], timings[-1]
            pct, worst_pct = (nbytes / t / 1e6 / copy * 100 for t in (ms, worst_ms))
            print(f"{name} V={V:>6} N={N:>6} {pass_name:>8}: best {best} {ms:.3f} ms ({pct:.0f}% of copy); "
                  f"worst {worst} ({worst_pct:.0f}%)", flush=True)
            lines.append(f"| {name} | {V} | {pass_name} | {best} | {ms:.3f} | {pct:.0f} | {worst} | {worst_pct:.0f} |")
            table[pass_name].setdefault(str(b), []).append([V, *best])
        del y, loss, lse, stats, g
        time_step(name, dtype, x, N, V, b)
        try:  # newer than the rest: a failure must not cost the table what is already measured
            time_step(name, dtype, x, N, V, b, kind="soft")
        except Exception as e:
            print(f"  {name} V={V} soft step: {type(e).__name__}: {e}", flush=True)

    def time_step(name, dtype, x, N, V, b, kind="hard"):
        """Training step with class indices (``kind`` "hard") or probabilities ("soft"): the two kernels
        against each fused-step candidate; a "step_hard" / "step_soft" row."""
        x = x.detach().requires_grad_()
        if kind == "hard":
            t = torch.randint(0, V, (N,), device="cuda")
        else:
            t = torch.softmax(torch.randn(N, V, device="cuda"), -1).to(dtype)
        floor = (2 if kind == "hard" else 3) * N * V * b  # the single-touch floor (ANCHORS.md)
        label = "step" if kind == "hard" else "soft step"

        def step():
            loss = xent_triton.cross_entropy(x, t, reduction="sum")
            torch.autograd.grad(loss, x)

        # The baseline runs the forward and backward tiles just measured, not the installed table or the
        # heuristic: on 2026-11-26 (H100) it ran the heuristic's untuned forward and the fused step "won"
        # by 2-16%, where the sweep with the tuned tiles then measured the two kernels 1.3-1.7x faster.
        installed = lc.measured_tiles
        timings = []
        try:  # the mode and the tiles go back as they were, whatever fails
            lc.measured_tiles = current_tiles
            os.environ[lc.FUSED_STEP_ENV] = "0"
            two_kernel_ms = do_bench(step)
            lc.measured_tiles = installed
            os.environ[lc.FUSED_STEP_ENV] = "1"
            for cand in STEP_CANDIDATES:
                lc.FORCE_STEP = cand
                try:
                    timings.append((do_bench(step), cand))
                except Exception as e:
                    print(f"  {name} V={V} {label} {cand}: {type(e).__name__}: {e}", flush=True)
        finally:
            lc.measured_tiles = installed
            lc.FORCE_STEP = None
            os.environ.pop(lc.FUSED_STEP_ENV, None)
        if not timings:
            print(f"  {name} V={V} {label}: no fused candidate ran; the two kernels stay", flush=True)
            table["step_" + kind].setdefault(str(b), []).append([V, 0, 0, 0])
            return
        timings.sort()
        (ms, best), (worst_ms, worst) = timings[0], timings[-1]
        pct = {k: floor / v / 1e6 / copy * 100 for k, v in (("two", two_kernel_ms), ("best", ms),
                                                             ("worst", worst_ms))}
        wins = ms < two_kernel_ms
        print(f"{name} V={V:>6} N={N:>6} {label:>9}: two kernels {two_kernel_ms:.3f} ms ({pct['two']:.0f}%); fused "
              f"best {best} {ms:.3f} ms ({pct['best']:.0f}%), worst {worst} ({pct['worst']:.0f}%)", flush=True)
        lines.append(f"| {name} | {V} | {label} (two kernels) | - | {two_kernel_ms:.3f} | {pct['two']:.0f} | - | - |")
        lines.append(f"| {name} | {V} | {label} (fused) | {best} | {ms:.3f} | {pct['best']:.0f} | {worst} | "
                     f"{pct['worst']:.0f} |")
        table["step_" + kind].setdefault(str(b), []).append([V] + (list(best) if wins else [0, 0, 0]))

    def write_table():
        """Write tiles.json from what is measured so far (a run cut short still leaves a usable table).

        A forward/backward tile measured at V covers the classes up to the next measured V, and the last
        one everything above; a step row covers V and below only.
        """
        out = copy_module.deepcopy(table)
        for pass_name, by_size in out.items():
            for rows in by_size.values():
                rows.sort()
                if pass_name.startswith("step"):
                    continue  # a step row covers V downwards only (launch_config._measured_step)
                for i in range(len(rows) - 1):
                    rows[i][0] = rows[i + 1][0] - 1
                rows[-1][0] = 2**31 - 1
        os.makedirs(args.out, exist_ok=True)
        meta = dict(gpu=gpu, date=datetime.date.today().isoformat(), torch=torch.__version__,
                    triton=triton.__version__, copy_gbps=round(copy), timing="cuda graph (device time)"
                    if not graph_failures else f"{len(graph_failures)} candidate(s) timed by do_bench: capture failed",
                    tiles=out)
        with open(os.path.join(args.out, "tiles.json"), "w") as f:
            json.dump(meta, f, indent=1)
        return meta

    for name, dtype in dtypes.items():
        for V in vs:
            time_point(name, dtype, V)
            time_few_rows(name, dtype, V)
            torch.cuda.empty_cache()
            meta = write_table()
    print(f"# Tiles measured on {gpu}, {meta['date']} (copy {copy:.0f} GB/s)\n")
    print("\n".join(lines))
    print(f"wrote {os.path.join(args.out, 'tiles.json')}: copy it to xent_triton/tiles.json to use it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
