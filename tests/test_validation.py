"""Bad input gets a clear error that names the offending shapes, dtypes or values."""
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


def test_unknown_backend(monkeypatch):
    monkeypatch.setenv("XENT_TRITON_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"XENT_TRITON_BACKEND must be one of .* got 'cuda'"):
        sce(f32(2, 3), f32(2, 3))


def test_not_tensors():
    with pytest.raises(TypeError, match="logits must be a torch.Tensor, got list"):
        sce(f32(2, 3), [[1.0, 2.0, 3.0]])
