"""Derived index tensors are computed for real, on the CPU, whatever mode is active, then placed on a device.

Frequency entries and butterfly permutations are functions of a seed and a shape, never of the model's
values. Computing them on real CPU tensors means their checks (ranges, identity tests) read values where that
costs no device synchronisation, also while a model is built on the meta device or inside ``FakeTensorMode``
(``torch.compile`` tracing, CUDA-typed fake tensors on a CPU-only machine). :func:`place` then moves a result
to the target device; inside ``FakeTensorMode`` it makes a fake tensor of the same shape and dtype there (a
fake tensor carries no values, and one converted from real data would keep them as a constant that the mode
then evaluates on the real device, which a CPU-only build cannot do for CUDA).
"""

from __future__ import annotations

import torch
from torch._guards import detect_fake_mode  # private API, pinned by tests/test_private_api.py
from torch.utils._python_dispatch import _disable_current_modes  # private API, pinned likewise


def on_real_cpu(make, *args, **kwargs):
    """``make(*args, **kwargs)`` with every dispatch mode off and the CPU as default device."""
    with _disable_current_modes(), torch.device("cpu"):
        return make(*args, **kwargs)


def place(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A real CPU tensor ``t`` on ``device``; inside ``FakeTensorMode`` a fake tensor of its shape and dtype."""
    fake = detect_fake_mode()
    if fake is None:
        return t.to(device)
    with fake:
        return torch.empty(t.shape, dtype=t.dtype, device=device)
