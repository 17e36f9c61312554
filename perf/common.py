"""Small helpers the probes share (perf/rows_probe.py, perf/loop_ab.py, perf/split_probe.py,
perf/host_overhead.py)."""
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


def forward_error(loss, x, y, t, rows: int = 64) -> float:
    """Largest relative error (against max(|ref|, 1)) of the first ``rows`` per-row losses against float64
    torch: soft labels ``y``, or class indices ``t`` where ``y`` is None."""
    xd = x[:rows].double()
    if y is None:
        ref = torch.nn.functional.cross_entropy(xd, t[:rows], reduction="none")
    else:
        ref = -(y[:rows].double() * torch.log_softmax(xd, -1)).sum(-1)
    return ((loss[:rows].double() - ref).abs() / ref.abs().clamp_min(1)).max().item()


def probe_device():
    """(cuda, device) for a probe: the GPU if there is one; otherwise the CPU with the Triton interpreter
    turned on, which must happen before the kernels are first imported (triton.jit decides then)."""
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"
    return cuda, torch.device("cuda" if cuda else "cpu")
