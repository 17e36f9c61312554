"""A light import: ``import xent_triton`` pulls in neither triton nor torch's compiler stack, and CPU use through
the torch fallback never imports triton. TensorFlow users need this: TF's LLVM and Triton's abort the process
when both load (``LLVM ERROR: inconsistency in registered CommandLine options``). Each check runs in a fresh
interpreter. (The import time itself is measured by perf/import_time.py, not here: no timed unit tests.)"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

HEAVY = ("triton", "torch._dynamo", "torch._inductor")

# Prints which HEAVY modules are loaded, as JSON, at each call of seen(label).
PRELUDE = f"""
import json, sys
def seen(label):
    print(json.dumps([label, sorted(m for m in {HEAVY!r} if m in sys.modules)]))
"""


def _run(code, **env):
    clean = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "XENT_TRITON_BACKEND")}
    proc = subprocess.run([sys.executable, "-c", PRELUDE + code], capture_output=True, text=True, timeout=600,
                          env=dict(clean, **env))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(line) for line in proc.stdout.splitlines() if line.startswith("["))


CPU_USE = """
import torch
import torch.nn.functional as F
seen("torch")
import xent_triton
seen("import")
x = torch.randn(6, 11, requires_grad=True)
t = torch.randint(0, 11, (6,))
y = torch.softmax(torch.randn(6, 11), 1).requires_grad_()
xent_triton.cross_entropy(x, t, label_smoothing=0.1, lse_square_scale=1e-4, softcap=20.0).backward()
xent_triton.cross_entropy(x, y, reduction="sum").backward()
xent_triton.softmax_cross_entropy_with_logits(y, x).sum().backward()
xent_triton.sparse_softmax_cross_entropy_with_logits(t, x).sum().backward()
xent_triton.CrossEntropyLoss(ignore_index=3)(x, t).backward()
xent_triton.linear_cross_entropy(torch.randn(6, 4), torch.randn(11, 4, requires_grad=True), t).backward()
x.grad = None
xent_triton.cross_entropy(x * 1, t, inplace_backward=True).backward()
seen("cpu use")
with xent_triton.patch_torch():
    F.cross_entropy(x, t).backward()
seen("patched")
"""


def test_import_and_cpu_use_load_no_compiler():
    seen = _run(CPU_USE)
    assert seen["torch"] == [], seen  # the baseline: torch alone loads none of them
    assert seen["import"] == [], seen
    assert seen["cpu use"] == [], seen
    assert seen["patched"] == [], seen  # torch._dynamo would bring triton in (torch_patch._runs_kernels)


def test_interpreter_loads_triton_at_the_first_kernel():
    """Under TRITON_INTERPRET=1 with the Triton backend, triton comes in at the first launch, not before."""
    seen = _run("""
import torch
import xent_triton
seen("import")
xent_triton.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 4]))
seen("kernel")
""", TRITON_INTERPRET="1", XENT_TRITON_BACKEND="triton")
    assert seen["import"] == [], seen
    assert "triton" in seen["kernel"], seen
    assert "torch._dynamo" not in seen["kernel"] and "torch._inductor" not in seen["kernel"], seen


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="tensorflow is not installed")
def test_tensorflow_first_then_xent_triton_on_cpu():
    """The import order that aborted the process; the losses, and the gradients at every magnitude, also
    match TF's own."""
    seen = _run("""
import numpy as np
import tensorflow as tf
import torch
import xent_triton
rng = np.random.default_rng(0)
logits = rng.normal(size=(5, 7)) * 3
labels = rng.dirichlet(np.ones(7), size=5)
ours = xent_triton.softmax_cross_entropy_with_logits(torch.tensor(labels), torch.tensor(logits)).numpy()
theirs = tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=logits).numpy()
np.testing.assert_allclose(ours, theirs, rtol=1e-12)
idx = rng.integers(0, 7, size=5)
ours = xent_triton.sparse_softmax_cross_entropy_with_logits(torch.tensor(idx), torch.tensor(logits)).numpy()
theirs = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=idx, logits=logits).numpy()
np.testing.assert_allclose(ours, theirs, rtol=1e-12)
# Gradients at every magnitude (logits to 1e30 in float32, 1e300 in float64), against TF's own kernels.
sys.path.insert(0, TESTS)
from helpers import magnitude_logits
for dtype, rtol in ((torch.float32, 1e-6), (torch.float64, 1e-14)):
    x = magnitude_logits(dtype, "cpu", 37)
    y = torch.softmax(torch.randn(x.shape, dtype=torch.float64), -1).to(dtype)
    xv, yv = tf.Variable(x.numpy()), tf.Variable(y.numpy())
    with tf.GradientTape() as tape:
        loss_tf = tf.nn.softmax_cross_entropy_with_logits(labels=yv, logits=xv)
    dx_tf, dy_tf = tape.gradient(loss_tf, [xv, yv])
    x.requires_grad_(), y.requires_grad_()
    loss = xent_triton.softmax_cross_entropy_with_logits(y, x)
    dx, dy = torch.autograd.grad(loss.sum(), (x, y))
    # TF's dlogits is softmax - labels; ours, softmax * sum(labels) - labels: the labels sum to 1 to rounding.
    for a, b in ((loss, loss_tf), (dx, dx_tf), (dy, dy_tf)):
        np.testing.assert_allclose(a.detach().numpy(), b.numpy(), rtol=rtol, atol=rtol)
seen("tf")
""".replace("TESTS", repr(os.path.dirname(os.path.abspath(__file__)))), TF_CPP_MIN_LOG_LEVEL="3")
    assert "triton" not in seen["tf"], seen
