"""Kernel launches without Triton's per-call argument binding.

``kernel[grid](*args, **kwargs)`` binds, specializes and hashes every argument on every call
(``JITFunction.run``), 15-50 us of host time a launch (perf/NOTES.md P18). ``Launcher(kernel)``
does that once per key: what Triton specializes on (each runtime argument's type, an integer's
cases, a tensor's dtype and 16-byte alignment), the constexpr and option values, the compile knobs
and the current device. Later calls of a key make Triton's own launch call with the kernel it chose.

It is used only where all of these hold, and otherwise every call takes ``kernel[grid]``:

* the Triton version is in :data:`TESTED_TRITON`;
* ``xent_triton.config.active.fast_launch`` (``XENT_TRITON_LAUNCH``, or ``config.overrides``);
* the key matches Triton's specializer on probe values (:func:`key_is_exact`, once per process);
* each key's first call matches Triton's own launch (:meth:`Launcher._first_call`): the compiled
  kernel Triton picks, and every argument its launcher gets. A mismatch warns once
  (:class:`FastLaunchWarning`) and sends that kernel back to ``kernel[grid]`` for good.
"""
import threading
import warnings
from functools import partial
from operator import attrgetter

import torch

from . import config as _config

# major.minor versions whose launch path this module was checked against (tests/test_launcher.py).
TESTED_TRITON = ("3.6", "3.9")

# Knobs JITFunction.run reads. tests/test_launcher.py reads run's source and fails on any knob not
# listed here, so a Triton that adds one cannot be served a kernel compiled under another setting.
KEYED_KNOBS = (  # folded into the compile options, hence into Triton's cache key: in ours too
    "runtime.debug", "compilation.instrumentation_mode", "compilation.fpsan_homomorphic_casts")
ROUTED_KNOBS = ("runtime.add_stages_inspection_hook",)  # while set: Triton's path (its key calls the hook)
LAUNCH_KNOBS = ("runtime.launch_enter_hook", "runtime.launch_exit_hook")  # read at each launch, as Triton does

try:
    import triton
    from triton import knobs as _knobs
    from triton.compiler.compiler import CompiledKernel as _CompiledKernel
    from triton.runtime import driver as _driver
    from triton.runtime.jit import JITFunction as _JITFunction
except ImportError:  # no Triton: Launcher only forwards
    triton = None

TRITON_VERSION = ".".join(triton.__version__.split(".")[:2]) if triton else None


def _present(name):
    obj = _knobs
    for part in name.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


if TRITON_VERSION in TESTED_TRITON:
    _KEYED = tuple(k for k in KEYED_KNOBS if _present(k))  # fpsan is 3.9's; stages hook too
    _ROUTED = tuple(k for k in ROUTED_KNOBS if _present(k))
    # One C call for all of them; at least two keyed knobs exist, so it returns a tuple.
    _knob_state = attrgetter(*_KEYED, *_ROUTED)
    _UNROUTED = (None,) * len(_ROUTED)

_I32, _I64 = 2 ** 31, 2 ** 63
_exact = None  # key_is_exact(), once per process
_exact_lock = threading.Lock()


class FastLaunchWarning(RuntimeWarning):
    """A fast launch did not match Triton's own: that kernel takes ``kernel[grid]`` from now on."""


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
_Tensor = torch.Tensor


def _args_key(args, key):
    """Append what Triton's specialization of each runtime argument depends on to ``key``.

    One loop, not a call per argument: a launch has 25-50 of them and this is most of the hot path.
    """
    append = key.append
    for a in args:
        t = type(a)
        if t is int:
            k = _INT_KEYS.get(a)
            if k is None:
                k = _int_key(a)
                if len(_INT_KEYS) < _MAX_INT_KEYS:
                    _INT_KEYS[a] = k
        elif t is _Tensor:
            # Two entries, not a tuple to build and hash; only a tensor gives a dtype entry, so a key
            # still reads back one way.
            append(a.dtype)
            k = a.data_ptr() % 16 == 0
        elif t is float or t is bool or a is None:
            k = t
        elif isinstance(a, _Tensor):  # a subclass, such as a Parameter
            append(a.dtype)
            k = a.data_ptr() % 16 == 0
        else:
            raise _Unkeyed
        append(k)
    return key


