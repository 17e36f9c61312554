"""Route ``torch.nn.functional.cross_entropy`` to xent_triton, for training code you do not own.

Model libraries call ``torch.nn.functional.cross_entropy`` (or ``nn.CrossEntropyLoss``, which calls it)
deep inside their training code. :func:`patch_torch` swaps that attribute for a function with torch's
exact signature that sends the calls the kernels run to :func:`xent_triton.cross_entropy`, and the calls
they would run differently or not at all to the function it replaced.
"""
import functools
from typing import Callable, Optional

import torch
from torch import Tensor
import torch.nn.functional as TF
from torch.overrides import handle_torch_function, has_torch_function, has_torch_function_variadic
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

from . import config, functional, prepare
from . import validation as v

_MARK = "__xent_triton_replaces__"
# torch.compile and torch.export trace the patched function on these; the custom ops take them.
_TRACED = (FakeTensor, FunctionalTensor)


def _user_subclass(tensors) -> bool:
    return any(t is not None and type(t) not in prepare.PLAIN_TENSORS and not isinstance(t, _TRACED) for t in tensors)


def _ours(tensors, weight) -> bool:
    """Whether a call goes to xent_triton: the Triton backend would run it (CUDA tensors, or the
    interpreter), on plain tensors (a subclass such as DTensor keeps torch's own handling), with no
    gradient wanted for ``weight``, outside torch.func transforms and forward-mode AD, which the
    kernels have no formula for."""
    if _user_subclass(tensors):
        return False
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        return False
    if prepare.in_functorch():
        return False
    if not torch.compiler.is_compiling():
        if torch.autograd.forward_ad._current_level >= 0 and any(
                t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors):
            return False
    return _runs_kernels(tensors[0].device)


def _runs_kernels(device: torch.device) -> bool:
    # Traced by torch.compile, the route is fixed when the graph is made (its custom op still reads the
    # backend variable at each call); Dynamo runs this instead of tracing the backend's cached lookups.
    return device.type in ("cuda", "cpu") and config.choose_backend(device.type, config.active) == "triton"


# What torch.compiler.assume_constant_result(_runs_kernels) would do, without its import of torch._dynamo,
# which takes a second and loads triton (whose LLVM aborts a process that has loaded TensorFlow's). A test
# checks that the decorator sets this flag (tests/test_torch_patch.py); without it Dynamo traces the function.
_runs_kernels._dynamo_marked_constant = True


def _wrap(original):
    """torch's name, module and docs for the wrapper (not its ``__wrapped__``: TorchScript would compile
    torch's source with this module's globals), and the function it replaces."""
    def decorate(wrapper):
        wrapper = functools.wraps(original, assigned=("__module__", "__name__", "__qualname__", "__doc__"),
                                  updated=())(wrapper)
        del wrapper.__wrapped__
        setattr(wrapper, _MARK, original)
        return wrapper
    return decorate


def _overridden(tensors) -> bool:
    """Whether the __torch_function__ override that a call has (a tensor subclass's, or a mode's) is the
    user's. Then it gets torch's function, as it did before the patch; the original's own check would
    hand it the patched module attribute instead. torch.compile and torch.export trace with overrides of
    their own: the call stays ours there, unless a user subclass is among the tensors."""
    return not torch.compiler.is_compiling() or _user_subclass(tensors)


def _cross_entropy_route(input, target, weight) -> bool:
    """Class-index targets torch takes and the kernels do not (uint8), and inputs without classes, stay
    with torch. A floating target of another shape than the input's goes to xent_triton, on any device:
    its error (class indices of a floating dtype, or a shape mismatch) is then the same everywhere."""
    if not target.is_floating_point() and target.dtype not in (torch.int64, torch.int32):
        return False
    if target.is_floating_point() and target.shape != input.shape:
        return True
    return input.shape[1 if input.dim() > 1 else 0] > 0 and _ours((input, target, weight), weight)


@torch.jit.unused
def _patched_cross_entropy(original: Callable, input: Tensor, target: Tensor, weight: Optional[Tensor],
                           size_average: Optional[bool], ignore_index: int, reduce: Optional[bool], reduction: str,
                           label_smoothing: float) -> Tensor:
    if has_torch_function_variadic(input, target, weight) and _overridden((input, target, weight)):
        return handle_torch_function(original, (input, target, weight), input, target, weight=weight,
                                     size_average=size_average, ignore_index=ignore_index, reduce=reduce,
                                     reduction=reduction, label_smoothing=label_smoothing)
    # The scalar arguments get xent_triton's checks whichever way the call goes: the same error on every route.
    v.check_options(reduction if size_average is None and reduce is None else "mean", label_smoothing, None,
                    ignore_index)
    fn = functional.cross_entropy if _cross_entropy_route(input, target, weight) else original
    return fn(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing)


