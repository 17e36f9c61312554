"""The GPU tools' logic on the CPU, so that it fails here before it costs GPU time.

Without CUDA, perf/loop_ab.py, perf/split_probe.py and perf/fused_step/probe.py run every configuration
they would time through the Triton interpreter and check it against float64 torch; perf/tune_tiles.py's
few-row rule runs on scripted timings and its tiles.json merge on made-up tables; perf/gpu_check.sh's
stage caps are summed for the invocations the GPU sessions use."""
import csv
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

no_cuda = pytest.mark.skipif(torch.cuda.is_available(),
                             reason="on a GPU the probes time kernels: perf/gpu_check.sh runs them")


def _run_probe(module, out):
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("XENT_TRITON_BACKEND", None)
    env.pop("XENT_COPY_GBPS", None)
    r = subprocess.run([sys.executable, "-m", module, "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "0 check(s) failed" in r.stdout
    return r


@no_cuda
@pytest.mark.parametrize("module", ["perf.loop_ab", "perf.split_probe"])
def test_probe_checks_pass_on_the_interpreter(module, tmp_path):
    _run_probe(module, tmp_path)
    rows = (tmp_path / (module.split(".")[1] + ".csv")).read_text().splitlines()
    assert len(rows) > 6 and all(row.endswith(",ok") for row in rows[1:]), rows


@no_cuda
def test_fused_step_matches_float64_on_the_interpreter(tmp_path):
    """perf/fused_step: the kernel that left the package still computes the loss and dlogits of a
    training step (class indices with ignored rows and smoothing, probabilities; several rows per
    persistent program; pipelined and not)."""
    _run_probe("perf.fused_step.probe", tmp_path)
    with open(tmp_path / "fused_step.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 5 and all(r["check"] == "ok" for r in rows), rows
    assert {r["labels"] for r in rows} == {"hard", "soft", "hard_smooth"}


def test_csv_rows_are_on_disk_as_they_arrive(tmp_path):
    """A tool stopped at its cap keeps every row it wrote (perf.common.CsvRows flushes each)."""
    from perf.common import CsvRows

    out = CsvRows(str(tmp_path), "t.csv")
    out.write(dict(a=1, b=0.5))
    out.write(dict(a=2, c="dropped"))
    assert (tmp_path / "t.csv").read_text().splitlines() == ["a,b", "1,0.5", "2,"]
    out.close()


def test_ops_by_name_match_torch():
    """perf.common.op_forward / op_backward: the package's custom ops, arguments bound by schema name."""
    from perf.common import op_backward, op_forward

    x = torch.randn(5, 37, dtype=torch.float64)
    t = torch.randint(0, 37, (5,))
    g = torch.rand(5, dtype=torch.float64)
    out = op_forward(x, None, t)
    ref = torch.nn.functional.cross_entropy(x, t, reduction="none")
    torch.testing.assert_close(out[0], ref)
    dx = op_backward(g, x, None, t, out[-1])[0]
    ref_dx = (torch.softmax(x, -1) - torch.nn.functional.one_hot(t, 37)) * g[:, None]
    torch.testing.assert_close(dx, ref_dx)


@pytest.mark.parametrize("flags", [[], ["--no-tests", "--no-sweep", "--fused", "--host", "--ab"]],
                         ids=["default", "next_gpu_session_second_call"])
def test_gpu_check_fits_its_budget(flags):
    """perf/gpu_check.sh: the stage caps of the two calls the next GPU session runs (its header), install,
    environment and summary included, sum to at most 480 s; the first has the tests and the sweep."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_TIMEOUT_S") and k != "BUDGET_S"}
    r = subprocess.run(["bash", os.path.join(ROOT, "perf", "gpu_check.sh"), "--caps", *flags], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    total = int(re.search(r"cap sum: (\d+) s", r.stdout).group(1))
    caps = [int(m) for m in re.findall(r"^\s+(\d+)\s+\S", r.stdout, re.M)]
    assert total == sum(caps) and total <= 480, r.stdout
    if not flags:
        assert re.search(r"^\s+\d+\s+perf\.sweep --quick$", r.stdout, re.M), r.stdout
        assert re.search(r"^\s+\d+\s+pytest on CUDA$", r.stdout, re.M), r.stdout
    header = open(os.path.join(ROOT, "perf", "gpu_check.sh")).read().split("set -uo pipefail")[0]
    if flags:
        assert f'command="bash perf/gpu_check.sh {" ".join(flags)}", carry=[".whl"]' in header
    else:
        assert 'command="bash perf/gpu_check.sh", carry=[".whl"]' in header


def test_tiles_json_merge_keeps_other_cards():
    """perf/tune_tiles.py writes one table per (card, Triton minor version), keeping the others."""
    from perf.tune_tiles import merge_tables

    def table(gpu, triton, block):
        return dict(gpu=gpu, capability=[9, 0], triton=triton, date="d", torch="t", copy_gbps=1, note="",
                    tiles={"forward": {"2": [[2**31 - 1, block, 4, 1]]}})

    merged = merge_tables({"tables": [table("H100", "3.6", 1024), table("H200", "3.6", 2048),
                                      table("H100", "3.9", 512)]}, table("H100", "3.6.1", 4096))
    assert [(t["gpu"], t["triton"], t["tiles"]["forward"]["2"][0][1]) for t in merged["tables"]] == [
        ("H200", "3.6", 2048), ("H100", "3.9", 512), ("H100", "3.6.1", 4096)]
    old = {"gpu": "H100", "triton": "3.6.0", "tiles": {"forward": {}}}  # the format before issue 22
    assert [t["gpu"] for t in merge_tables(old, table("H200", "3.6", 1))["tables"]] == ["H100", "H200"]
    assert [t["gpu"] for t in merge_tables(old, table("H100", "3.6", 1))["tables"]] == ["H100"]
    assert merge_tables(None, table("H100", "3.6", 1))["tables"][0]["tiles"]["forward"]["2"][0][1] == 1


@pytest.mark.parametrize("scenario", ["first_tile_until_one_row", "second_tile_everywhere", "split_wins"])
def test_few_rows_tuning_rule(scenario):
    """perf/tune_tiles.py's few-row rule: a tile must keep up with the split (within FEW_SLACK_US) at every
    row count up to the one it records, and the tile that does so longest wins. The forward runs for real
    (the interpreter here); a stand-in do_bench returns scripted device times."""
    from perf.tune_tiles import FEW_SLACK_US, few_rows_row
    from xent_triton import config
    from xent_triton import launch_config as lc

    a, b = (256, 1, 3), (512, 2, 1)
    split = 10.0
    scripted = {  # us by rows, for tiles a and b; the split takes 10 us everywhere
        "first_tile_until_one_row": {1: (split + FEW_SLACK_US, 13.0), 2: (30.0, 11.0), 3: (10.0, 20.0)},
        "second_tile_everywhere": {1: (11.0, 12.0), 2: (30.0, 11.0), 3: (10.0, 12.0)},
        "split_wins": {1: (13.0, 12.5), 2: (10.0, 10.0), 3: (10.0, 10.0)},
    }[scenario]
    seen = []

    def fake_bench(fn):
        out = fn()
        n = out.shape[0]
        assert torch.isfinite(out).all()
        cfg = config.current()
        assert (cfg.split == 1) == (cfg.tile is not None)
        seen.append((n, cfg.tile))
        return (split if cfg.tile is None else scripted[n][(a, b).index(cfg.tile)]) / 1e3

    before = config.current()
    assert lc.forward_launch(1, 9000, 4, torch.device("cpu")).split > 1  # the baseline splits
    row, log = few_rows_row(torch.float32, 9000, fake_bench, None, device="cpu", rows=(1, 2, 3),
                            candidates=[a, b], rotate_bytes=1)
    assert seen == [(n, t) for n in (1, 2, 3) for t in (None, a, b)]
    assert config.current() == before
    expected = {"first_tile_until_one_row": [9000, 1, *a], "second_tile_everywhere": [9000, 3, *b],
                "split_wins": [9000, 0, *b]}[scenario]
    assert row == expected, log
