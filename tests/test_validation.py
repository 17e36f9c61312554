"""Bad input gets a clear error that names the offending shapes, dtypes or values."""
import fractions
import re

import numpy as np
import pytest
import torch

import xent_triton
from xent_triton import cross_entropy, softmax_cross_entropy_with_logits as sce


def f32(*shape):
    return torch.randn(*shape)


def test_soft_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"labels shape \(4, 6\) must equal logits shape \(4, 5\)"):
        sce(f32(4, 6), f32(4, 5))
    with pytest.raises(ValueError, match=r"labels shape \(3, 5\) must equal logits shape \(4, 5\)"):
        sce(f32(3, 5), f32(4, 5))
    with pytest.raises(ValueError, match=r"labels shape \(2, 4, 5\)"):
        sce(f32(2, 4, 5), f32(4, 5))
    with pytest.raises(ValueError, match=r"labels shape \(4, 1\)"):  # the class axis never broadcasts
        sce(f32(4, 1), f32(4, 5))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_logits(dtype):
    with pytest.raises(TypeError, match=f"logits must have a floating dtype .* got {dtype}"):
        sce(f32(2, 3), torch.zeros(2, 3, dtype=dtype))


def test_integer_soft_labels_point_to_sparse_api():
    with pytest.raises(TypeError, match=r"labels must have a floating dtype .*torch.int64.*sparse_softmax"):
        sce(torch.zeros(2, 3, dtype=torch.int64), f32(2, 3))


def test_axis_out_of_range():
    with pytest.raises(IndexError, match=r"axis 2 is out of range for logits of rank 2"):
        sce(f32(2, 3), f32(2, 3), axis=2)
    with pytest.raises(IndexError, match=r"axis -3 is out of range"):
        sce(f32(2, 3), f32(2, 3), axis=-3)
    with pytest.raises(TypeError, match="axis must be an int"):
        sce(f32(2, 3), f32(2, 3), axis=1.0)


def test_zero_dim_and_no_classes():
    with pytest.raises(ValueError, match="at least one dimension"):
        sce(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"logits of shape \(3, 0\) has no classes along axis 1"):
        sce(f32(3, 0), f32(3, 0))


def test_mixed_devices():
    meta = torch.empty(2, 3, device="meta")
    with pytest.raises(ValueError, match=r"one device, got labels on cpu, logits on meta"):
        sce(f32(2, 3), meta)
    with pytest.raises(ValueError, match=r"input on cpu, target on meta"):
        cross_entropy(f32(2, 3), torch.zeros(2, dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match=r"weight on meta"):
        cross_entropy(f32(2, 3), torch.zeros(2, dtype=torch.int64), weight=torch.ones(3, device="meta"))


def test_cross_entropy_target_errors():
    with pytest.raises(ValueError, match=r"target shape \(3,\) does not match input shape \(2, 5\): expected \(2,\)"):
        cross_entropy(f32(2, 5), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="class-index target must be int64 or int32, got torch.int16"):
        cross_entropy(f32(2, 5), torch.zeros(2, dtype=torch.int16))
    with pytest.raises(ValueError, match=r"probability target shape \(2, 4\) must equal input shape \(2, 5\)"):
        cross_entropy(f32(2, 5), f32(2, 4))
    with pytest.raises(TypeError, match=r"labels must be int64 or int32"):
        xent_triton.sparse_softmax_cross_entropy_with_logits(f32(2), f32(2, 5))


@pytest.mark.parametrize("eps", [-0.1, 1.5])
def test_label_smoothing_range(eps):
    with pytest.raises(ValueError, match=f"label_smoothing must be in \\[0, 1\\], got {eps}"):
        cross_entropy(f32(2, 5), torch.zeros(2, dtype=torch.int64), label_smoothing=eps)


def test_unknown_reduction():
    with pytest.raises(ValueError, match=r"reduction must be one of \('none', 'mean', 'sum'\), got 'avg'"):
        cross_entropy(f32(2, 5), torch.zeros(2, dtype=torch.int64), reduction="avg")


def test_weight_errors():
    t = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"weight must be a 1-D tensor of 5 elements .* got shape \(4,\)"):
        cross_entropy(f32(2, 5), t, weight=torch.ones(4))
    with pytest.raises(ValueError, match=r"got shape \(5, 1\)"):
        cross_entropy(f32(2, 5), t, weight=torch.ones(5, 1))
    with pytest.raises(TypeError, match="weight must have a floating dtype"):
        cross_entropy(f32(2, 5), t, weight=torch.ones(5, dtype=torch.int64))
    with pytest.raises(NotImplementedError, match="weight"):
        cross_entropy(f32(2, 5), t, weight=torch.ones(5, requires_grad=True))


