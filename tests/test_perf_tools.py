"""The GPU tools' logic on the CPU, so that it fails here before it costs GPU time.

Without CUDA, perf/loop_ab.py and perf/split_probe.py run every configuration they would time through the
Triton interpreter and check it against float64 torch; perf/tune_tiles.py's few-row rule runs on scripted
timings."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the probes time kernels: perf/gpu_check.sh runs them")
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


@pytest.mark.parametrize("scenario", ["first_tile_until_one_row", "second_tile_everywhere", "split_wins"])
def test_few_rows_tuning_rule(scenario):
    """perf/tune_tiles.py's few-row rule: a tile must keep up with the split (within FEW_SLACK_US) at every
    row count up to the one it records, and the tile that does so longest wins. The forward runs for real
    (the interpreter here); a stand-in do_bench returns scripted device times."""
    sys.path.insert(0, ROOT)
    from perf.tune_tiles import FEW_SLACK_US, few_rows_row
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
        tile = lc.FORCE_TILE
        assert (lc.FORCE_SPLIT == 1) == (tile is not None)
        seen.append((n, tile))
        return (split if tile is None else scripted[n][(a, b).index(tile)]) / 1e3

    assert lc.forward_launch(1, 9000, 4, torch.device("cpu")).split > 1  # the baseline splits
    row, log = few_rows_row(torch.float32, 9000, fake_bench, lambda: {}, device="cpu", rows=(1, 2, 3),
                            candidates=[a, b], rotate_bytes=1)
    assert seen == [(n, t) for n in (1, 2, 3) for t in (None, a, b)]
    assert lc.FORCE_SPLIT is None and lc.FORCE_TILE is None
    expected = {"first_tile_until_one_row": [9000, 1, *a], "second_tile_everywhere": [9000, 3, *b],
                "split_wins": [9000, 0, *b]}[scenario]
    assert row == expected, log
