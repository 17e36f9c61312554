"""Output allocation for both backends.

Every output buffer comes from ``new_output``. Tests set ``POISON`` so that an
element a kernel forgot to write shows up as that value instead of as whatever
the allocator handed back.
"""
import torch

POISON = None  # set by tests only


def new_output(shape, dtype, device):
    if POISON is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, POISON, dtype=dtype, device=device)
