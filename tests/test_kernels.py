"""Ahead-of-time compilation of the kernels for Hopper (sm_90), no GPU needed.

The Triton interpreter runs the kernels' logic on the CPU but not Triton's
compiler; this compiles the real GPU code (type checks, lowering, ptxas) for
each feature combination, so a variant that cannot compile fails in CI rather
than on the first GPU run. The launch table's tiles must also compile without
register spills, and with one register layout per tile.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent(r'''
    import json, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from xent_triton.kernels import (xent_forward_kernel, xent_combine_kernel, xent_backward_kernel,
                                    xent_rows_forward_kernel, xent_rows_backward_kernel)

    FLOATS = {"smoothing", "smoothing_lo", "z_scale", "z_scale_lo", "softcap", "softcap_lo"}

    def build(fn, ptrs, consts, num_warps, int_type="i32"):
        sig = {}
        for n in fn.arg_names:
            if n in consts:
                sig[n] = "constexpr"
            elif n in ptrs:
                sig[n] = ptrs[n]
            elif n in FLOATS:
                sig[n] = "fp32"
            else:
                sig[n] = int_type
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
        return len(k.asm["cubin"]), *resources(k.asm["cubin"]), *vectors(k.asm["ptx"]), tiles(k.asm["ttgir"])

    def tiles(ttgir):
        """Distinct 2-D register layouts of the kernel's tiles (Triton's TTGIR)."""
        import re
        return len(set(re.findall(r"^#\w+ = #ttg\.blocked<\{sizePerThread = \[\d+, \d+\].*$", ttgir, re.M)))

    def vectors(ptx):
        """Vector (.v2/.v4) global loads and stores, and 16-byte asynchronous copies, in the PTX."""
        import re
        ld = len(re.findall(r"ld\.global(?:\.[\w:]+)*\.v[24]\.", ptx))
        st = len(re.findall(r"st\.global(?:\.[\w:]+)*\.v[24]\.", ptx))
        cp = len(re.findall(r"cp\.async\.cg\.shared\.global(?:\.[\w:]+)* \[[^]]*\], \[[^]]*\], 0x10", ptx))
        return ld, st, cp

    def resources(cubin):
        """(local memory bytes, registers) per thread from cuobjdump; (None, None) where it is unavailable."""
        import os, re, subprocess, tempfile
        tool = os.path.join(os.path.dirname(triton.knobs.nvidia.ptxas.path), "cuobjdump")
        if not os.path.exists(tool):
            return None, None
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        local, regs = re.search(r"LOCAL:(\d+)", out), re.search(r"REG:(\d+)", out)
        return (int(local.group(1)) if local else None), (int(regs.group(1)) if regs else None)

    ACC = {"fp32": tl.float32, "fp64": tl.float64}
    cases = json.loads(sys.argv[1])
    for case in cases:
        kind, ptrs, consts, warps = case["kind"], case["ptrs"], dict(case["consts"]), case["warps"]
        if "ACC" in consts:
            consts["ACC"] = ACC[consts["ACC"]]
        fn = {"fwd": xent_forward_kernel, "combine": xent_combine_kernel, "bwd": xent_backward_kernel,
              "rows_fwd": xent_rows_forward_kernel,
              "rows_bwd": xent_rows_backward_kernel}[kind]
        size, local, regs, vld, vst, cp, layouts = build(fn, ptrs, consts, warps, case.get("ints", "i32"))
        print("compiled", kind, size, "regs", regs, "max", case.get("max_regs"), "vld", vld, "vst", vst,
              "stages", consts.get("STAGES"), "cp", cp, "tiles", layouts, "local", local, flush=True)
''')


def _fwd(x, y, acc, hard, extras, split=1, block=2048, warps=16, ints="i32", stages=1):
    ptrs = dict(X=f"*{x}", Y=f"*{y}", T="*i64", W=f"*{x}", LOSS=f"*{x}", LSE=f"*{acc}", STATS=f"*{acc}",
                PART=f"*{acc}")
    consts = dict(HARD=hard, HAS_WEIGHT=extras, SMOOTH=extras, HAS_Z=extras, SOFTCAP=extras, SPLIT=split,
                  Y_ALIGNED=x == y, BLOCK=block, EPT=_ept(x, block, warps), ACC=acc, STAGES=stages)
    return dict(kind="fwd", ptrs=ptrs, consts=consts, warps=warps, ints=ints)


def _ept(x, block, warps):
    from xent_triton.launch_config import slice_width
    return slice_width(block, warps, {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}[x])


def _bwd(x, y, acc, hard, extras, need_dy, block=2048, warps=16, divide=False):
    ptrs = dict(X=f"*{x}", Y=f"*{y}", T="*i32", W="*fp32", G="*fp32", DEN="*i64", STATS=f"*{acc}",
                DX=f"*{x}", DY=f"*{y}")
    consts = dict(HARD=hard, HAS_WEIGHT=extras, SMOOTH=extras, HAS_Z=extras, SOFTCAP=extras, NEED_DX=True,
                  NEED_DY=need_dy, DIVIDE=divide, Y_ALIGNED=x == y, DX_ALIGNED=True,
                  DY_ALIGNED=x == y, BLOCK=block, ACC=acc)
    return dict(kind="bwd", ptrs=ptrs, consts=consts, warps=warps)


def _rows(kind, x, y, acc, hard, extras, rows, block, warps, need_dy=False, max_regs=128, divide=False):
    ptrs = dict(X=f"*{x}", Y=f"*{y}", T="*i64", W="*fp32", LOSS="*fp32", LSE=f"*{acc}", STATS=f"*{acc}",
                G="*fp32", DEN="*fp32", DX=f"*{x}", DY=f"*{y}")
    consts = dict(HARD=hard, HAS_WEIGHT=extras, SMOOTH=extras, HAS_Z=extras, SOFTCAP=extras, ROWS=rows,
                  BLOCK=block, ACC=acc)
    if kind == "rows_bwd":
        consts.update(NEED_DX=True, NEED_DY=need_dy, DIVIDE=divide)
    return dict(kind=kind, ptrs=ptrs, consts=consts, warps=warps, max_regs=max_regs)


CASES = {
    "forward_soft_bf16": [_fwd("bf16", "bf16", "fp32", False, False)],
    "forward_soft_mixed_all_features": [_fwd("fp16", "fp32", "fp32", False, True, ints="i64")],
    "forward_hard_all_features": [_fwd("bf16", "bf16", "fp32", True, True)],
    "forward_hard_weight_only": [dict(_fwd("bf16", "bf16", "fp32", True, False),
                                      consts=dict(_fwd("bf16", "bf16", "fp32", True, False)["consts"],
                                                  HAS_WEIGHT=True))],
    # Class indices with label smoothing alone: q depends on no load (perf/NOTES.md P21); the same in the
    # row tiles, and the row tiles' plain class indices (which build no q).
    "forward_hard_smoothing_only": [dict(_fwd("bf16", "bf16", "fp32", True, False),
                                         consts=dict(_fwd("bf16", "bf16", "fp32", True, False)["consts"],
                                                     SMOOTH=True))],
    "row_tiles_hard_plain_and_smoothing": [
        _rows("rows_fwd", "bf16", "bf16", "fp32", True, False, 4, 1024, 16),
        dict(_rows("rows_fwd", "bf16", "bf16", "fp32", True, False, 4, 1024, 16),
             consts=dict(_rows("rows_fwd", "bf16", "bf16", "fp32", True, False, 4, 1024, 16)["consts"], SMOOTH=True))],
    "forward_split_and_combine": [
        _fwd("bf16", "bf16", "fp32", True, True, split=8),
        dict(kind="combine", ptrs=dict(T="*i64", W="*fp32", LOSS="*bf16", LSE="*fp32", STATS="*fp32",
                                       PART="*fp32"),
             consts=dict(HARD=True, HAS_WEIGHT=True, HAS_Z=True, SPLIT=8, SPLIT_P2=8, ACC="fp32"), warps=1)],
    "forward_fp64": [_fwd("fp64", "bf16", "fp64", False, True, block=512, warps=4)],
    "backward_soft_with_dlabels": [_bwd("bf16", "fp32", "fp32", False, False, True)],
    "backward_hard_all_features": [_bwd("bf16", "bf16", "fp32", True, True, False)],
    "backward_fp64": [_bwd("fp64", "fp64", "fp64", False, True, True, block=512, warps=4)],
    # A mean's backward: the upstream gradient divided by a device count or weight sum.
    "backward_of_a_mean": [_bwd("bf16", "bf16", "fp32", True, False, False, divide=True),
                           _bwd("fp64", "fp64", "fp64", False, True, True, block=512, warps=4, divide=True),
                           _rows("rows_bwd", "bf16", "bf16", "fp32", True, False, 4, 1024, 16, divide=True)],
    # The tiles launch_config.rows_launch picks: 2 x 1024 (V = 1000), 16 x 128, 128 x 2, all with 4 elements
    # per thread; fp64 with every feature is the heaviest.
    "row_tiles_soft_bf16": [_rows("rows_fwd", "bf16", "bf16", "fp32", False, False, 2, 1024, 16),
                            _rows("rows_bwd", "bf16", "bf16", "fp32", False, False, 2, 1024, 16)],
    "row_tiles_hard_all_features": [_rows("rows_fwd", "bf16", "bf16", "fp32", True, True, 16, 128, 16),
                                    _rows("rows_bwd", "bf16", "bf16", "fp32", True, True, 16, 128, 16)],
    "row_tiles_tiny_v_and_dlabels": [_rows("rows_fwd", "fp32", "fp16", "fp32", False, True, 128, 2, 2),
                                     _rows("rows_bwd", "fp32", "fp16", "fp32", False, True, 128, 2, 2, True),
                                     _rows("rows_bwd", "fp64", "fp64", "fp64", True, True, 128, 16, 16,
                                           max_regs=255)],
    # Pipelined loads (STAGES, perf/NOTES.md P17): the tuner's forward candidates.
    "pipelined_forward": [_fwd("bf16", "bf16", "fp32", False, False, block=1024, warps=4, stages=3),
                          _fwd("bf16", "bf16", "fp32", True, True, block=2048, warps=8, stages=4),
                          _fwd("fp32", "fp32", "fp32", False, True, block=1024, warps=8, stages=3)],
}


def _can_compile_for_cuda():
    try:
        from triton.backends import backends
        return "nvidia" in backends
    except Exception:
        return False


@pytest.mark.skipif(not _can_compile_for_cuda(), reason="triton's NVIDIA backend is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU every other test compiles and runs the kernels")
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_compiles_for_sm90(name):
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES[name])], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("compiled") == len(CASES[name])
    # No register spills (local memory); "None" where this triton ships no cuobjdump.
    spills = [line for line in r.stdout.splitlines() if "local" in line and not line.endswith(("local 0", "local None"))]
    assert not spills, spills
    for line in r.stdout.splitlines():
        words = line.split()
        # Register budgets (cases that set max_regs): more would cut the programs resident per SM.
        regs, limit = words[words.index("regs") + 1], words[words.index("max") + 1]
        assert limit == "None" or regs == "None" or int(regs) <= int(limit), line
        # The integer arguments are compiled with no divisibility known (as for V = 50257): the row
        # loops still load, and the backward still stores, whole blocks as vectors
        # (kernels/row_math.aligned_run).
        kind, vld, vst = words[1], int(words[words.index("vld") + 1]), int(words[words.index("vst") + 1])
        # STAGES > 1: the whole blocks' loads are 16-byte asynchronous copies into shared memory (the
        # software pipeline) instead of vector loads into registers; STAGES 1: none.
        stages, cp = words[words.index("stages") + 1], int(words[words.index("cp") + 1])
        pipelined = stages not in ("None", "1")
        assert (cp > 0) == pipelined, line
        if kind in ("fwd", "bwd"):
            assert vld > 0 or pipelined, line
        if kind == "bwd":
            assert vst > 0, line
        # One register layout for a block of columns. A second one means that part of the block's math
        # was computed apart from the logits' lanes and moved between layouts through shared memory
        # (class indices' q before perf/NOTES.md P21: 3 conversions per block of the row loop).
        assert int(words[words.index("tiles") + 1]) <= 1, line