def test_softcap_must_be_positive():
    with pytest.raises(ValueError, match="softcap must be a positive number or None, got 0"):
        cross_entropy(f32(2, 5), torch.zeros(2, dtype=torch.int64), softcap=0)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'cuda'"):
        xent_triton.set_backend("cuda")


def test_not_tensors():
    with pytest.raises(TypeError, match="logits must be a torch.Tensor, got list"):
        sce(f32(2, 3), [[1.0, 2.0, 3.0]])


# torch's argument rules (issue: a float ignore_index zeroed a row yet divided the mean by every row).
BAD_IGNORE_INDEX = [(1.5, TypeError), ("1", TypeError), (True, TypeError), (None, TypeError), (np.True_, TypeError),
                    (torch.tensor(True), TypeError), (torch.tensor(1.0), TypeError), (2**64 - 100, ValueError),
                    (2**63, ValueError)]


def _hard(device, n=4, C=5):
    return torch.randn(n, C, device=device), torch.arange(n, device=device) % C


@pytest.mark.parametrize("bad,error", BAD_IGNORE_INDEX, ids=repr)
def test_ignore_index_must_be_an_int64(backend, device, bad, error):
    x, t = _hard(device)
    for call in (lambda: cross_entropy(x, t, ignore_index=bad),
                 lambda: cross_entropy(x, torch.softmax(x, 1), ignore_index=bad),
                 lambda: xent_triton.CrossEntropyLoss(ignore_index=bad)(x, t),
                 # (None is linear_cross_entropy's default: -100 for class indices.)
                 lambda: xent_triton.linear_cross_entropy(x, torch.randn(3, 5, device=device), t % 3,
                                                          ignore_index=1.5 if bad is None else bad)):
        with pytest.raises(TypeError if bad is None else error, match="ignore_index must"):
            call()


@pytest.mark.parametrize("index", [1, np.int64(1), np.uint8(1), np.array(1), torch.tensor(1), torch.tensor([1]),
                                   torch.tensor(1, dtype=torch.int32)], ids=repr)
def test_ignore_index_integer_scalars_like_torch(backend, device, index):
    """Integers of other types (numpy, 0-d integer tensors) are accepted, as torch's int arguments take them."""
    x, t = _hard(device)
    torch.testing.assert_close(cross_entropy(x.double(), t, ignore_index=index),
                               torch.nn.functional.cross_entropy(x.double(), t, ignore_index=1))


@pytest.mark.parametrize("name,bad,error,match", [
    ("reduction", 1, ValueError, "reduction must be one of"),
    ("reduction", None, ValueError, "reduction must be one of"),
    ("label_smoothing", "0.1", TypeError, "label_smoothing must be a float, got str"),
    ("label_smoothing", None, TypeError, "label_smoothing must be a float, got NoneType"),
    ("label_smoothing", float("nan"), ValueError, r"label_smoothing must be in \[0, 1\]"),
    # torch's float arguments take 0-d tensors and numpy scalars, not these:
    ("label_smoothing", torch.tensor([0.1]), TypeError, "label_smoothing must be a float, got Tensor"),
    ("label_smoothing", np.array(0.1), TypeError, "label_smoothing must be a float, got ndarray"),
    ("label_smoothing", fractions.Fraction(1, 10), TypeError, "label_smoothing must be a float, got Fraction"),
    ("lse_square_scale", "1e-4", TypeError, "lse_square_scale must be a float, got str"),
    ("lse_square_scale", None, TypeError, "lse_square_scale must be a float"),
    ("softcap", "30", TypeError, "softcap must be a float, got str"),
    ("softcap", [30.0], TypeError, "softcap must be a float, got list"),
], ids=repr)
def test_option_types(backend, device, name, bad, error, match):
    x, t = _hard(device)
    with pytest.raises(error, match=match):
        cross_entropy(x, t, **{name: bad})
    with pytest.raises(error, match=match):
        xent_triton.linear_cross_entropy(x, torch.randn(3, 5, device=device), t % 3, **{name: bad})


