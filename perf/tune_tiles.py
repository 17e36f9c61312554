"""Measure the (BLOCK, num_warps, stages) tile of each kernel pass on this GPU and write tiles.json.

    python -m perf.tune_tiles --out $OUT            # ~3-5 min on an H100: 2 dtypes x 4 V x (18 + 9 tiles
                                                    # + 4 x 5 few-row forwards); tiles.json is rewritten
                                                    # after every V, tune_tiles.csv after every timing
    python -m perf.tune_tiles --quick --out $OUT    # bf16 only, 2 V
    python -m perf.tune_tiles --out $OUT --merge xent_triton/tiles.json   # keep the shipped file's other cards

For each element size (bf16, fp32), class count V and pass (forward of the soft loss, backward of the soft
loss), every candidate tile is timed at N rows chosen so that one tensor holds about 512 MiB (large enough
that no row is split and the data is far past L2), replayed in a CUDA graph
(triton.testing.do_bench_cudagraph, median): device time alone. Timed with plain do_bench, a step at
these sizes measured the host's ~1 ms per call on the H100 machine, not the kernels (perf/NOTES.md P17);
where a capture fails, the candidate falls back to do_bench and the log says so. The fastest tile per
(pass, element size, V) becomes a row of the table that xent_triton/launch_config.py reads. Results are
also printed as % of the copy bandwidth every perf tool uses (perf.common.copy_gbps), on the byte model of
../shared/ANCHORS.md (forward 2NVb, backward 3NVb). A "forward_few" row records, per V, up to how many
rows (of FEW_ROWS, all below the split rule's 2 x SMs) one pipelined program per row kept up with the
split and its combine launch on the device, and with which tile (few_rows_row; perf/NOTES.md P18); the
forward then skips the split there. The fused step is no longer tuned: it left the package
(perf/fused_step/, which times it).

tiles.json holds one table per (card, Triton minor version); the package uses the table whose "gpu"
(torch.cuda.get_device_name()) and "triton" (major.minor) match its own:

    {"tables": [{"gpu": ..., "capability": [9, 0], "triton": "3.6", "date", "torch", "copy_gbps", "note",
                 "tiles": {"forward": {itemsize: [[max_cols, block, warps, stages], ...]}, "backward": ...,
                           "forward_few": {itemsize: [[max_cols, max_rows, block, warps, stages], ...]}}}]}

This tool writes one table; with --merge PATH the other tables of PATH are kept and the one of this card and
Triton version replaced. Copy the written file to xent_triton/tiles.json and commit it.
"""
import argparse
import copy as copy_module
import datetime
import itertools
import json
import os
import sys

import torch

from .common import CsvRows, copy_gbps

CANDIDATES = [(b, w) for b in (1024, 2048, 4096) for w in (4, 8, 16)]
# The forward's candidates also try pipelined loads (kernels/xent_forward._row_partial, STAGES).
FORWARD_CANDIDATES = [(b, w, s) for b, w in CANDIDATES for s in (1, 3)]
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
CSV_FIELDS = ["gpu", "dtype", "V", "N", "pass", "tile", "config", "ms", "us", "pct_of_copy", "copy_gbps", "note"]


def triton_minor(version: str) -> str:
    """'3.6.0' -> '3.6': the part of Triton's version a table is keyed by."""
    return ".".join(str(version).split(".")[:2])


def merge_tables(existing, table: dict) -> dict:
    """tiles.json content with ``table`` in it: ``existing`` (the parsed content of a tiles.json, or None)
    keeps its tables of other cards or Triton versions, and loses the one of table's card and version. A
    file in the format before issue 22 (one table at the top level) counts as one table."""
    tables = []
    if existing:
        if "tables" in existing:
            tables = list(existing["tables"])
        elif "tiles" in existing:
            old = dict(existing)
            old["triton"] = triton_minor(old.get("triton", ""))
            old.setdefault("capability", None)
            tables = [old]
    key = (table["gpu"], triton_minor(table["triton"]))
    kept = [t for t in tables if (t.get("gpu"), triton_minor(t.get("triton", ""))) != key]
    return {"tables": kept + [table]}


