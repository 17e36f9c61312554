"""The GPU probes' CPU mode: without CUDA, perf/loop_ab.py and perf/split_probe.py run every configuration
they would time through the Triton interpreter and check it against float64 torch, so a configuration
that computes a wrong loss fails here before it costs GPU time."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the probes time the kernels: perf/gpu_check.sh runs them")
@pytest.mark.parametrize("module", ["perf.loop_ab", "perf.split_probe"])
def test_probe_checks_pass_on_the_interpreter(module, tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("XENT_TRITON_BACKEND", None)
    r = subprocess.run([sys.executable, "-m", module, "--out", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "0 check(s) failed" in r.stdout
    rows = (tmp_path / (module.split(".")[1] + ".csv")).read_text().splitlines()
    assert len(rows) > 6 and all(row.endswith(",ok") for row in rows[1:]), rows
