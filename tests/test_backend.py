"""The backend choice (xent_triton.config): read from the environment once, changed through the API; never a
silent fallback."""
import os
import subprocess
import sys

import pytest
import torch

import xent_triton
from xent_triton import config
from helpers import set_config


def run(code, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "XENT_TRITON_BACKEND")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-without-interpreter case")
def test_triton_on_cpu_without_interpreter_raises():
    r = run("import torch, xent_triton\n"
            "xent_triton.softmax_cross_entropy_with_logits(torch.rand(2, 3), torch.rand(2, 3))",
            XENT_TRITON_BACKEND="triton")
    assert r.returncode != 0
    assert "TRITON_INTERPRET=1 was not set" in r.stderr


CHOICE = "from xent_triton import config\nprint(config.choose_backend('cpu', config.active))"


def test_auto_uses_fallback_on_plain_cpu():
    r = run(CHOICE)
    assert r.stdout.strip() == "torch", r.stderr


def test_auto_uses_interpreter_when_enabled():
    r = run(CHOICE, TRITON_INTERPRET="1")
    assert r.stdout.strip() == "triton", r.stderr


def test_environment_read_once_at_import():
    """The variables are read when xent_triton is imported; later changes of the environment do nothing,
    set_backend does."""
    r = run("import os, torch, xent_triton\n"
            "from xent_triton import config\n"
            "os.environ['XENT_TRITON_BACKEND'] = 'triton'\n"
            "print(config.get_backend(), config.choose_backend('cpu', config.active))\n"
            "xent_triton.set_backend('torch')\n"
            "print(config.get_backend(), config.choose_backend('cpu', config.active))",
            XENT_TRITON_BACKEND="auto", TRITON_INTERPRET="1")
    assert r.stdout.split() == ["auto", "triton", "torch", "torch"], r.stderr


def test_bad_environment_value_raises_at_import():
    r = run("import xent_triton", XENT_TRITON_BACKEND="cuda")
    assert r.returncode != 0 and "XENT_TRITON_BACKEND must be one of" in r.stderr


def test_forced_choices(monkeypatch):
    set_config(monkeypatch, backend="torch")
    assert config.choose_backend("cpu", config.active) == "torch"
    set_config(monkeypatch, backend="triton")
    if config.active.interpreter or torch.cuda.is_available():
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        assert config.choose_backend(dev, config.active) == "triton"
    with pytest.raises(ValueError, match="backend must be one of"):
        xent_triton.set_backend("cuda")


def test_overrides_restore():
    before = config.active
    with config.overrides(backend="torch", split=3) as inside:
        assert config.active is inside and inside.backend == "torch" and inside.split == 3
    assert config.active is before
    with pytest.raises(RuntimeError):
        with config.overrides(rows=1):
            raise RuntimeError
    assert config.active is before


def test_outputs_start_poisoned():
    """The autouse fixture is active: a buffer nobody writes shows the poison value, not zeros."""
    from conftest import POISON
    from xent_triton import _alloc

    buf = _alloc.new_output((4,), torch.float32, torch.device("cpu"))
    assert (buf == POISON).all()
