"""Small helpers the perf tools share: row-by-row CSV files, the one copy-bandwidth measurement, device
choice, float64 checks, the package's custom ops called by argument name, and kernel arguments for
contiguous 2-D inputs (perf/loop_ab.py, perf/fused_step/).

Nothing here imports xent_triton at module level, so every tool's ``--help`` works while the package
does not import.

    python -m perf.common --copy     # print the copy bandwidth (GB/s) that every tool counts % of copy
                                     # against; perf/gpu_check.sh measures it once and exports it
"""
import argparse
import csv
import inspect
import os
import statistics
import struct
import sys
import time

import torch

COPY_ENV = "XENT_COPY_GBPS"  # set by perf/gpu_check.sh: one copy bandwidth for every stage of a run


# --------------------------------------------------------------------------------------------- CSV

class CsvRows:
    """A CSV file written as its rows arrive: the header goes out with the first row (or at once when
    ``fields`` is given), and the file is flushed after every row, so a tool stopped at its time cap
    keeps every row it measured. Keys a row lacks are left empty; keys beyond the header are dropped.

        with CsvRows(out_dir, "probe.csv") as out:
            out.write(dict(N=1, us=2.5))
    """

    def __init__(self, out_dir, name, fields=None):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, name)
        self.rows = []
        self._fh = open(self.path, "w", newline="")
        self._writer = None
        if fields:
            self._start(list(fields))

    def _start(self, fields):
        self._writer = csv.DictWriter(self._fh, fieldnames=fields, extrasaction="ignore")
        self._writer.writeheader()
        self._fh.flush()

    def write(self, row: dict):
        if self._writer is None:
            self._start(list(row))
        self._writer.writerow({k: _fmt(v) for k, v in row.items()})
        self._fh.flush()
        self.rows.append(row)

    def close(self):
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _fmt(v):
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.6g}"
    return "" if v is None else v


def write_csv(out_dir: str, name: str, rows) -> str:
    """Write a list of dicts (the first one's keys as the header) to out_dir/name at once; returns the path.
    (Tools that measure for long use CsvRows instead.)"""
    with CsvRows(out_dir, name) as out:
        for row in rows:
            out.write(row)
    return out.path


# --------------------------------------------------------------------------------------------- copy bandwidth

def measure_copy_gbps(device) -> float:
    """Device-to-device copy bandwidth, GB/s counting bytes read + written: ``dst.copy_(src)`` of 1 GiB
    (fp32), median of ``triton.testing.do_bench`` (warmup 25 ms, rep 100 ms; it flushes L2 before each
    call). This is the sweep's measurement, and the one every probe's "% of copy" uses: a copy replayed
    in a CUDA graph measured 1.23x less on the H100 and inflated the probes' percentages (issue 22).
    On the CPU: a 128 MiB copy, median of time.perf_counter over at least 5 calls."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    nbytes = (1 << 30) if cuda else (1 << 27)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    if cuda:
        from triton.testing import do_bench

        ms = float(do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median"))
    else:
        dst.copy_(src)
        times = []
        while len(times) < 5 or (sum(times) < 0.05 and len(times) < 200):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1e3
    return 2 * nbytes / (ms * 1e-3) / 1e9


def copy_gbps(device, log=print) -> float:
    """The copy bandwidth to count % of copy against: $XENT_COPY_GBPS where perf/gpu_check.sh measured
    it once for the whole run, else measure_copy_gbps now. ``log`` gets one line saying which."""
    env = os.environ.get(COPY_ENV, "").strip()
    if env:
        try:
            value = float(env)
            if value > 0:
                log(f"copy bandwidth {value:.0f} GB/s (from ${COPY_ENV}: measured once for this run by "
                    f"perf.common.measure_copy_gbps)")
                return value
        except ValueError:
            pass
        log(f"ignoring ${COPY_ENV}={env!r}: not a positive number")
    value = measure_copy_gbps(device)
    log(f"copy bandwidth {value:.0f} GB/s (perf.common.measure_copy_gbps, 1 GiB dst.copy_(src), do_bench median)")
    return value


# --------------------------------------------------------------------------------------------- device, checks

def probe_device():
    """(cuda, device) for a probe: the GPU if there is one; otherwise the CPU with the Triton interpreter
    turned on. That must happen before xent_triton and the kernels are first imported: the package reads
    TRITON_INTERPRET once, at its import, and triton.jit decides at each kernel's definition."""
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.pop("XENT_TRITON_BACKEND", None)
    return cuda, torch.device("cuda" if cuda else "cpu")


def forward_error(loss, x, y, t, rows: int = 64) -> float:
    """Largest relative error (against max(|ref|, 1)) of the first ``rows`` per-row losses against float64
    torch: soft labels ``y``, or class indices ``t`` where ``y`` is None."""
    xd = x[:rows].double()
    if y is None:
        ref = torch.nn.functional.cross_entropy(xd, t[:rows], reduction="none")
    else:
        ref = -(y[:rows].double() * torch.log_softmax(xd, -1)).sum(-1)
    return ((loss[:rows].double() - ref).abs() / ref.abs().clamp_min(1)).max().item()


def graph_ms(fn, rep: int = 50) -> float:
    """Device time of fn alone: triton.testing.do_bench_cudagraph, median ms (fn runs once first, outside
    the capture, so that compiling happens there)."""
    import triton

    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))


# --------------------------------------------------------------------------------------------- the package's ops

