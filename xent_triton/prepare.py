"""The prepare step of every loss call: argument checks, dtype rules, row layout and launch choice.

How a call flows (the README has the same):

1. ``functional.cross_entropy`` (or ``softmax_cross_entropy_with_logits``, its sparse form) calls
2. ``prepare.cross_entropy``, which returns a :class:`Call`: the checked options, the class axis, the
   result dtypes, the row layout, the backend and the launches of both passes;
3. ``function.CrossEntropyFunction`` runs the forward (and the reduction) and the backward with it;
4. ``call.backend`` (``triton_backend`` or ``torch_backend``) allocates and launches
5. through ``launcher.Launcher``.

A Call depends only on metadata: the tensors' shapes, strides, dtypes, devices and requires_grad,
the option values, the grad and autocast modes, and ``xent_triton.config.active``. Eager calls keep
it in a cache keyed by exactly these, so a repeat call only builds its key. Calls the dispatcher
must see (torch.compile, fake or traced tensors, tensor subclasses, torch.func, dispatch modes:
:func:`direct` says which) get a fresh Call and run through the custom ops (xent_triton/ops.py).
"""
import torch

from . import config, dtypes
from . import validation as v
from .layout import batch_shape, check_inplace, make_rows

MAX_CACHED = 256  # calls kept; the cache is emptied when it would outgrow this
_CACHE = {}
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # what the eager route runs on: not subclasses
_SCALARS = (int, float)
_DEVICES = ("cpu", "cuda")  # where calls are kept (others are prepared each time, and their checks tell)

_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None)
_functorch_level = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
_jit_tracing = getattr(torch._C, "_get_tracing_state", None)


def direct(*tensors) -> bool:
    """Whether a call may skip the dispatcher and run the backend itself: eager mode, plain tensors,
    no torch.func transform, dispatch mode or torch.jit.trace. Its round trip into a Python custom op
    cost more host time than our own launch code (perf/NOTES.md P14); compile, export, fake tensors
    and tensor subclasses need the custom ops."""
    if _dispatch_modes is None or _functorch_level is None or _jit_tracing is None:
        return False  # no way to tell; the custom op is always right
    if torch.compiler.is_compiling() or _dispatch_modes() or _functorch_level() is not None or _jit_tracing():
        return False
    for t in tensors:
        if t is not None and type(t) not in PLAIN_TENSORS:
            return False
    return True


def in_functorch() -> bool:
    """Whether a torch.func transform is active (or cannot be told)."""
    return _functorch_level is None or _functorch_level() is not None


def backend_for(device: torch.device):
    """The backend module (triton_backend or torch_backend) that runs calls on ``device`` under the
    configuration in force (config.choose_backend)."""
    if config.choose_backend(device.type, config.active) == "triton":
        from . import triton_backend as backend
    else:
        from . import torch_backend as backend
    return backend


class Call:
    """What one call signature decides; see the module docstring. Holds no tensor."""

    __slots__ = ("direct", "axis", "hard", "options", "reduction", "out_dtype", "loss_fp32", "loss_dtype", "inplace",
                 "weighted", "backend", "layout", "as_is", "batch_view", "forward_plan",
                 "backward_plan")

    def __init__(self, input, labels, index, weight, axis, options, reduction, out_dtype, loss_fp32, inplace,
                 is_direct):
        self.direct, self.axis, self.options, self.reduction = is_direct, axis, options, reduction
        self.hard, self.weighted, self.inplace = index is not None, weight is not None, inplace
        self.out_dtype, self.loss_fp32 = out_dtype, loss_fp32
        self.loss_dtype = dtypes.row_loss_dtype(input.dtype, None if labels is None else labels.dtype, loss_fp32)
        bshape = batch_shape(input.shape, axis)
        self.batch_view = bshape if len(bshape) != 1 else None  # the kernels' outputs are flat
        self.backend = self.layout = self.forward_plan = self.backward_plan = None
        self.as_is = False
        if not is_direct:
            return  # the custom ops choose the backend and launches when they run
        layout, x, y, t, w = make_rows(input, labels, index, weight, axis)
        if inplace:
            check_inplace(x, input, axis)
        # Row views that are the tensors themselves: a repeat call passes them on as they are.
        self.as_is = x is input and y is labels and t is index and w is weight
        self.layout = layout
        self.backend = backend = backend_for(input.device)
        types = (input.dtype, None if labels is None else labels.dtype)
        self.forward_plan = backend.plan_forward(layout, options, types, self.loss_dtype, self.hard, self.weighted,
                                                 input.device)
        need_dx = input.requires_grad and torch.is_grad_enabled()
        need_dy = labels is not None and labels.requires_grad and torch.is_grad_enabled()
        if need_dx or need_dy:
            # The mean of class indices divides by a device tensor: the kernels divide the gradient by it.
            divide = reduction == "mean" and self.hard
            dy_dtype = dtypes.dlabels_dtype(input, labels) if need_dy else None
            self.backward_plan = backend.plan_backward(layout, options, types, self.hard, self.weighted, need_dx,
                                                       need_dy, dy_dtype, divide, inplace, input.device)

    def views(self, logits, labels, index, weight):
        """The row views of this call's tensors (make_rows)."""
        return make_rows(logits, labels, index, weight, self.axis)[1:]