def few_rows_row(dtype, V, do_bench, baseline_tile, device="cuda", rows=FEW_ROWS, candidates=FEW_CANDIDATES,
                 rotate_bytes=FEW_ROTATE_BYTES, record=None):
    """The soft forward at few rows: the split rule (with ``baseline_tile``, the forward tile measured for
    this V, or None: the package's own choice) against one program per row with each candidate tile, every
    call timed by ``do_bench`` (ms). Forcing a tile also keeps any "forward_few" row of the installed table
    out of the baseline. Returns the "forward_few" row [V, max_rows, block, num_warps, stages] of the
    candidate that kept up (within FEW_SLACK_US) at the most row counts, max_rows being the largest count
    up to which it never fell behind (0: the split won already at the fewest rows), and the log lines.
    ``record`` gets a dict per timing (N, config, tile, us)."""
    import xent_triton
    from xent_triton import config

    kept = {cand: 0 for cand in candidates}  # the largest N up to which the candidate kept up
    total = {cand: 0.0 for cand in candidates}
    log = []
    record = record or (lambda row: None)
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
            with config.overrides(tile=baseline_tile):
                split_us = do_bench(fwd) * 1e3
            record(dict(N=N, config="split rule", tile=baseline_tile, us=split_us))
            times = []
            for cand in candidates:
                try:
                    with config.overrides(split=1, tile=cand):
                        us = do_bench(fwd) * 1e3
                except Exception as e:  # a tile that does not compile or runs out of resources
                    log.append(f"N={N} one program per row {cand}: {type(e).__name__}: {e}")
                    us = float("inf")
                record(dict(N=N, config="one program per row", tile=cand, us=us))
                if us <= split_us + FEW_SLACK_US and kept[cand] == (rows[i - 1] if i else 0):
                    kept[cand] = N
                total[cand] += us
                times.append(f"{cand} {us:.1f}")
        log.append(f"N={N:>4} few rows: split {split_us:.1f} us; one program per row: " + ", ".join(times))
        del x, y, copies
    best = max(candidates, key=lambda c: (kept[c], -total[c]))
    log.append(f"few rows: {best} up to {kept[best]} rows (0: the split stays)")
    return [V, kept[best], *best], log


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m perf.tune_tiles", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".", help="folder for tiles.json and tune_tiles.csv")
    ap.add_argument("--quick", action="store_true", help="bf16 only, V in (32000, 128256)")
    ap.add_argument("--merge", metavar="TILES_JSON",
                    help="a tiles.json whose tables of other cards / Triton versions the written file keeps")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_tiles: no CUDA GPU found; nothing to tune (the table only matters on a GPU)")
        return 0
    import triton

    import xent_triton
    from xent_triton import config

    from .common import op_backward, op_forward

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

    existing = None
    if args.merge and os.path.isfile(args.merge):
        with open(args.merge) as f:
            existing = json.load(f)
    dtypes = {"bf16": DTYPES["bf16"]} if args.quick else DTYPES
    vs = (32000, 128256) if args.quick else V_POINTS
    dev = torch.device("cuda")
    copy = copy_gbps(dev)
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: torch {torch.__version__}, triton {triton.__version__}", flush=True)
    table = {"forward": {}, "backward": {}, "forward_few": {}}
    best_forward = {}  # (itemsize, V) -> the forward's best tile: the few-row baseline
    lines = ["| dtype | V | pass | best tile | ms | % of copy | worst tile | worst % |", "|---|---|---|---|---|---|---|---|"]
    csv_out = CsvRows(args.out, "tune_tiles.csv", CSV_FIELDS)

    def record(name, V, N, pass_name, **row):
        tile = row.get("tile")
        csv_out.write(dict(gpu=gpu, dtype=name, V=V, N=N, copy_gbps=copy, **{"pass": pass_name},
                           **dict(row, tile="-" if tile is None else "/".join(map(str, tile)))))

    def time_few_rows(name, dtype, V):
        b = torch.tensor([], dtype=dtype).element_size()
        try:
            row, log = few_rows_row(dtype, V, do_bench, best_forward.get((b, V)),
                                    record=lambda r: record(name, V, r.pop("N"), "forward, few rows", **r))
        except Exception as e:  # a probe that fails must not cost the table what is already measured
            print(f"  {name} V={V} few rows: {type(e).__name__}: {e}", flush=True)
            return
        for line in log:
            print(f"{name} V={V:>6} {line}", flush=True)
        lines.append(f"| {name} | {V} | forward, few rows | {tuple(row[2:])} up to {row[1]} rows | - | - | - | - |")
        table["forward_few"].setdefault(str(b), []).append(row)

    def time_point(name, dtype, V):
        """Every candidate tile of both passes at one (dtype, V); tensors are freed on return."""
        b = torch.tensor([], dtype=dtype).element_size()
        N = max(1024, TARGET_BYTES // (V * b))
        x = torch.randn(N, V, device="cuda", dtype=dtype) * 2
        y = torch.softmax(torch.randn(N, V, device="cuda"), -1).to(dtype)
        g = torch.ones(N, device="cuda")
        stats = op_forward(x, y)[-1]
        passes = {
            "forward": (lambda: xent_triton.softmax_cross_entropy_with_logits(y, x), 2 * N * V * b),
            "backward": (lambda: op_backward(g, x, y, None, stats), 3 * N * V * b),
        }
        for pass_name, (fn, nbytes) in passes.items():
            timings = []
            for tile in FORWARD_CANDIDATES if pass_name == "forward" else CANDIDATES:
                note = ""
                try:
                    with torch.no_grad(), config.overrides(tile=tile):
                        ms = do_bench(fn)
                    timings.append((ms, tile))
                except Exception as e:  # a tile that does not compile or runs out of resources
                    ms, note = float("nan"), f"{type(e).__name__}: {str(e)[:160]}"
                    print(f"  {name} V={V} {pass_name} {tile}: {note}", flush=True)
                record(name, V, N, pass_name, tile=tile, config="forced tile", ms=ms, us=ms * 1e3,
                       pct_of_copy=nbytes / ms / 1e6 / copy * 100, note=note)
            if not timings:
                print(f"  {name} V={V} {pass_name}: no tile ran; no row", flush=True)
                continue
            timings.sort()
            (ms, best), (worst_ms, worst) = timings[0], timings[-1]
            pct, worst_pct = (nbytes / t / 1e6 / copy * 100 for t in (ms, worst_ms))
            print(f"{name} V={V:>6} N={N:>6} {pass_name:>8}: best {best} {ms:.3f} ms ({pct:.0f}% of copy); "
                  f"worst {worst} ({worst_pct:.0f}%)", flush=True)
            lines.append(f"| {name} | {V} | {pass_name} | {best} | {ms:.3f} | {pct:.0f} | {worst} | {worst_pct:.0f} |")
            table[pass_name].setdefault(str(b), []).append([V, *best])
            if pass_name == "forward":
                best_forward[(b, V)] = best

    def write_table():
        """Write tiles.json from what is measured so far (a run cut short still leaves a usable table).

        A forward/backward tile measured at V covers the classes up to the next measured V, and the last
        one everything above; a forward_few row likewise.
        """
        out = copy_module.deepcopy(table)
        for by_size in out.values():
            for rows in by_size.values():
                rows.sort()
                for i in range(len(rows) - 1):
                    rows[i][0] = rows[i + 1][0] - 1
                rows[-1][0] = 2**31 - 1
        timing = ("CUDA graph replay (device time)" if not graph_failures
                  else f"{len(graph_failures)} candidate(s) timed by do_bench: capture failed")
        entry = dict(gpu=gpu, capability=list(torch.cuda.get_device_capability()),
                     triton=triton_minor(triton.__version__), date=datetime.date.today().isoformat(),
                     torch=torch.__version__, copy_gbps=round(copy),
                     note=f"perf/tune_tiles.py{' --quick' if args.quick else ''}, triton {triton.__version__}; "
                          f"{timing}", tiles=out)
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "tiles.json")
        with open(path + ".tmp", "w") as f:
            json.dump(merge_tables(existing, entry), f, indent=1)
        os.replace(path + ".tmp", path)  # never a half-written file, whenever the run is stopped
        return entry

    failures = 0
    try:
        for name, dtype in dtypes.items():
            for V in vs:
                try:
                    time_point(name, dtype, V)
                except Exception as e:  # one V that fails must not cost the others
                    failures += 1
                    print(f"  {name} V={V}: {type(e).__name__}: {e}", flush=True)
                time_few_rows(name, dtype, V)
                torch.cuda.empty_cache()
                entry = write_table()
    finally:
        csv_out.close()
    print(f"# Tiles measured on {gpu}, {entry['date']} (copy {copy:.0f} GB/s)\n")
    print("\n".join(lines))
    print(f"wrote {os.path.join(args.out, 'tiles.json')} and tune_tiles.csv: copy tiles.json to "
          f"xent_triton/tiles.json to use it" + (f"; {failures} (dtype, V) point(s) failed" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