def call_op(name: str, **values):
    """torch.ops.xent_triton.<name> with its arguments bound by name from ``values`` (the op's schema
    says which it takes, in which order); an argument ``values`` lacks takes its schema default. Raises a
    clear error where the op, or a value for an argument without a default, is missing: the probes then
    say so instead of passing arguments by a position that moved."""
    try:
        op = getattr(torch.ops.xent_triton, name)
    except (AttributeError, RuntimeError) as e:
        raise RuntimeError(f"torch.ops.xent_triton.{name} does not exist ({e})") from None
    args, kwargs, by_name = [], {}, False
    for a in op.default._schema.arguments:
        if a.name in values:
            if by_name or a.kwarg_only:
                kwargs[a.name] = values[a.name]
            else:
                args.append(values[a.name])
        elif a.has_default_value():
            by_name = True  # this one keeps its default, so the later ones go by name
        else:
            raise RuntimeError(f"torch.ops.xent_triton.{name}: no value for argument {a.name!r} "
                               f"(schema: {op.default._schema})")
    return op(*args, **kwargs)


_OPTIONS = dict(axis=1, ignore_index=-100, label_smoothing=0.0, lse_square_scale=0.0, softcap=0.0)


def op_forward(x, labels=None, target=None, loss_fp32=True):
    """The package's forward on 2-D (N, V) logits, through its custom op: (loss, lse, stats), the last
    output being what op_backward takes."""
    return call_op("forward", logits=x, labels=labels, target=target, weight=None, loss_fp32=loss_fp32,
                   **_OPTIONS)


def op_backward(grad, x, labels, target, stats):
    """The package's backward alone (dlogits; no dlabels), through its custom op."""
    return call_op("backward", grad=grad, logits=x, labels=labels, target=target, weight=None, stats=stats,
                   need_dlogits=True, need_dlabels=False, **_OPTIONS)


# --------------------------------------------------------------------------------------------- kernel arguments

def hi_lo(v: float):
    """A float as fp32 hi + lo (kernels/row_math.f64_param)."""
    hi = struct.unpack("f", struct.pack("f", v))[0]
    return hi, v - hi


def slice_width(block: int, num_warps: int, itemsize: int) -> int:
    """EPT of the per-slice row loops (as xent_triton.launch_config.slice_width): one 16-byte vector per
    thread, or fewer elements where the block has fewer per thread."""
    return max(1, min(16 // itemsize, block // (32 * num_warps)))


def aligned_with(x, t) -> bool:
    """Whether contiguous ``t`` (same shape as contiguous ``x``) shares the logits rows' offset from a
    16-byte boundary (kernels/row_math.same_run): equal element sizes, bases a multiple of 16 bytes apart."""
    item = x.element_size()
    return t is not None and t.element_size() == item and 16 % item == 0 and (t.data_ptr() - x.data_ptr()) % 16 == 0


def row_kernel_args(x, labels=None, target=None, *, ignore_index=-100, smoothing=0.0, z_scale=0.0, softcap=0.0):
    """The arguments every row kernel takes (kernels/xent_forward.py's names), for contiguous 2-D (N, V)
    logits ``x`` with contiguous soft ``labels`` (N, V) or int64 class indices ``target`` (N,), no class
    weights, no vocabulary shard. Rows are addressed as (row // n_inner, row % n_inner) with n_inner 1."""
    import triton.language as tl

    assert x.dim() == 2 and x.is_contiguous(), "contiguous 2-D logits only"
    n, V = x.shape
    hard = target is not None
    if labels is not None:
        assert labels.shape == x.shape and labels.is_contiguous(), "contiguous labels of the logits' shape only"
    y = labels if labels is not None else x  # unused pointers get the logits: the flags compile them out
    t = target if hard else x
    return dict(
        X=x, sx_outer=x.stride(0), sx_inner=0, Y=y, sy_outer=y.stride(0), sy_inner=0,
        T=t, st_outer=t.stride(0) if hard else 0, st_inner=0, W=x,
        n_rows=n, n_inner=1, V=V, n_classes=V, class_offset=0, ignore_index=ignore_index,
        smoothing=hi_lo(smoothing)[0], smoothing_lo=hi_lo(smoothing)[1], z_scale=hi_lo(z_scale)[0],
        z_scale_lo=hi_lo(z_scale)[1], softcap=hi_lo(softcap)[0], softcap_lo=hi_lo(softcap)[1],
        HARD=hard, HAS_WEIGHT=False, SMOOTH=smoothing != 0.0, HAS_Z=z_scale != 0.0, SOFTCAP=softcap != 0.0,
        ACC=tl.float64 if x.dtype == torch.float64 else tl.float32,
        Y_ALIGNED=aligned_with(x, labels),
    )


def kernel_params(kernel):
    """Parameter names of a @triton.jit kernel (compiled or interpreted)."""
    names = getattr(kernel, "arg_names", None)
    if names:
        return list(names)
    return list(inspect.signature(kernel.fn).parameters)


def launch(kernel, grid, args: dict, **options):
    """kernel[grid] with every parameter passed by name from ``args`` (extra names are dropped);
    ``options`` are launch options (num_warps, num_stages). Raises, naming them, where parameters have
    no value: the kernel's signature changed under this tool."""
    params = kernel_params(kernel)
    missing = [p for p in params if p not in args]
    if missing:
        raise TypeError(f"{getattr(kernel, '__name__', kernel)}: no value for parameter(s) {missing}")
    return kernel[grid](**{p: args[p] for p in params}, **options)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copy", action="store_true", help="print the measured copy bandwidth (GB/s) alone")
    args = ap.parse_args(argv)
    if args.copy:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        print(f"{measure_copy_gbps(dev):.1f}")
        return 0
    ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
