"""The examples run, shortened, on each backend.

examples/distill_digits.py trains a teacher and distils it into a student with
xent_triton's losses, then repeats the run with torch.nn.functional.cross_entropy.
On the torch fallback (and on a GPU) the test runs a few epochs on the whole
training set. The Triton interpreter (a CPU without CUDA) runs every row of every
kernel launch in Python, tens of milliseconds each, so there the test trains on 50
examples for 2 + 2 epochs: the same checks, on a micro run.
"""
import importlib.util
import math
import pathlib

import pytest
import torch
from helpers import set_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()

# A ceiling where pytest-timeout is installed; the runs take seconds (see below).
pytestmark = [pytest.mark.timeout(180)] if importlib.util.find_spec("pytest_timeout") else []

# Full training set, few epochs: a few seconds on the torch fallback or a GPU.
SHORT = ["--epochs-teacher", "3", "--epochs-student", "5"]
# Under the interpreter: 50 examples, batches of 5, soft loss only for the student
# (alpha = 1; the teacher still uses the class-index loss): 100 rows through each model's
# loss, about 400 interpreted programs (forward and backward). Student accuracy over seeds
# 0-9 of this recipe: 0.61-0.77 (seed 0: 0.66).
MICRO = ["--train-size", "50", "--batch-size", "5", "--epochs-teacher", "2", "--epochs-student", "2",
         "--lr-teacher", "5e-3", "--lr-student", "2e-2", "--alpha", "1"]


def load_example(name):
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"xent_triton_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def distill_digits():
    for dep in ("sklearn", "matplotlib", "tqdm"):
        pytest.importorskip(dep, reason="the examples need pip install -e .[examples]")
    return load_example("distill_digits")


@pytest.mark.parametrize("backend_name", [
    "torch",
    # The interpreter's run is the slow one; on a GPU the kernels are fast.
    pytest.param("triton", marks=[] if CUDA else [pytest.mark.slow]),
])
def test_distill_digits(distill_digits, backend_name, monkeypatch, device, tmp_path):
    set_config(monkeypatch, backend=backend_name)
    interpreted = backend_name == "triton" and device.type == "cpu"
    out = tmp_path / "loss.png"
    argv = (MICRO if interpreted else SHORT) + ["--compare-torch", "--out", str(out), "--device", str(device)]
    threads = torch.get_num_threads()

    result = distill_digits.main(argv)

    assert result["backend"] == backend_name
    assert torch.get_num_threads() == threads, "the example must restore the thread count"
    assert out.is_file() and out.stat().st_size > 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    epochs = {"teacher": int(argv[argv.index("--epochs-teacher") + 1]),
              "student": int(argv[argv.index("--epochs-student") + 1])}
    for who in ("teacher", "student"):
        ours, theirs = result[who]["loss"], result["torch"][who]["loss"]
        assert len(ours) == len(theirs) == len(result[who]["test_acc"]) == epochs[who]
        assert all(math.isfinite(v) for v in ours + theirs), (who, ours, theirs)
        assert ours[-1] < ours[0], f"{who} loss did not decrease: {ours}"
        # Same seeds, same batches: the curves agree to fp32 rounding (which Adam
        # carries on from step to step, hence a relative bound, not bit equality).
        torch.testing.assert_close(torch.tensor(ours, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64),
                                   rtol=1e-4, atol=1e-6, msg=lambda m: f"{who} curves differ:\n{m}")
        assert result["max_rel_diff"][who] < 1e-4
        assert abs(result[who]["final_acc"] - result["torch"][who]["final_acc"]) <= 0.01

    # Ten classes: chance is 0.1.
    assert result["teacher_acc"] > 0.5, result["teacher_acc"]
    assert result["student_acc"] > 0.5, result["student_acc"]
    if not interpreted:
        assert result["teacher_acc"] > 0.9 and result["student_acc"] > 0.8, (result["teacher_acc"],
                                                                             result["student_acc"])
    assert result["student"]["loss"][-1] >= result["student"]["loss_floor"] - 1e-4