def _cross_entropy_for(original):
    # TorchScript compiles this (torch.jit.script of a module that holds nn.CrossEntropyLoss): the scripted
    # code calls torch's function, as it did before the patch.
    @_wrap(original)
    def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                      size_average: Optional[bool] = None, ignore_index: int = -100, reduce: Optional[bool] = None,
                      reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
        if torch.jit.is_scripting():
            return original(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        return _patched_cross_entropy(original, input, target, weight, size_average, ignore_index, reduce,
                                      reduction, label_smoothing)

    return cross_entropy


def _linear_cross_entropy_for(original):
    @_wrap(original)
    def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                             ignore_index=None, label_smoothing=0.0, options=None):
        tensors = (input, linear_weight, target, linear_bias, weight)
        kwargs = dict(linear_bias=linear_bias, weight=weight, reduction=reduction, ignore_index=ignore_index,
                      label_smoothing=label_smoothing, options=options)
        if has_torch_function(tensors) and _overridden(tensors):
            return handle_torch_function(original, tensors, input, linear_weight, target, **kwargs)
        v.check_options(reduction, label_smoothing, None, -100 if ignore_index is None else ignore_index)
        # Probability targets that require grad, and uint8 class indices, stay with torch.
        ours = (not target.requires_grad if target.is_floating_point()
                else target.dtype in (torch.int64, torch.int32)) and _ours(tensors, weight)
        return (functional.linear_cross_entropy if ours else original)(input, linear_weight, target, **kwargs)

    return linear_cross_entropy


_WRAPPERS = {"cross_entropy": _cross_entropy_for, "linear_cross_entropy": _linear_cross_entropy_for}


class TorchPatch:
    """What :func:`patch_torch` installed. ``remove()`` puts torch's functions back; used as a context
    manager, the patch ends with the block."""

    def __init__(self, installed):
        self._installed = installed  # {name: our wrapper}

    def remove(self) -> None:
        for name, wrapper in list(self._installed.items()):
            if getattr(TF, name) is not wrapper:
                raise RuntimeError(f"torch.nn.functional.{name} was replaced again after this patch; remove "
                                   f"the later patch first")
        for name, wrapper in self._installed.items():
            setattr(TF, name, getattr(wrapper, _MARK))
        self._installed = {}

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            self.remove()
        except RuntimeError:
            if exc_type is None:
                raise  # else the block's own exception is the one to see


def patch_torch(*, cross_entropy: bool = True, linear_cross_entropy: bool = False) -> TorchPatch:
    r"""Make ``torch.nn.functional.cross_entropy``, and with it ``torch.nn.CrossEntropyLoss``, run
    xent_triton's kernels.

    Calls on CUDA tensors (CPU tensors too under ``TRITON_INTERPRET=1``) go to
    :func:`xent_triton.cross_entropy` with the same arguments. These go to the function the patch
    replaced: CPU tensors (torch's CPU kernels are faster than the fallback); tensor subclasses such as
    DTensor and ``__torch_function__`` modes, which see torch's function as before; a ``weight`` that
    requires grad; ``torch.func`` transforms and forward-mode AD; uint8 class indices; inputs without
    classes. Under ``torch.jit.script`` the scripted code calls torch's function.

    Graphs exported or traced through the patched loss need ``import xent_triton`` to load. Code that
    bound the function before the patch (``from torch.nn.functional import cross_entropy``) keeps
    torch's, and pickling a reference to torch's function fails while the patch is on.

    Args:
        cross_entropy (bool): patch ``cross_entropy``. Default: True.
        linear_cross_entropy (bool): also patch ``torch.nn.functional.linear_cross_entropy`` (torch >=
            2.13; ``nn.LinearCrossEntropyLoss`` calls it) with :func:`xent_triton.linear_cross_entropy`,
            which computes in row chunks. Probability targets that require grad and uint8 class indices
            stay with torch; a second backward through the same graph (``retain_graph=True``) raises.
            Default: False.

    Returns:
        A :class:`TorchPatch`: call ``remove()``, or use it in a ``with`` block.

    Example::

        >>> patch = xent_triton.patch_torch()
        >>> loss = model(input_ids, labels=labels).loss   # the model's F.cross_entropy is ours
        >>> patch.remove()
    """
    wanted = {"cross_entropy": cross_entropy, "linear_cross_entropy": linear_cross_entropy}
    installed = {}
    for name, make in _WRAPPERS.items():
        if wanted[name] and hasattr(TF, name):
            installed[name] = make(getattr(TF, name))
            setattr(TF, name, installed[name])
    return TorchPatch(installed)
