"""The launch table: heuristic tiles, a measured tiles.json, and the split rule."""
import json

import pytest
import torch

from xent_triton import launch_config as lc

CPU = torch.device("cpu")


@pytest.fixture
def tiles_file(tmp_path, monkeypatch):
    path = tmp_path / "tiles.json"
    monkeypatch.setattr(lc, "TILES_FILE", str(path))
    lc.measured_tiles.cache_clear()
    yield path
    lc.measured_tiles.cache_clear()


def test_heuristic_without_table(tiles_file):
    f = lc.forward_launch(4096, 128256, 2, CPU)
    assert (f.block, f.num_warps, f.split) == (2048, 16, 1)
    f = lc.forward_launch(4096, 128256, 4, CPU)
    assert (f.block, f.num_warps) == (1024, 8)
    small = lc.forward_launch(4096, 10, 2, CPU)
    assert small.block == 16 and small.num_warps == 1 and small.cols_per_prog == 16


def test_measured_table_is_used(tiles_file):
    tiles_file.write_text(json.dumps({"gpu": "test", "tiles": {
        "forward": {"2": [[40000, 4096, 8], [300000, 1024, 4]]},
        "backward": {"2": [[300000, 512, 2]]}}}))
    assert (lc.forward_launch(4096, 32000, 2, CPU).block, lc.forward_launch(4096, 32000, 2, CPU).num_warps) == (4096, 8)
    assert lc.forward_launch(4096, 128256, 2, CPU).block == 1024
    assert lc.backward_launch(4096, 128256, 2, CPU).num_warps == 2
    assert lc.forward_launch(4096, 128256, 4, CPU).block == 1024  # fp32 not in the table: heuristic
    # A block never exceeds the row's next power of two.
    assert lc.forward_launch(4096, 1000, 2, CPU).block == 1024


@pytest.mark.parametrize("n_rows,n_cols", [(1, 128256), (3, 9000), (64, 256000), (4096, 256000)])
def test_split_parts_cover_the_row(n_rows, n_cols):
    f = lc.forward_launch(n_rows, n_cols, 2, CPU)
    assert f.cols_per_prog % f.block == 0
    assert (f.split - 1) * f.cols_per_prog < n_cols <= f.split * f.cols_per_prog
