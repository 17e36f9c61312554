"""Everything besides a call's arguments that decides its route, in one value.

Read from the environment once, when xent_triton is imported:

* ``XENT_TRITON_BACKEND`` = ``auto`` (default) | ``triton`` | ``torch``: which implementation runs
  a call (see :func:`choose_backend`).
* ``TRITON_INTERPRET`` (Triton's own variable) = ``1``: CPU tensors can run the kernels, in
  Triton's interpreter. Triton reads it when the kernels are defined, at their first launch.
* ``XENT_TRITON_LAUNCH`` = ``fast`` (default) | ``jit``: launch compiled kernels through
  xent_triton.launcher, or always through Triton's own ``kernel[grid]``.

Afterwards the value changes only through :func:`set_backend` and the :func:`overrides` context
manager (tests and tuning: they also force launch tiles). Every change replaces the value; a
prepared call is keyed by it (xent_triton/prepare.py), so no decision outlives the setting it
was made under.
"""
import contextlib
import dataclasses
import importlib.util
import os
from typing import Optional, Tuple, Union

BACKENDS = ("auto", "triton", "torch")
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
LAUNCH_MODES = ("fast", "jit")


# eq=False: a value is its identity (each change makes a new one), so a key that holds it hashes it without
# a Python call and can only meet the very configuration it was made under.
@dataclasses.dataclass(frozen=True, eq=False)
class Config:
    backend: str = "auto"
    interpreter: bool = False
    fast_launch: bool = True
    # Tests and tuning only (perf/tune_tiles.py, perf/split_probe.py, perf/rows_probe.py):
    split: Optional[int] = None  # programs per row of the forward
    tile: Optional[Tuple[int, ...]] = None  # (BLOCK, num_warps[, stages]) of every row-loop launch
    rows: Optional[Union[int, str]] = None  # rows per program of the short-row kernels; 1: never; "max": the cap


def _env_choice(name, default, choices):
    value = os.environ.get(name, default).strip().lower()
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def from_environment() -> Config:
    """The configuration the environment gives (what ``import xent_triton`` reads)."""
    return Config(
        backend=_env_choice("XENT_TRITON_BACKEND", "auto", BACKENDS),
        interpreter=os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes"),
        fast_launch=_env_choice("XENT_TRITON_LAUNCH", "fast", LAUNCH_MODES) == "fast",
    )


# The configuration in force: read it (as ``config.active``: the hot path reads it without a call), never
# assign it; set_backend() and overrides() replace it.
active = from_environment()


def current() -> Config:
    """The configuration in force."""
    return active


def _replace(**fields) -> Config:
    global active
    if "backend" in fields and fields["backend"] not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {fields['backend']!r}")
    previous, active = active, dataclasses.replace(active, **fields)
    return previous


def set_backend(name: str) -> None:
    """Choose the implementation for later calls: ``"auto"``, ``"triton"`` or ``"torch"``
    (see :func:`choose_backend`)."""
    _replace(backend=name)


def renew() -> None:
    """Replace the value with an equal new one: calls prepared under the old value are not used again
    (launch_config.reload_tiles calls it after the tiles file changed)."""
    _replace()


def get_backend() -> str:
    """The backend setting: ``"auto"``, ``"triton"`` or ``"torch"``."""
    return active.backend


@contextlib.contextmanager
def overrides(**fields):
    """Set fields of the configuration for the block (``backend``, ``interpreter``,
    ``fast_launch``, ``split``, ``tile``, ``rows``), then restore the previous value.

    For tests and tuning tools: ``with overrides(split=4): ...`` forces every forward to split
    its rows into 4 programs."""
    global active
    previous = _replace(**fields)
    try:
        yield active
    finally:
        active = previous


def choose_backend(device_type: str, config: Config) -> str:
    """``"triton"`` or ``"torch"`` for tensors on ``device_type``.

    * ``auto``: CUDA tensors use the kernels; CPU tensors the torch fallback, or the kernels
      under Triton's interpreter.
    * ``triton``: always the kernels; where they cannot run (a CPU tensor without the
      interpreter, Triton not installed) this raises, it never falls back silently.
    * ``torch``: always the fallback.
    """
    if config.backend == "torch":
        return "torch"
    runnable = TRITON_INSTALLED and (device_type == "cuda" or (device_type == "cpu" and config.interpreter))
    if config.backend == "triton" and not runnable:
        if not TRITON_INSTALLED:
            why = "triton is not installed"
        elif device_type == "cpu":
            why = "tensors are on the CPU and TRITON_INTERPRET=1 was not set when xent_triton was imported"
        else:
            why = f"device type {device_type!r} is not supported by the kernels"
        raise RuntimeError(f"backend 'triton' was asked for, but the Triton kernels cannot run: {why}")
    return "triton" if runnable else "torch"

