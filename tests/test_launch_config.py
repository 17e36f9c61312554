"""The launch table: heuristic tiles, a measured tiles.json, and the split rule."""
import json

import pytest
import torch

from xent_triton import launch_config as lc, prepare
from helpers import set_config

CPU = torch.device("cpu")


class TilesFile:
    """tiles.json in a test's folder; ``write(tiles)`` stores the table for the CPU (and this machine's GPU)
    under this Triton (and may add tables for others)."""

    def __init__(self, path):
        self.path = path

    def write(self, tiles, gpu=None, triton=None, others=()):
        # The tests' launches are chosen for CPU tensors, and for the GPU's where there is one.
        names = [gpu] if gpu else sorted({lc.device_name(CPU), lc.device_name(_device())})
        tables = [{"gpu": name, "triton": triton or lc.triton_minor(), "tiles": tiles} for name in names]
        tables += others
        self.path.write_text(json.dumps({"tables": tables}))
        lc.reload_tiles()


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else CPU


@pytest.fixture
def tiles_file(tmp_path, monkeypatch):
    path = tmp_path / "tiles.json"
    monkeypatch.setattr(lc, "TILES_FILE", str(path))
    lc.reload_tiles()
    prepare.clear_cache()
    yield TilesFile(path)
    lc.reload_tiles()
    prepare.clear_cache()


def test_heuristic_without_table(tiles_file):
    tiles_file.write({})
    f = lc.forward_launch(4096, 128256, 2, CPU)
    assert (f.block, f.num_warps, f.split, f.stages) == (2048, 16, 1, 1)
    f = lc.forward_launch(4096, 128256, 4, CPU)
    assert (f.block, f.num_warps) == (1024, 8)
    small = lc.forward_launch(4096, 10, 2, CPU)
    assert small.block == 16 and small.num_warps == 1 and small.cols_per_prog == 16


def test_measured_table_is_used(tiles_file):
    tiles_file.write({"forward": {"2": [[40000, 4096, 8], [300000, 1024, 4]]},
                      "backward": {"2": [[300000, 512, 2]]}})
    assert (lc.forward_launch(4096, 32000, 2, CPU).block, lc.forward_launch(4096, 32000, 2, CPU).num_warps) == (4096, 8)
    assert lc.forward_launch(4096, 128256, 2, CPU).block == 1024
    assert lc.backward_launch(4096, 128256, 2, CPU).num_warps == 2
    assert lc.forward_launch(4096, 128256, 4, CPU).block == 1024  # fp32 not in the table: heuristic
    # A block never exceeds the row's next power of two.
    assert lc.forward_launch(4096, 1000, 2, CPU).block == 1024
    # Rows written before stages were tuned: no pipelining.
    assert lc.forward_launch(4096, 32000, 2, CPU).stages == 1


def test_stages_from_the_table(tiles_file):
    tiles_file.write({"forward": {"2": [[40000, 1024, 4, 3], [300000, 2048, 8]]}})
    assert lc.forward_launch(4096, 32000, 2, CPU).stages == 3
    assert lc.forward_launch(4096, 128256, 2, CPU).stages == 1


def test_table_keyed_by_device_and_triton(tiles_file):
    """A table measured on another GPU, or with another Triton minor version, does not apply: the heuristic
    does."""
    heuristic = lc.forward_launch(4096, 32000, 2, CPU)
    table = {"forward": {"2": [[300000, 512, 2, 3]]}}
    tiles_file.write({}, others=[{"gpu": "Some Other GPU", "triton": lc.triton_minor(), "tiles": table},
                                 {"gpu": lc.device_name(CPU), "triton": "2.0", "tiles": table}])
    assert lc.forward_launch(4096, 32000, 2, CPU) == heuristic
    tiles_file.write(table)
    assert lc.forward_launch(4096, 32000, 2, CPU).block == 512


def test_new_table_reaches_prepared_calls(tiles_file, monkeypatch):
    """reload_tiles renews the configuration, so a call prepared with the old tiles is prepared again."""
    set_config(monkeypatch, backend="triton", interpreter=True)
    x = torch.randn(2, 3000, requires_grad=True)
    t = torch.randint(0, 3000, (2,))

    def block():
        return prepare.cross_entropy(x, t, None, -100, "mean", 0.0, 0.0, None, False).forward_plan.flags["BLOCK"]

    cpu = lc.device_name(CPU)  # CPU tensors (planned only: nothing launches)
    tiles_file.write({"forward": {"4": [[300000, 512, 2]]}, "forward_few": {"4": [[300000, 8, 512, 2, 1]]}}, gpu=cpu)
    assert block() == block() == 512
    tiles_file.write({"forward": {"4": [[300000, 256, 2]]}, "forward_few": {"4": [[300000, 8, 256, 2, 1]]}}, gpu=cpu)
    assert block() == 256


