r"""The FourierFT op: ``[linear(x, W, b) +] x @ (sum_a dW_a)^T`` in one call, one decision, one backward.

:func:`fourierft_linear` is the only entry a layer uses. It decides the route once
(:func:`~fourierft.ops.spectral_routes.choose_route`, from the device, dtypes, shapes, token count, ``n`` and
whether gradients are needed) and runs it through one autograd node, :class:`_FourierFT`, whose backward is
the same for every route:

* input gradient: through the GEMM on ``W + dW`` (route ``"merged"``), or the frozen GEMM plus the
  transposed token map (``"spectral"``);
* spectrum gradient: always the sampled products of ``rfft(x)`` and ``rfft(dL/dy)``
  (:func:`~fourierft.ops.spectral.spectrum_products`). It saves ``x`` (only if a spectrum needs a gradient),
  the weight the GEMMs used, and the spectra: never a ``T x n`` intermediate.

``W + dW`` (route ``"merged"``), or ``dW`` alone (route ``"dense"``), is rebuilt on every call unless the caller
opened :func:`cached_merged_weights`: inside that scope each ``(weight, spectra, scalings)`` builds it once;
leaving the scope frees it. Nothing is kept anywhere
else, and nothing reads a tensor value back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch.autograd.function import once_differentiable

from .spectral import (SpectralPlan, TokenPlan, concat_token_plans, delta_weight, fft_dtype, forward_map,
                       half_spectrum, spectrum_products, transposed_map)
from .scope import active_scope, cached_merged_weights
from .spectral_routes import choose_route

__all__ = ["cached_merged_weights", "fourierft_linear"]

def _scope_key(kind, weight, spectra, scalings, transposed, dtype) -> tuple | None:
    """Which tensors an entry belongs to (ids, held alive by the entry) and their versions; ``None`` for
    inference tensors, which have no version counter and are never cached."""
    tensors = (*spectra,) if weight is None else (weight, *spectra)
    if any(t.is_inference() for t in tensors):
        return None
    return ((kind, None if weight is None else id(weight), transposed, tuple(scalings), tuple(id(s) for s in spectra),
             dtype), tuple(t._version for t in tensors))


def _scoped(kind, weight, spectra, scalings, transposed, dtype, build) -> torch.Tensor:
    """``build()`` without gradients, reused inside :func:`cached_merged_weights` while the tensors' versions
    are unchanged (one entry per layer and kind: a newer version replaces it)."""
    scope = active_scope()
    key = None if scope is None else _scope_key(kind, weight, spectra, scalings, transposed, dtype)
    if key is not None and key[0] in scope and scope[key[0]][0] == key[1]:
        return scope[key[0]][-1]
    with torch.no_grad():
        value = build()
    if key is not None:
        scope[key[0]] = (key[1], weight, tuple(spectra), value)  # holding the tensors keeps their ids unique
    return value


def _merged_weight(weight, weight_plans, spectra, scalings, transposed) -> torch.Tensor:
    """``W + dW`` oriented ``(d_out, d_in)`` in ``weight``'s dtype (route ``"merged"``)."""
    def build():
        merged = delta_weight(spectra, weight_plans, scalings, fft_dtype(weight, *spectra))
        return merged.add_(weight.t() if transposed else weight).to(weight.dtype)

    return _scoped("merged", weight, spectra, scalings, transposed, weight.dtype, build)


def _delta(weight_plans, spectra, scalings, dtype) -> torch.Tensor:
    """``dW`` ``(d_out, d_in)`` in ``dtype`` (route ``"dense"``)."""
    return _scoped("dense", None, spectra, scalings, False, dtype,
                   lambda: delta_weight(spectra, weight_plans, scalings, dtype))


def _coefficients(spectra, scalings, weight, norm, dtype, slots) -> torch.Tensor:
    """Per-entry multipliers ``c_i a / norm * weight`` as ``(R, 2n)`` rows: one row for the summed adapters,
    or (``slots``) one per sample: its adapter's entries, zeros for a sample without adapter."""
    pairs = weight.to(dtype).view(-1, 2)  # [re, im] weight per entry
    if slots is None:
        c = torch.cat([s.detach().to(dtype) * (a / norm) for s, a in zip(spectra, scalings)]) if len(spectra) > 1 \
            else spectra[0].detach().to(dtype) * (scalings[0] / norm)
        return (c.unsqueeze(1) * pairs).view(1, -1)
    table = torch.stack([s.detach().to(dtype) * (a / norm) for s, a in zip(spectra, scalings)]
                        + [pairs.new_zeros(pairs.shape[0])])
    return (table.unsqueeze(2) * pairs).view(table.shape[0], -1).index_select(0, slots)


