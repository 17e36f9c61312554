"""Small helpers the probes share (perf/rows_probe.py, perf/loop_ab.py, perf/host_overhead.py)."""
import csv
import os

import torch


def write_csv(out_dir: str, name: str, rows) -> str:
    """Write a list of dicts (the first one's keys as the header) to out_dir/name; returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def graph_copy_gbps(device) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second / 1e9) of a 512 MiB bf16 copy,
    replayed in a CUDA graph like the probes' kernels."""
    import triton

    src = torch.empty(2**28, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / triton.testing.do_bench_cudagraph(lambda: dst.copy_(src)) / 1e6
