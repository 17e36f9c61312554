"""What ``import xent_triton`` adds to ``import torch``, in fresh interpreters (CPU; no GPU needed).

Each run is a new process that imports torch, then times ``import xent_triton`` alone, and lists the heavy
modules the import brought in (triton, torch._dynamo, torch._inductor: tests/test_import.py asserts there
are none). The target is at most 0.1 s, best of ``--runs``.

    python -m perf.import_time [--runs 5] [--out DIR]
"""
import argparse
import json
import os
import subprocess
import sys

from .common import write_csv

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import xent_triton
t2 = time.perf_counter()
heavy = sorted(m for m in ("triton", "torch._dynamo", "torch._inductor") if m in sys.modules)
print(json.dumps(dict(torch_s=t1 - t0, xent_triton_s=t2 - t1, heavy=heavy)))
"""


def measure(runs: int):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "XENT_TRITON_BACKEND")}
    rows = []
    for i in range(runs):
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(dict(run=i, torch_s=round(r["torch_s"], 4), xent_triton_s=round(r["xent_triton_s"], 4),
                         heavy=" ".join(r["heavy"]) or "-"))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=None, help="directory for import_time.csv")
    args = ap.parse_args(argv)
    rows = measure(args.runs)
    for r in rows:
        print(r)
    best = min(r["xent_triton_s"] for r in rows)
    print(f"import xent_triton after torch: best {best:.3f} s of {args.runs} (target <= 0.100 s)")
    if args.out:
        print("wrote", write_csv(args.out, "import_time.csv", rows))


if __name__ == "__main__":
    main()
