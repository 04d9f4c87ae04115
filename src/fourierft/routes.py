"""Which path each adapter layer of a model takes, and why: one report for FourierFT's and BOFT's ops."""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack
from typing import Union

import torch
from torch import nn

from .layer import AdapterLayer
from .ops import butterfly_routes, spectral_routes
from .ops.butterfly_routes import RotationChoice
from .ops.spectral_routes import RouteChoice

__all__ = ["explain_routes"]


def explain_routes(model: nn.Module, *args, grad: bool = True, **kwargs) -> list[Union[RouteChoice, RotationChoice]]:
    """Run ``model(*args, **kwargs)`` once and return the route every adapter op took, and why.

    FourierFT linear layers report a :class:`~fourierft.ops.spectral_routes.RouteChoice` (``"spectral"``,
    ``"merged"`` or ``"dense"``), BOFT layers a :class:`~fourierft.ops.butterfly_routes.RotationChoice`
    (``"fused"``, ``"factors"`` or ``"dense"``, one per adapter rotation). Each names the layer, what the rule
    was given (device, dtype, tokens, widths, gradients) and the modelled cost of every candidate;
    ``print(*explain_routes(model, **batch), sep="\\n")`` gives one line per decision. The same lines are logged
    at DEBUG level by ``fourierft.ops.spectral_routes`` and ``fourierft.ops.butterfly_routes`` on every forward.

    Args:
        model: a model holding adapter layers (a :class:`~fourierft.PeftModel` or an injected model).
        *args: the forward's positional inputs.
        **kwargs: the forward's keyword inputs.
        grad: run the forward with gradients enabled (as training does) or not (as inference does).
    """
    names = {m: n for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
    records: list = []
    marks: dict = {}

    def before(module, _args):
        marks[module] = len(records)

    def after(module, _args, _out):
        records[marks[module]:] = [dataclasses.replace(r, layer=names[module]) for r in records[marks[module]:]]

    handles = [h for m in names for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        with ExitStack() as stack:
            stack.enter_context(spectral_routes.recording_routes(records))
            stack.enter_context(butterfly_routes.recording_routes(records))
            stack.enter_context(torch.set_grad_enabled(grad))
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return records
