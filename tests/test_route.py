"""The host route of a call stays short: a repeat training step runs at most 16 of the package's own
functions in at most 5 modules (README, "How a call flows"; perf/host_functions.py lists them)."""
import os
import sys

import pytest
import torch

import xent_triton
from helpers import set_config

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from perf.host_functions import traced  # noqa: E402

ROUTE = {"xent_triton.functional", "xent_triton.prepare", "xent_triton.function", "xent_triton.triton_backend",
         "xent_triton.launcher"}


@pytest.mark.parametrize("labels", ["hard", "soft"])
def test_repeat_step_route(device, monkeypatch, labels):
    set_config(monkeypatch, backend="triton")
    x = torch.randn(8, 100, device=device, requires_grad=True)
    target = (torch.randint(0, 100, (8,), device=device) if labels == "hard"
              else torch.softmax(torch.randn(8, 100, device=device), -1))

    def step():
        x.grad = None
        xent_triton.cross_entropy(x, target).backward()

    step()
    step()
    funcs = traced(step)
    assert set(funcs) <= ROUTE, funcs
    assert sum(len(f) for f in funcs.values()) <= 16, funcs
    # The route as the README names it, end to end.
    assert "cross_entropy" in funcs["xent_triton.prepare"]
    assert {"CrossEntropyFunction.forward", "CrossEntropyFunction.backward"} <= set(funcs["xent_triton.function"])
    assert {"forward", "backward"} <= set(funcs["xent_triton.triton_backend"])


def test_call_without_gradient_has_no_autograd_node(device, monkeypatch):
    """A forward that needs no gradient runs the Function's forward body alone, with the same result."""
    set_config(monkeypatch, backend="triton")
    x = torch.randn(8, 100, device=device, dtype=torch.float64)
    t = torch.randint(0, 100, (8,), device=device)
    with torch.no_grad():
        funcs = traced(lambda: xent_triton.cross_entropy(x, t))
        plain = xent_triton.cross_entropy(x, t)
    assert "CrossEntropyFunction.forward" not in funcs["xent_triton.function"]
    assert "run_forward" in funcs["xent_triton.function"]
    with_node = xent_triton.cross_entropy(x.clone().requires_grad_(), t)
    assert with_node.grad_fn is not None and plain.grad_fn is None
    torch.testing.assert_close(plain, with_node.detach(), rtol=0, atol=0)