def test_shipped_table_is_keyed():
    """The shipped tiles.json: every table names its GPU and Triton major.minor, and holds the passes
    launch_config reads."""
    with open(lc.TILES_FILE) as f:
        tables = json.load(f)["tables"]
    assert tables
    for t in tables:
        assert t["gpu"] and t["triton"].count(".") == 1
        assert set(t["tiles"]) <= {"forward", "backward", "forward_few"}


def test_forced_tiles(monkeypatch, tiles_file):
    tiles_file.write({})
    set_config(monkeypatch, tile=(512, 2))
    assert (lc.forward_launch(4096, 32000, 2, CPU).block, lc.forward_launch(4096, 32000, 2, CPU).stages) == (512, 1)
    set_config(monkeypatch, tile=(512, 2, 3))
    assert lc.forward_launch(4096, 32000, 2, CPU).stages == 3


@pytest.mark.parametrize("n_rows,n_cols", [(1, 128256), (3, 9000), (64, 256000), (4096, 256000)])
def test_split_parts_cover_the_row(n_rows, n_cols):
    f = lc.forward_launch(n_rows, n_cols, 2, CPU)
    assert f.cols_per_prog % f.block == 0
    assert (f.split - 1) * f.cols_per_prog < n_cols <= f.split * f.cols_per_prog


def test_few_rows_table(tiles_file, monkeypatch):
    """A "forward_few" row turns the split off up to its row count, with its own tile; without one, or past
    it, the split rule stands. (The nominal CPU device has 4 SMs: fewer than 8 rows split.)"""
    tiles_file.write({"forward": {"2": [[2**31 - 1, 1024, 4]]},
                      "forward_few": {"2": [[40000, 5, 4096, 16, 4], [2**31 - 1, 0, 4096, 16, 4]]}})
    few = lc.forward_launch(3, 32000, 2, CPU)
    assert (few.split, few.block, few.num_warps, few.stages) == (1, 4096, 16, 4)
    assert few.cols_per_prog >= 32000 and few.cols_per_prog % few.block == 0
    assert lc.forward_launch(6, 32000, 2, CPU).split > 1  # past max_rows
    assert lc.forward_launch(3, 128256, 2, CPU).split > 1  # max_rows 0: the split won there
    assert lc.forward_launch(3, 32000, 4, CPU).split > 1  # no fp32 row
    small = lc.forward_launch(1, 1000, 2, CPU)  # a row that the rule does not split keeps its tile
    assert (small.split, small.block) == (1, 1024)
    set_config(monkeypatch, split=2)
    assert lc.forward_launch(3, 32000, 2, CPU).split == 2
    set_config(monkeypatch, split=None)
    set_config(monkeypatch, tile=(512, 2))
    assert lc.forward_launch(3, 32000, 2, CPU).split > 1  # the tuner's forced tiles keep the split rule


def test_few_rows_table_result(backend, device, tiles_file):
    """The loss and gradient of a few-row forward taken by a "forward_few" row (one pipelined program per
    row, no combine) against float64 torch."""
    import torch.nn.functional as F

    import xent_triton
    from helpers import close, rand_logits, rand_probs, tol

    tiles_file.write({"forward_few": {"4": [[2**31 - 1, 5, 512, 4, 3]], "2": [[2**31 - 1, 5, 512, 4, 3]]}})
    for dtype in (torch.float32, torch.bfloat16):
        x = rand_logits((3, 9000), dtype, device)
        assert lc._launch("forward", 3, 9000, x.element_size(), device).split > 1  # the rule alone splits
        assert lc.forward_launch(3, 9000, x.element_size(), device).split == 1
        y = rand_probs((3, 9000), dtype, device)
        t = torch.randint(0, 9000, (3,), device=device)
        for target in (y, t):
            loss = xent_triton.cross_entropy(x, target, reduction="sum")
            (g,) = torch.autograd.grad(loss, x)
            xr = x.detach().double().requires_grad_()
            ref = F.cross_entropy(xr, target.double() if target.is_floating_point() else target, reduction="sum")
            (g_ref,) = torch.autograd.grad(ref, xr)
            close(loss, ref, **tol(dtype))
            close(g, g_ref, **tol(dtype))
