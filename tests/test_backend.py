"""XENT_TRITON_BACKEND dispatch: never a silent fallback."""
import os
import subprocess
import sys

import pytest
import torch

from xent_triton import backend


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
    assert "TRITON_INTERPRET=1 is not set" in r.stderr


def test_auto_uses_fallback_on_plain_cpu():
    r = run("import torch\nfrom xent_triton import backend\nprint(backend.choose(torch.device('cpu')))")
    assert r.stdout.strip() == "torch", r.stderr


def test_auto_uses_interpreter_when_enabled():
    r = run("import torch\nfrom xent_triton import backend\nprint(backend.choose(torch.device('cpu')))",
            TRITON_INTERPRET="1")
    assert r.stdout.strip() == "triton", r.stderr


def test_forced_choices(monkeypatch):
    monkeypatch.setenv("XENT_TRITON_BACKEND", "torch")
    assert backend.choose(torch.device("cpu")) == "torch"
    monkeypatch.setenv("XENT_TRITON_BACKEND", "TRITON")
    if backend.interpreter_enabled() or torch.cuda.is_available():
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        assert backend.choose(dev) == "triton"


def test_outputs_start_poisoned():
    """The autouse fixture is active: a buffer nobody writes shows the poison value, not zeros."""
    from conftest import POISON
    from xent_triton import _alloc

    buf = _alloc.new_output((4,), torch.float32, torch.device("cpu"))
    assert (buf == POISON).all()