@dataclass(frozen=True)
class OpSettings:
    """Everything the op's autograd node is given besides the tensors it differentiates or fuses.

    Attributes:
        plan: the token maps of the adapters' positions (one plan, or the adapters' plans concatenated).
        scalings: one scaling ``a`` per adapter.
        cdtype: the FFT dtype (float32, or float64).
        slots: one adapter index per sample (mixed batches), or ``None``: the adapters' sum for every sample.
        transposed: the fused weight is stored ``(d_in, d_out)`` (transformers' ``Conv1D``).
    """

    plan: TokenPlan
    scalings: tuple[float, ...]
    cdtype: torch.dtype
    slots: torch.Tensor | None = None
    transposed: bool = False


class _FourierFT(torch.autograd.Function):
    """``y = [linear(x, W or W + dW, bias)] [+ x @ dW^T on the activations]`` (module docstring).

    Inputs: the :class:`OpSettings`, then ``x``, the frozen ``weight`` and ``bias`` (or ``None``), ``W + dW``
    (route ``"merged"``, or ``None``) and one spectrum per adapter; gradients flow to ``x`` and the spectra."""

    @staticmethod
    def forward(ctx, settings: OpSettings, x, weight, bias, merged, *spectra):
        plan, scalings, cdtype, slots = settings.plan, settings.scalings, settings.cdtype, settings.slots
        d_out, d_in = plan.d_out, plan.d_in
        gemm_weight = merged if merged is not None else weight
        ctx.settings = settings
        ctx.on_activations, ctx.transposed = merged is None, settings.transposed and merged is None
        ctx.x_meta = (x.shape, x.dtype)
        ctx.save_for_backward(x if any(s.requires_grad for s in spectra) else None, gemm_weight, *spectra)
        y = None
        if gemm_weight is not None:
            y = torch.nn.functional.linear(x, gemm_weight.t() if ctx.transposed else gemm_weight, bias)
            if merged is not None:
                return y
        x2 = x.reshape(-1, d_in)
        if x2.shape[0] == 0:
            return y if y is not None else x.new_zeros(*x.shape[:-1], d_out)
        coef = _coefficients(spectra, scalings, plan.fwd_weight, d_in, cdtype, slots)
        delta = forward_map(x2.to(cdtype), plan, coef)
        if y is None:
            return delta.to(x.dtype).reshape(*x.shape[:-1], d_out)
        y.view(-1, d_out).add_(delta.to(y.dtype))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, gemm_weight, *spectra = ctx.saved_tensors
        settings = ctx.settings
        plan, scalings, cdtype, slots = settings.plan, settings.scalings, settings.cdtype, settings.slots
        (x_shape, x_dtype), runs = ctx.x_meta, 1 if slots is None else slots.numel()
        need_x, need_c = ctx.needs_input_grad[1], any(ctx.needs_input_grad[-len(spectra):])
        g2 = grad_y.reshape(-1, plan.d_out)
        grad_x = grad_c = None
        # rfft(dL/dy) once, for the input gradient's map and the spectrum gradient's products
        g_half = half_spectrum(g2.to(cdtype)) if g2.shape[0] and (need_c or need_x and ctx.on_activations) else None
        if need_x:
            if gemm_weight is not None:
                grad_x = grad_y.matmul(gemm_weight if not ctx.transposed else gemm_weight.t())
            if ctx.on_activations and g2.shape[0]:
                coef = _coefficients(spectra, scalings, plan.bwd_weight, plan.d_out, cdtype, slots)
                gx = transposed_map(g_half, plan, coef)
                grad_x = gx.to(x_dtype).reshape(x_shape) if grad_x is None else grad_x.view(-1, plan.d_in).add_(
                    gx.to(grad_x.dtype)).view(x_shape)
            elif grad_x is None:
                grad_x = grad_y.new_zeros(x_shape, dtype=x_dtype)
        if need_c:
            grad_c = _spectrum_grads(x.reshape(-1, plan.d_in).to(cdtype), g_half, plan, spectra, scalings, slots, runs)
        return (None, grad_x, None, None, None, *(grad_c if grad_c is not None else [None] * len(spectra)))


def _spectrum_grads(x2, g_half, plan, spectra, scalings, slots, runs) -> list[torch.Tensor]:
    if x2.shape[0] == 0:
        return [torch.zeros_like(s) for s in spectra]
    prods = spectrum_products(x2, g_half, plan, runs) / (plan.d_out * plan.d_in)  # (runs, n_total)
    if slots is None:
        parts = prods[0].split([s.numel() for s in spectra])
    else:  # one adapter per sample: sum each adapter's samples (the last row collects adapter-less ones)
        parts = prods.new_zeros(len(spectra) + 1, prods.shape[1]).index_add_(0, slots, prods)[:-1]
    return [(part * a).to(s.dtype) for part, a, s in zip(parts, scalings, spectra)]