def _keep(key, call: Call) -> Call:
    if len(_CACHE) >= MAX_CACHED:
        _CACHE.clear()
    _CACHE[key] = call
    return call


def cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap,
                  inplace) -> Call:
    """The Call of ``functional.cross_entropy``."""
    # Triton launches on the current CUDA device: tensors on another one take the custom op, which switches.
    is_direct = direct(input, target, weight) and input is not None and (
        input.device.type != "cuda" or input.device.index == torch.cuda.current_device())
    key = None
    # Options a key holds by value: plain ints and floats (not a NaN), strings and None. Tensors and numpy
    # scalars are taken too, but such a call is prepared anew each time.
    if (is_direct and type(ignore_index) is int and type(reduction) is str and type(label_smoothing) in _SCALARS
            and type(lse_square_scale) in _SCALARS and lse_square_scale == lse_square_scale
            and (softcap is None or type(softcap) in _SCALARS)):
        dev = input.device
        if dev.type in _DEVICES:
            try:
                key = ("cross_entropy", input.shape, input.stride(), input.dtype, dev, input.requires_grad,
                       target.shape, target.stride(), target.dtype, target.device, target.requires_grad,
                       None if weight is None else (weight.shape, weight.stride(), weight.dtype, weight.device,
                                                    weight.requires_grad),
                       ignore_index, reduction, label_smoothing, lse_square_scale, softcap, inplace,
                       torch.is_grad_enabled(), torch.is_autocast_enabled(dev.type), config.active)
                call = _CACHE.get(key)
            except (AttributeError, TypeError):  # not tensors, or a sparse tensor's strides: the checks tell
                key = call = None
            if call is not None:
                return call
    axis, hard = v.check_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                                       lse_square_scale, softcap)
    labels, index = (None, target) if hard else (target, None)
    autocast = torch.is_autocast_enabled(input.device.type)
    out_dtype = dtypes.torch_result_dtype(input.dtype, None if labels is None else labels.dtype,
                                          None if weight is None else weight.dtype, autocast)
    loss_fp32 = dtypes.wide_row_loss(input.dtype, out_dtype, reduction, autocast)
    options = (int(ignore_index), float(label_smoothing), float(lse_square_scale), float(softcap or 0.0))
    call = Call(input, labels, index, weight, axis, options, reduction, out_dtype, loss_fp32,
                inplace and input.requires_grad and torch.is_grad_enabled(), is_direct)
    return call if key is None else _keep(key, call)


def softmax_cross_entropy_with_logits(labels, logits, axis, inplace) -> Call:
    """The Call of ``functional.softmax_cross_entropy_with_logits``."""
    is_direct = direct(labels, logits) and logits is not None and (
        logits.device.type != "cuda" or logits.device.index == torch.cuda.current_device())
    key = None
    if is_direct and type(axis) is int:
        dev = logits.device
        if dev.type in _DEVICES:
            try:
                key = ("softmax_cross_entropy_with_logits", logits.shape, logits.stride(), logits.dtype, dev,
                       logits.requires_grad, labels.shape, labels.stride(), labels.dtype, labels.device,
                       labels.requires_grad, axis, inplace, torch.is_grad_enabled(),
                       torch.is_autocast_enabled(dev.type), config.active)
                call = _CACHE.get(key)
            except (AttributeError, TypeError):
                key = call = None
            if call is not None:
                return call
    axis = v.check_soft_cross_entropy(labels, logits, axis)
    autocast = torch.is_autocast_enabled(logits.device.type)
    call = Call(logits, labels, None, None, axis, (-100, 0.0, 0.0, 0.0), "none",
                dtypes.tf_result_dtype(logits.dtype, autocast), autocast, _inplace(logits, inplace), is_direct)
    return call if key is None else _keep(key, call)


def sparse_softmax_cross_entropy_with_logits(labels, logits, inplace) -> Call:
    """The Call of ``functional.sparse_softmax_cross_entropy_with_logits`` (not cached: the same
    checks as cross_entropy's, with TF's layout)."""
    v.check_logits(logits)
    axis = logits.dim() - 1
    v.check_index_target(labels, logits, axis, name="labels")
    v.check_same_device(labels=labels, logits=logits)
    v.check_classes(logits, axis)
    autocast = torch.is_autocast_enabled(logits.device.type)
    is_direct = direct(labels, logits) and (
        logits.device.type != "cuda" or logits.device.index == torch.cuda.current_device())
    return Call(logits, None, labels, None, axis, (v.IGNORE_NOTHING, 0.0, 0.0, 0.0), "none",
                dtypes.tf_result_dtype(logits.dtype, autocast), autocast, _inplace(logits, inplace), is_direct)


def _inplace(logits, inplace) -> bool:
    return inplace and logits.requires_grad and torch.is_grad_enabled()


def clear_cache():
    """Forget every prepared call (tests that swap the tile table use it)."""
    _CACHE.clear()
