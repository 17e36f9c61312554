"""Kernel launches with Triton's per-call argument binding done once per specialization.

``kernel[grid](*args, **kwargs)`` binds, specializes and hashes every argument on every call
(``JITFunction.run``): 15-50 us of host time a launch (perf/NOTES.md P18), much of a small
problem's step. ``Launcher(kernel)[grid](...)`` keys a call on what Triton specializes on: each
runtime argument's type, an integer's cases (equal to 1, a multiple of 16, 32- or 64-bit), a
tensor's dtype and 16-byte alignment, the constexpr and option values, the debug knobs and the
current device. The first call of a key goes through ``kernel[grid]``, which compiles or finds the
kernel and launches it; later calls of that key launch the compiled kernel it returned, with the
same arguments and stream Triton's own launch passes (``CompiledKernel[grid]``).

The key is checked once per process against Triton's own specializer (``key_is_exact``). Where it
disagrees, where Triton lacks what is used here, under the interpreter, with run hooks, for argument
types the key does not cover, or with ``XENT_TRITON_LAUNCH=jit`` (``fast`` by default; read at import;
or ``launcher.ENABLED = False``), a call takes ``kernel[grid]``. Each kept kernel stays referenced, with
its loaded module, for the life of the process, as in Triton's own per-device cache: one per
specialization met.
"""
import os

import torch

_MODE = os.environ.get("XENT_TRITON_LAUNCH", "fast").strip().lower()
if _MODE not in ("fast", "jit"):
    raise ValueError(f"XENT_TRITON_LAUNCH must be one of 'fast', 'jit', got {_MODE!r}")
ENABLED = _MODE == "fast"

_I32, _I64 = 2 ** 31, 2 ** 63
_exact = None  # key_is_exact(), once per process


class _Unkeyed(Exception):
    """A call the key does not cover: it takes Triton's own path."""


def _int_key(a):
    if a == 1:
        return 1  # Triton makes a 1 a compile-time constant
    if -_I32 <= a < _I32:
        return 0, a % 16 == 0
    if -_I64 <= a < _I64:
        return 1, a % 16 == 0
    if _I64 <= a < 2 * _I64:
        return 2, a % 16 == 0
    raise _Unkeyed


_INT_KEYS = {}  # int -> _int_key: a launch's integers (sizes, strides, options) repeat from call to call
_MAX_INT_KEYS = 4096


def _args_key(args):
    """What Triton's specialization of each runtime argument depends on (one loop, not a call per
    argument: a launch has 25-50 of them)."""
    key = []
    for a in args:
        t = type(a)
        if t is int:
            k = _INT_KEYS.get(a)
            if k is None:
                k = _int_key(a)
                if len(_INT_KEYS) < _MAX_INT_KEYS:
                    _INT_KEYS[a] = k
        elif t is float or t is bool or a is None:
            k = t
        elif isinstance(a, torch.Tensor):
            k = a.dtype, a.data_ptr() % 16 == 0
        else:
            raise _Unkeyed
        key.append(k)
    return tuple(key)


def _arg_key(a):
    """What Triton's specialization of one runtime argument depends on."""
    return _args_key((a,))[0]


def _probes():
    """Values around every boundary Triton's integer and pointer specialization could have."""
    ints = [0, 1, 2, 3, 4, 8, 15, 16, 17, 32, 48, -1, -2, -16, -17, 4096, 128256, 128257]
    for edge in (_I32, _I64, 2 ** 64):
        ints += [edge - 17, edge - 16, edge - 1, edge, edge + 16]
        ints += [-e for e in ints[-5:]]
    ints = [i for i in ints if -_I64 <= i < 2 ** 64]
    storage = torch.empty(64, dtype=torch.float64)
    tensors = [storage.view(dt)[k:] for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float64,
                                                torch.int32, torch.int64, torch.uint8)
               for k in range(9)]
    return ints + tensors + [0.0, 1.0, -2.5, True, False, None]