def _check(x, spectra, plans, scalings, weight, bias, transposed, slots) -> tuple[int, int]:
    if not plans or not (len(spectra) == len(plans) == len(scalings)):
        raise ValueError(f"need one spectrum, plan and scaling per adapter, got "
                         f"{len(spectra)}, {len(plans)}, {len(scalings)}")
    d_out, d_in = plans[0].d_out, plans[0].d_in
    for s, p in zip(spectra, plans):
        if (p.d_out, p.d_in) != (d_out, d_in) or tuple(s.shape) != (p.n,):
            raise ValueError(f"spectrum of shape {tuple(s.shape)} and plan for ({p.d_out}, {p.d_in}) with {p.n} "
                             f"entries do not fit a ({d_out}, {d_in}) weight")
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features, expected d_in={d_in}")
    if weight is not None:
        shape = (d_in, d_out) if transposed else (d_out, d_in)
        if tuple(weight.shape) != shape or weight.dtype != x.dtype:
            raise ValueError(f"weight must be {shape} in x's dtype {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            raise ValueError("fourierft_linear fuses only a frozen weight and bias (requires_grad=False)")
    if slots is not None:
        if len(plans) > 1 and any(p is not plans[0] for p in plans):
            raise ValueError("one adapter per sample needs the adapters to share one plan")
        if x.dim() < 2 or slots.dim() != 1 or slots.numel() != x.shape[0]:
            raise ValueError(f"slots must hold one adapter index per sample ({x.shape[0] if x.dim() else 0}), "
                             f"got {tuple(slots.shape)}")
    return d_out, d_in


def fourierft_linear(x: torch.Tensor, spectra: Sequence[torch.Tensor], plans: Sequence[SpectralPlan],
                     scalings: Sequence[float], *, weight: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None, transposed: bool = False, slots: torch.Tensor | None = None,
                     route: str | None = None) -> torch.Tensor:
    r"""``linear(x, W, bias) + x @ (sum_a dW_a)^T``, or only the second term when ``weight`` is ``None``.

    Differentiable in ``x`` and every spectrum. FFTs run in float64 if ``x`` or a spectrum is float64, else
    float32; the result has ``x``'s dtype.

    Args:
        x: input ``(..., d_in)``, any leading shape (also zero tokens).
        spectra: one coefficient vector ``(n_a,)`` per adapter.
        plans: one :class:`~fourierft.ops.spectral.SpectralPlan` per adapter, one shape, on ``x``'s device.
        scalings: one scaling ``a`` per adapter.
        weight: a **frozen** base weight ``(d_out, d_in)`` (``(d_in, d_out)`` if ``transposed``, transformers'
            ``Conv1D``) in ``x``'s dtype, to fuse the base product in; ``bias`` likewise.
        slots: one adapter index per sample ``(S,)`` (``len(spectra)`` for none): sample ``s`` of
            ``x`` ``(S, ..., d_in)`` gets only its adapter's change (mixed batches; adapters share one plan).
        route: force a route (tests); default: :func:`~fourierft.ops.spectral_routes.choose_route`.

    Raises:
        ValueError: on mismatched lengths, shapes or dtypes, a weight or bias that requires grad, or a
            forced route that does not apply.
    """
    d_out, d_in = _check(x, spectra, plans, scalings, weight, bias, transposed, slots)
    scalings = [float(a) for a in scalings]
    grad = torch.is_grad_enabled() and (x.requires_grad or any(s.requires_grad for s in spectra))
    scope = active_scope()  # None while Dynamo traces: it cannot read context variables
    chosen = choose_route(
        x.device, tokens=x.numel() // d_in, d_out=d_out, d_in=d_in, n=sum(p.n for p in plans), grad=grad,
        fused=weight is not None, weight_dtype=None if weight is None else weight.dtype,
        amortised=not grad and scope is not None, per_sample=slots is not None, route=route)
    cdtype = fft_dtype(x, *spectra)
    if chosen == "dense":
        dw = _delta([p.weight for p in plans], spectra, scalings, cdtype)
        with torch.no_grad():
            return torch.nn.functional.linear(x.to(cdtype), dw).to(x.dtype)
    merged = None
    if chosen == "merged":
        merged = _merged_weight(weight, [p.weight for p in plans], spectra, scalings, transposed)
    token_plan = plans[0].tokens if slots is not None else concat_token_plans([p.tokens for p in plans])
    slots = None if slots is None else slots.to(torch.long)
    settings = OpSettings(token_plan, tuple(scalings), cdtype, slots, transposed)
    return _FourierFT.apply(settings, x, weight, bias, merged, *spectra)