def _arg_key(a):
    """What Triton's specialization of one runtime argument depends on."""
    return tuple(_args_key((a,), []))


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
    """Return whether equal keys (``_arg_key``) get equal specializations from Triton, on probe values.

    The per-key check at a first call sees one value per argument; a key coarser than Triton's
    specialization would pass it and serve a later call a kernel compiled for other values.
    """
    try:
        from triton._C.libtriton import native_specialize_impl
        if backend is None:
            from triton.compiler.compiler import make_backend
            target = _driver.active.get_current_target()
            if target.backend != "cuda":
                return False
            backend = make_backend(target)
        seen = {}
        for a in _probes():
            spec = native_specialize_impl(backend, a, False, True, True)
            if seen.setdefault(_arg_key(a), spec) != spec:
                return False
        return True
    except Exception:  # a Triton without these interfaces
        return False


def _same(a, b):
    """Whether two launcher arguments are the same: tensors by identity, the rest by type and value."""
    if a is b:
        return True
    t = type(a)
    if t is not type(b) or isinstance(a, _Tensor):
        return False
    if t is tuple or t is list:
        return len(a) == len(b) and all(map(_same, a, b))
    if t is dict:
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:
        return False


def _snapshot(call):
    """A launcher call as recorded: launch metadata (a LazyDict, which a launch hook may consume) by
    its contents at the time of the call."""
    return tuple(("LazyDict", dict(a.data), list(a.extras)) if type(a).__name__ == "LazyDict" else a
                 for a in call)


def _show(v):
    return f"a {v.dtype} tensor at {v.data_ptr():#x}" if isinstance(v, _Tensor) else repr(v)[:80]


def _mismatch(theirs, ours):
    """A description of the first difference between two launcher calls, or None."""
    names = ("grid[0]", "grid[1]", "grid[2]", "stream", "function", "packed metadata", "launch metadata",
             "enter hook", "exit hook")
    if len(theirs) != len(ours):
        return f"{len(ours) - 9} kernel arguments where Triton passes {len(theirs) - 9}"
    for i, (a, b) in enumerate(zip(theirs, ours)):
        if not _same(a, b):
            what = names[i] if i < 9 else f"argument {i - 9}"
            return f"{what} is {_show(b)} where Triton passes {_show(a)}"
    return None