def key_is_exact(backend=None) -> bool:
    """Whether equal keys (``_arg_key``) get equal specializations from Triton, on probe values."""
    try:
        from triton._C.libtriton import native_specialize_impl
        if backend is None:
            from triton.compiler.compiler import make_backend
            from triton.runtime import driver
            target = driver.active.get_current_target()
            if target.backend != "cuda":
                return False
            backend = make_backend(target)
        seen = {}
        for a in _probes():
            spec = native_specialize_impl(backend, a, False, True, True)
            if seen.setdefault(_arg_key(a), spec) != spec:
                return False
        return True
    except Exception:  # a Triton without these interfaces: launches take its own path
        return False


def _knob_state(knobs):
    """The knobs JITFunction.run folds into a kernel's compile options."""
    return (knobs.runtime.debug, knobs.compilation.instrumentation_mode,
            getattr(knobs.compilation, "fpsan_homomorphic_casts", None))


class Launcher:
    """``Launcher(fn)[grid](*args, **kwargs)`` launches ``fn`` as ``fn[grid](*args, **kwargs)`` would.

    Runtime arguments go by position, constexprs and launch options by keyword (a call that does
    otherwise takes Triton's path every time)."""

    def __init__(self, fn):
        self.fn = fn
        self._kernels = {}
        self.misses = 0  # calls that went through fn[grid]: first calls of a key and uncovered ones
        try:
            from triton import knobs
            from triton.runtime import driver
            from triton.runtime.jit import JITFunction
            self._knobs, self._driver = knobs, driver
            params = fn.params if isinstance(fn, JITFunction) else None
        except ImportError:
            params = None
        self._usable = params is not None
        if self._usable:
            self._names = [p.name for p in params]
            self._lead = next((i for i, p in enumerate(params) if p.is_constexpr), len(params))
            self._runtime = {p.name for p in params if not p.is_constexpr}
            self._defaults = {p.name: p.default for p in params if p.has_default}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid, args, kwargs):
        if not (ENABLED and self._usable and _exact is not False) or type(grid) is not tuple or len(args) > self._lead:
            return self._through_triton(grid, args, kwargs)
        knobs = self._knobs
        hooked = getattr(self.fn, "pre_run_hooks", None) or getattr(knobs.runtime, "add_stages_inspection_hook", None)
        if hooked:
            return self._through_triton(grid, args, kwargs)
        try:
            key = (_args_key(args), tuple(kwargs.items()), _knob_state(knobs))
        except _Unkeyed:
            return self._through_triton(grid, args, kwargs)
        driver = self._driver.active
        device = driver.get_current_device()
        try:
            hit = self._kernels.get((device, key))
        except TypeError:  # an unhashable constexpr or option
            return self._through_triton(grid, args, kwargs)
        if hit is None:
            return self._first_call(grid, args, kwargs, (device, key))
        kernel, tail = hit
        g = len(grid)
        grid3 = (grid[0], grid[1] if g > 1 else 1, grid[2] if g > 2 else 1)
        kernel[grid3](*args, *tail, stream=driver.get_current_stream(device))
        return kernel

    def _first_call(self, grid, args, kwargs, key):
        """A key's first call: Triton compiles or finds the kernel and launches it. The kernel is kept with
        the parameters after ``args`` (constexprs and defaults), which the key fixes: kwargs by value."""
        global _exact
        kernel = self._through_triton(grid, args, kwargs)
        if _exact is None:
            _exact = key_is_exact()
        # A runtime argument passed by keyword is in the key by identity, not by its specialization; a
        # future or an interpreter object is not a compiled kernel; a kernel that reads Python globals
        # needs Triton's check, on every call, that they have not changed: none of them is kept.
        keep = _exact and not any(k in self._runtime for k in kwargs) and not getattr(self.fn, "used_global_vals", 1)
        if keep and callable(getattr(type(kernel), "__getitem__", None)) and not hasattr(kernel, "result"):
            names = self._names[len(args):]
            self._kernels[key] = kernel, tuple(kwargs[k] if k in kwargs else self._defaults[k] for k in names)
        return kernel

    def _through_triton(self, grid, args, kwargs):
        self.misses += 1
        return self.fn[grid](*args, **kwargs)