@pytest.mark.parametrize("value", [0.1, np.float64(0.1), np.float32(0.25), np.True_, torch.tensor(0.1), torch.tensor(0),
                                   1, True], ids=repr)
def test_label_smoothing_real_scalars_like_torch(backend, device, value):
    x, t = _hard(device)
    x = x.double()
    torch.testing.assert_close(cross_entropy(x, t, label_smoothing=value),
                               torch.nn.functional.cross_entropy(x, t, label_smoothing=float(value)))


@pytest.mark.parametrize("arg,bad,error,match", [("ignore_index", 1.5, TypeError, "ignore_index must be an int"),
                                                 ("ignore_index", 2**64 - 100, ValueError,
                                                  "ignore_index must fit in int64"),
                                                 ("reduction", "x", ValueError, "reduction must be one of"),
                                                 ("label_smoothing", -0.1, ValueError, "label_smoothing must be in")],
                         ids=repr)
def test_patched_torch_gives_one_error_on_every_route(backend, device, arg, bad, error, match):
    """Under patch_torch a call goes to torch's function (CPU tensors, the fallback) or to xent_triton's
    (the kernels): a bad argument gets the same error either way."""
    x, t = _hard(device)
    with xent_triton.patch_torch():
        with pytest.raises(error, match=match):
            torch.nn.functional.cross_entropy(x, t, **{arg: bad})
        with pytest.raises(error, match=match):
            torch.nn.CrossEntropyLoss(**{arg: bad})(x, t)


@pytest.mark.parametrize("shape,tshape", [((4, 5), (4,)), ((2, 5, 3), (2, 3)), ((5,), ())])
def test_float_class_indices_name_the_dtype(backend, device, shape, tshape):
    """A floating target of the shape class indices have: the dtype is what is wrong, on every route."""
    x = torch.randn(shape, device=device)
    t = torch.randint(0, 5, tshape, device=device).float()
    match = r"class indices must be int64 or int32, and probabilities must have the shape " + re.escape(str(shape))
    with pytest.raises(TypeError, match=match):
        cross_entropy(x, t)
    with xent_triton.patch_torch(), pytest.raises(TypeError, match=match):
        torch.nn.functional.cross_entropy(x, t)
    with pytest.raises(TypeError, match="class indices must be int64 or int32"):
        xent_triton.linear_cross_entropy(torch.randn(4, 5, device=device), torch.randn(3, 5, device=device),
                                         torch.rand(4, device=device))


def test_sparse_api_names_only_its_own_arguments(backend, device):
    """TF's sparse loss has no ignore_index: its out-of-range error must not show the internal sentinel."""
    labels = torch.tensor([0, 3], device=device)
    logits = torch.randn(2, 3, device=device)
    if backend == "torch":
        with pytest.raises(IndexError) as info:
            xent_triton.sparse_softmax_cross_entropy_with_logits(labels, logits)
        assert str(info.value) == "class index 3 is out of range for 3 classes"
    else:  # the kernels give the row NaN (as TF on the GPU), the other row its loss
        out = xent_triton.sparse_softmax_cross_entropy_with_logits(labels, logits)
        assert torch.isfinite(out[0]) and torch.isnan(out[1])
    # cross_entropy, which has one, names it.
    if backend == "torch":
        with pytest.raises(IndexError, match=r"out of range for 3 classes \(ignore_index=-100\)"):
            cross_entropy(logits, labels)
    # The sparse API ignores nothing: a label of -2**63 (its internal "ignore nothing" value) is out of range too.
    labels = torch.tensor([-(2**63), 1], device=device)
    if backend == "torch":
        with pytest.raises(IndexError, match="class index -9223372036854775808 is out of range for 3 classes$"):
            xent_triton.sparse_softmax_cross_entropy_with_logits(labels, logits)
    else:
        out = xent_triton.sparse_softmax_cross_entropy_with_logits(labels, logits)
        assert torch.isnan(out[0]) and torch.isfinite(out[1])
