"""Measure the (BLOCK, num_warps) tile of each kernel pass on this GPU and write tiles.json.

    python -m perf.tune_tiles --out $OUT            # ~4 min on an H100: 2 dtypes x 4 V x 9 tiles x 2 passes
    python -m perf.tune_tiles --quick --out $OUT    # bf16 only, 2 V

For each element size (bf16, fp32), class count V and pass (forward of the soft loss, backward of the soft
loss), every candidate tile is timed with triton.testing.do_bench (median) at N rows chosen so that one
tensor holds about 512 MiB (large enough that no row is split and the data is far past L2). The fastest
tile per (pass, element size, V) becomes a row of the table that xent_triton/launch_config.py reads
(copy the written tiles.json to xent_triton/tiles.json and commit it with the card named in it). Results
are also printed as % of the copy bandwidth measured in the same run, on the byte model of
../shared/ANCHORS.md (forward 2NVb, backward 3NVb).
"""
import argparse
import datetime
import json
import os
import sys

import torch

CANDIDATES = [(b, w) for b in (1024, 2048, 4096) for w in (4, 8, 16)]
V_POINTS = (4096, 32000, 128256, 256000)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TARGET_BYTES = 512 * 2**20


def copy_gbps(do_bench):
    src = torch.empty(2**30 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


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

    def do_bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    dtypes = {"bf16": DTYPES["bf16"]} if args.quick else DTYPES
    vs = (32000, 128256) if args.quick else V_POINTS
    copy = copy_gbps(do_bench)
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: copy {copy:.0f} GB/s; torch {torch.__version__}, triton {triton.__version__}", flush=True)
    table = {"forward": {}, "backward": {}}
    lines = ["| dtype | V | pass | best tile | ms | % of copy | worst tile | worst % |", "|---|---|---|---|---|---|---|---|"]
    def time_point(name, dtype, V):
        """Every candidate tile of both passes at one (dtype, V); tensors are freed on return."""
        b = torch.tensor([], dtype=dtype).element_size()
        N = max(1024, TARGET_BYTES // (V * b))
        x = torch.randn(N, V, device="cuda", dtype=dtype) * 2
        y = torch.softmax(torch.randn(N, V, device="cuda"), -1).to(dtype)
        loss, lse, qsum = torch.ops.xent_triton.forward(x, y, None, None, 1, -100, 0.0, 0.0, 0.0, False)
        g = torch.ones_like(loss)
        passes = {
            "forward": (lambda: xent_triton.softmax_cross_entropy_with_logits(y, x), 2 * N * V * b),
            "backward": (lambda: torch.ops.xent_triton.backward(
                g, x, y, None, None, lse, qsum, 1, -100, 0.0, 0.0, 0.0, True, False), 3 * N * V * b),
        }
        for pass_name, (fn, nbytes) in passes.items():
            timings = []
            for tile in CANDIDATES:
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
            table[pass_name].setdefault(str(b), []).append([V, best[0], best[1]])

    for name, dtype in dtypes.items():
        for V in vs:
            time_point(name, dtype, V)
            torch.cuda.empty_cache()
    # Each measured V covers the classes up to the next measured V; the last one covers everything above.
    for by_size in table.values():
        for rows in by_size.values():
            rows.sort()
            for i in range(len(rows) - 1):
                rows[i][0] = rows[i + 1][0] - 1
            rows[-1][0] = 2**31 - 1
    os.makedirs(args.out, exist_ok=True)
    meta = dict(gpu=gpu, date=datetime.date.today().isoformat(), torch=torch.__version__,
                triton=triton.__version__, copy_gbps=round(copy), tiles=table)
    with open(os.path.join(args.out, "tiles.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"# Tiles measured on {gpu}, {meta['date']} (copy {copy:.0f} GB/s)\n")
    print("\n".join(lines))
    print(f"wrote {os.path.join(args.out, 'tiles.json')}: copy it to xent_triton/tiles.json to use it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
