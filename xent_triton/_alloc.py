"""Poisoned output allocation, for tests.

Tests set ``POISON`` so that an element a kernel forgot to write shows up as that
value instead of as whatever the allocator handed back. The fallback allocates its
outputs with ``new_output``; the Triton backend's ``_new`` reads the same ``POISON``
(in its own module: a repeat call's route stays within five modules, README "How a
call flows").
"""
import torch

POISON = None  # set by tests only


def new_output(shape, dtype, device):
    if POISON is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, POISON, dtype=dtype, device=device)