class Launcher:
    """Launch a ``@triton.jit`` function as ``fn[grid](*args, **kwargs)`` would, binding less.

    Runtime arguments go by position, constexprs and launch options by keyword, and the grid is a
    tuple; other calls take ``fn[grid]`` every time.

    Args:
        fn: the ``@triton.jit`` function. Anything else (an interpreted function, an autotuner) is
            always launched through ``fn[grid]``.

    Example::

        >>> add = Launcher(add_kernel)
        >>> add[(triton.cdiv(n, 1024),)](x, y, out, n, BLOCK=1024)
    """

    def __init__(self, fn):
        self.fn = fn
        self._kernels = {}  # key -> (compiled kernel, the arguments after the positional ones)
        self.misses = 0  # calls that went through fn[grid]: first calls of a key and uncovered ones
        self._fallback = None  # why this kernel takes fn[grid] for good, once its check failed
        self._checking = None  # the thread checking a first call
        self._usable = TRITON_VERSION in TESTED_TRITON and isinstance(fn, _JITFunction)
        if self._usable:
            params = fn.params
            self._names = [p.name for p in params]
            self._lead = next((i for i, p in enumerate(params) if p.is_constexpr), len(params))
            self._runtime = {p.name for p in params if not p.is_constexpr}
            self._defaults = {p.name: p.default for p in params if p.has_default}
            self._rt = _knobs.runtime

    def __getitem__(self, grid):
        return partial(self._launch, grid)  # a C partial, not a lambda: one Python frame less per launch

    def _launch(self, grid, *args, **kwargs):
        fn = self.fn
        if (not self._usable or self._fallback or not _config.active.fast_launch or type(grid) is not tuple
                or len(args) > self._lead or fn.pre_run_hooks):
            return self._through_triton(grid, args, kwargs)
        knobs = _knob_state(_knobs)
        if _ROUTED and knobs[len(_KEYED):] != _UNROUTED:
            return self._through_triton(grid, args, kwargs)
        driver = _driver.active
        device = driver.get_current_device()
        # fn.debug is fixed when the function is defined, but JITFunction.run reads it on every call. The
        # argument count first, and the kwargs' names then their values: the key reads back one way.
        try:
            key = tuple(_args_key(args, [len(args), device, fn.debug, knobs, *kwargs, *kwargs.values()]))
            hit = self._kernels.get(key)
        except (_Unkeyed, TypeError):  # an argument type the key does not cover; an unhashable constexpr
            return self._through_triton(grid, args, kwargs)
        if hit is None:
            return self._first_call(grid, args, kwargs, key)
        kernel, tail = hit
        stream = driver.get_current_stream(device)
        # JITFunction.run's own launch, with the kernel and the bound arguments it would find.
        rt = self._rt
        enter = rt.launch_enter_hook
        g = len(grid)
        kernel.run(grid[0], grid[1] if g > 1 else 1, grid[2] if g > 2 else 1, stream, kernel.function,
                   kernel.packed_metadata,
                   None if enter is None else kernel.launch_metadata(grid, stream, *args, *tail),
                   enter, rt.launch_exit_hook, *args, *tail)
        return kernel

    def _first_call(self, grid, args, kwargs, key):
        """Launch a key's first call through Triton, and keep its kernel if a fast launch matches it.

        Triton picks the compiled kernel (``fn.run(..., warmup=True)``: its binding, specialization
        and cache, compiling if needed), then launches the call itself; the kernel's C launcher is
        wrapped meanwhile to record what Triton passes it. The hot path then makes the same call
        with the launcher only recording, and the two calls must agree in every field: grid, stream,
        function, metadata, hooks and each argument (constexprs and defaults included). The kernel
        is kept with the parameters after ``args``, which the key fixes (kwargs by value).

        Once per key it costs one more binding by Triton, one recorded fast launch and the
        comparison: ~45 us over Triton's own launch (stand-in driver, 27 + 12 arguments).
        """
        global _exact
        fn, me = self.fn, threading.get_ident()
        if self._checking == me:  # the recorded fast launch missed its key
            raise RuntimeError("the key of a call changed between two launches of it")
        if self._checking is not None or any(k in self._runtime for k in kwargs):
            # Another thread's check is under way; a runtime argument passed by keyword is keyed by
            # its identity, not by its specialization: this call only goes through Triton.
            return self._through_triton(grid, args, kwargs)
        if _exact is None:
            with _exact_lock:
                if _exact is None:
                    _exact = key_is_exact()
                    if not _exact:
                        warnings.warn(f"xent_triton.launcher: keys do not match the specialization of Triton "
                                      f"{triton.__version__}; every launch takes Triton's own path",
                                      FastLaunchWarning, stacklevel=4)
        if not _exact:
            self._fallback = "keys coarser than Triton's specialization"  # warned once, above
            return self._through_triton(grid, args, kwargs)
        kernel = fn.run(*args, grid=grid, warmup=True, **kwargs)
        # A compile future, a jit_cache_hook's skip, or a kernel that reads Python globals (Triton
        # checks on each call that they have not changed): this call only goes through Triton.
        if type(kernel) is not _CompiledKernel or fn.used_global_vals:
            return self._through_triton(grid, args, kwargs)
        send = kernel.run  # the C launcher (loads the module, as Triton's launch would)
        calls = []

        def record_and_send(*a):
            if threading.get_ident() == me:
                calls.append(_snapshot(a))
            return send(*a)

        def record(*a):
            if threading.get_ident() != me:  # another thread's launch of this kernel still goes out
                return send(*a)
            calls.append(_snapshot(a))

        self._checking = me
        kernel._run = record_and_send
        try:
            launched = self._through_triton(grid, args, kwargs)  # the call's one real launch
            names = self._names[len(args):]
            tail = tuple(kwargs[k] if k in kwargs else self._defaults[k] for k in names)
            self._kernels[key] = kernel, tail
            kernel._run = record
            misses = self.misses
            try:
                self._launch(grid, *args, **kwargs)
            except Exception as e:
                calls.append(e)
        finally:
            kernel._run = send
            self._checking = None
        if launched is not kernel:
            why = "Triton launched another compiled kernel than the one it selected"
        elif calls and isinstance(calls[-1], Exception):
            why = f"the fast launch raised {calls[-1]!r}"
        elif self.misses != misses:
            why = "the fast launch went through Triton's own path"
        elif len(calls) != 2:
            why = f"Triton's launch and the fast one made {len(calls)} launcher calls, not 2"
        else:
            why = _mismatch(*calls)
        if why:
            self._kernels.pop(key, None)
            self._fallback = why
            warnings.warn(f"xent_triton.launcher: {fn.__name__}: {why}; its launches take Triton's own path",
                          FastLaunchWarning, stacklevel=4)
        return launched

    def _through_triton(self, grid, args, kwargs):
        self.misses += 1
        return self.fn[grid](*args, **kwargs)
