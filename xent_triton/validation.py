"""Argument checks for the public API. Every message names the offending values."""
import operator

import torch

from .dtypes import FLOAT_DTYPES, INDEX_DTYPES
REDUCTIONS = ("none", "mean", "sum")
# The ignore_index of TF's sparse loss, which ignores nothing: with it, a class index of this value is out of
# range (an error on the fallback, NaN in the kernels) like every other negative one, not ignored. (So an
# explicit ignore_index=-2**63 in cross_entropy ignores nothing either, where torch would skip such rows.)
IGNORE_NOTHING = -(2**63)


def check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float(name, t):
    check_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {t.dtype}")


def check_same_device(**tensors):
    named = [(n, t) for n, t in tensors.items() if t is not None]
    devices = {t.device for _, t in named}
    if len(devices) > 1:
        desc = ", ".join(f"{n} on {t.device}" for n, t in named)
        raise ValueError(f"all tensors must be on one device, got {desc}")


def normalize_axis(axis, ndim):
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise IndexError(f"axis {axis} is out of range for logits of rank {ndim} (expected {-ndim} <= axis < {ndim})")
    return axis % ndim


def check_logits(logits, name="logits"):
    check_float(name, logits)
    if logits.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (the classes), got a 0-d tensor")


def check_classes(logits, axis, name="logits"):
    if logits.shape[axis] == 0:
        raise ValueError(f"{name} of shape {tuple(logits.shape)} has no classes along axis {axis}")


def check_soft_labels(labels, logits, axis, name="labels"):
    """Labels must equal the logits' shape, or broadcast to it along non-class axes."""
    check_tensor(name, labels)
    if labels.dtype not in FLOAT_DTYPES:
        hint = (" ; for class indices use sparse_softmax_cross_entropy_with_logits or cross_entropy"
                if not labels.dtype.is_floating_point else "")
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), "
                        f"got {labels.dtype}{hint}")
    ok = labels.dim() <= logits.dim()
    if ok:
        try:
            ok = torch.broadcast_shapes(labels.shape, logits.shape) == logits.shape
        except RuntimeError:
            ok = False
    lead = logits.dim() - labels.dim()
    if ok and axis >= lead:
        ok = labels.shape[axis - lead] == logits.shape[axis]
    elif ok:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} shape {tuple(labels.shape)} must equal logits shape {tuple(logits.shape)} "
            f"(or broadcast to it along non-class axes, with {logits.shape[axis]} classes on axis {axis})")


def check_index_target(target, logits, axis, name="target"):
    check_tensor(name, target)
    if target.dtype not in INDEX_DTYPES:
        raise TypeError(f"class-index {name} must be int64 or int32, got {target.dtype}")
    expected = tuple(s for i, s in enumerate(logits.shape) if i != axis)
    if tuple(target.shape) != expected:
        raise ValueError(f"{name} shape {tuple(target.shape)} does not match input shape {tuple(logits.shape)}: "
                         f"expected {expected} (the input's shape without class axis {axis})")


def check_weight(weight, n_classes):
    if weight is None:
        return
    check_float("weight", weight)
    if weight.dim() != 1 or weight.shape[0] != n_classes:
        raise ValueError(f"weight must be a 1-D tensor of {n_classes} elements (one per class), "
                         f"got shape {tuple(weight.shape)}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("gradients with respect to weight are not supported; pass weight.detach()")


def check_int64(name, value):
    """torch's rule for an int argument: a Python int or an integer scalar (numpy, an integer tensor of one
    element), not a bool, within int64's range; TypeError or ValueError (torch's types) otherwise."""
    index = None
    boolean = isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)
    if not boolean:
        try:
            index = operator.index(value)
        except TypeError:
            pass
    if index is None:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not -(2**63) <= index < 2**63:
        raise ValueError(f"{name} must fit in int64 (-2**63 <= {name} < 2**63), got {index}")
    return index


def check_real(name, value):
    """torch's rule for a float argument: a real number, that is a bool, int or float, a real numpy scalar
    or a 0-d real tensor (not a Fraction, a Decimal, an array or a 1-element 1-d tensor); TypeError
    otherwise."""
    if isinstance(value, torch.Tensor):
        ok = value.dim() == 0 and not value.is_complex()
    elif type(value).__module__ == "numpy":
        import numpy  # already imported: the value is one of its scalars

        ok = isinstance(value, numpy.generic) and not numpy.iscomplexobj(value)
    else:
        ok = isinstance(value, (bool, int, float))
    if not ok:
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    return float(value)


def check_options(reduction, label_smoothing, softcap, ignore_index=-100, lse_square_scale=0.0):
    """The scalar options of cross_entropy and its relatives: types first (TypeError), then values."""
    check_int64("ignore_index", ignore_index)
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= check_real("label_smoothing", label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    check_real("lse_square_scale", lse_square_scale)
    if softcap is not None and not check_real("softcap", softcap) > 0.0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap}")


def float_class_indices(target, input_shape, probabilities_shape):
    """The error for a floating target of the class indices' shape: the usual slip is its dtype, not its
    shape."""
    return TypeError(f"target of dtype {target.dtype} and shape {tuple(target.shape)} for input shape "
                     f"{tuple(input_shape)}: class indices must be int64 or int32, and probabilities must have "
                     f"the shape {tuple(probabilities_shape)}")


def check_cross_entropy_target(input, target, ignore_index):
    """torch's layout rules for cross_entropy: returns (class axis, whether target holds class indices).
    ``ignore_index`` must have passed check_options."""
    check_logits(input, "input")
    axis = 1 if input.dim() >= 2 else 0
    hard = isinstance(target, torch.Tensor) and not target.dtype.is_floating_point
    if hard:
        check_index_target(target, input, axis)
        return axis, hard
    check_float("target", target)
    if tuple(target.shape) != tuple(input.shape):
        if tuple(target.shape) == tuple(s for i, s in enumerate(input.shape) if i != axis):
            raise float_class_indices(target, input.shape, input.shape)
        raise ValueError(f"probability target shape {tuple(target.shape)} must equal input shape "
                         f"{tuple(input.shape)}")
    if ignore_index >= 0:
        # torch's rule and error (RuntimeError): a negative index cannot match a class, so it is allowed.
        raise RuntimeError(f"ignore_index is not supported for floating point target (got {ignore_index})")
    return axis, hard


def check_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap):
    """Every argument check of ``cross_entropy``: returns (class axis, whether target holds class indices)."""
    check_options(reduction, label_smoothing, softcap, ignore_index, lse_square_scale)
    axis, hard = check_cross_entropy_target(input, target, ignore_index)
    check_same_device(input=input, target=target, weight=weight)
    check_classes(input, axis, "input")
    check_weight(weight, input.shape[axis])
    return axis, hard


def check_soft_cross_entropy(labels, logits, axis):
    """Every argument check of ``softmax_cross_entropy_with_logits``: returns the non-negative class axis."""
    check_logits(logits)
    axis = normalize_axis(axis, logits.dim())
    check_soft_labels(labels, logits, axis)
    check_same_device(labels=labels, logits=logits)
    check_classes(logits, axis)
    return axis
