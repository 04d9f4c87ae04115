r"""Spectral (FourierFT) operators: frequency indices, the dense delta weight, and a fast apply.

A FourierFT adapter on a weight of shape ``(d_out, d_in)`` holds ``n`` real coefficients ``c`` at
frequency entries ``(p_i, q_i)``. Its weight update is (PEFT's definition)

.. math::
    \Delta W = a\,\mathrm{Re}(\mathrm{ifft2}(S)),\quad S[p_i, q_i] = c_i,\qquad
    \Delta W_{jk} = \frac{a}{d_{out} d_{in}} \sum_i c_i \cos 2\pi\Big(\frac{p_i j}{d_{out}} +
    \frac{q_i k}{d_{in}}\Big).

:func:`spectral_apply` computes ``x @ dW.T`` without ``dW``. For one token ``x`` (real)

.. math::
    X_i = \sum_k x_k e^{+2\pi i q_i k/d_{in}},\qquad
    (\Delta W x)_j = \frac{a}{d_{out} d_{in}} \mathrm{Re}\sum_i c_i X_i e^{2\pi i p_i j/d_{out}}.

``X_i`` is read from ``R = rfft(x)`` at bin ``g_i = min(q_i, d_in - q_i)``, conjugated when
``q_i <= d_in/2``. Entries with ``p_i > d_out/2`` are folded onto bin ``h_i = d_out - p_i`` with the
value conjugated (the real part is unchanged); the sum is accumulated into a half spectrum ``H``
(interior bins halved) and ``dW x = a/d_in * irfft(H, d_out)``. Both conjugations together flip the
sign of the imaginary part by ``sigma_i = s_i f_i``, so on the real/imaginary parts the map is

.. math::
    \mathrm{Re} H_{h_i} \mathrel{+}= w_i c_i\, \mathrm{Re} R_{g_i},\qquad
    \mathrm{Im} H_{h_i} \mathrel{+}= w_i c_i \sigma_i\, \mathrm{Im} R_{g_i}.

Backward is the same map with the roles of ``(p, d_out)`` and ``(q, d_in)`` swapped (the sign
``sigma`` is unchanged), applied to ``G = rfft(dL/dy)``; the coefficient gradient is

.. math::
    \frac{\partial L}{\partial c_i} = \frac{a}{d_{out} d_{in}} \sum_t
    \big(\mathrm{Re} R_{t,g_i} \mathrm{Re} G_{t,h_i} + \sigma_i \mathrm{Im} R_{t,g_i}
    \mathrm{Im} G_{t,h_i}\big).

Cost per step: ``O(T (d_in log d_in + d_out log d_out) + T n)``; no tensor of ``d_out * d_in``
elements is created on the spectral path.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch
from torch.autograd.function import once_differentiable

logger = logging.getLogger(__name__)

__all__ = [
    "SpectralPlan",
    "band_frequency_indices",
    "dense_delta_weight",
    "frequency_indices",
    "make_spectral_plan",
    "plan_buffers",
    "plan_from_buffers",
    "spectral_apply",
]


def _check_count(n: int, d_out: int, d_in: int) -> None:
    if d_out < 1 or d_in < 1:
        raise ValueError(f"weight shape must be positive, got (d_out, d_in)=({d_out}, {d_in})")
    if not 0 < n <= d_out * d_in:
        raise ValueError(f"n_frequency={n} is out of range: it must be in [1, {d_out * d_in}] "
                         f"(d_out * d_in for a ({d_out}, {d_in}) weight)")


def _flat_to_indices(flat: torch.Tensor, d_in: int) -> torch.Tensor:
    return torch.stack([flat // d_in, flat % d_in])


def frequency_indices(d_out: int, d_in: int, n: int, seed: int) -> torch.Tensor:
    """PEFT's frequency entries: the first ``n`` of a seeded ``randperm(d_out * d_in)``.

    Always uses a CPU generator, so the entries do not depend on the model's device.

    Args:
        d_out: rows of the weight (output features).
        d_in: columns of the weight (input features).
        n: number of entries, ``1 <= n <= d_out * d_in``.
        seed: seed of the CPU generator (PEFT's ``random_loc_seed``).

    Returns:
        int64 tensor of shape ``(2, n)``: row 0 holds output rows ``p``, row 1 input columns ``q``.

    Raises:
        ValueError: if ``n`` or the shape is out of range.
    """
    _check_count(n, d_out, d_in)
    gen = torch.Generator().manual_seed(seed)
    return _flat_to_indices(torch.randperm(d_out * d_in, generator=gen)[:n], d_in)


def _radial_band_weights(d_out: int, d_in: int, center: float, width: float) -> torch.Tensor:
    fp = torch.arange(d_out, dtype=torch.float64)
    fq = torch.arange(d_in, dtype=torch.float64)
    fp = torch.minimum(fp, d_out - fp) / d_out
    fq = torch.minimum(fq, d_in - fq) / d_in
    r = torch.sqrt(fp[:, None] ** 2 + fq[None, :] ** 2).reshape(-1)
    w = torch.exp(-((r - center) ** 2) / (2.0 * width**2))
    return w.clamp_(min=1e-12 * float(w.max()))


def band_frequency_indices(d_out: int, d_in: int, n: int, seed: int, center: float,
                           width: float) -> torch.Tensor:
    r"""Frequency entries drawn from a radial band of the spectrum (the paper's "frequency bias").

    Each bin ``(p, q)`` gets the weight ``w = exp(-(r - center)^2 / (2 width^2))`` on its normalised
    radial frequency ``r = sqrt(fp^2 + fq^2)``, ``fp = min(p, d_out - p)/d_out`` and
    ``fq = min(q, d_in - q)/d_in`` (so ``r`` lies in ``[0, ~0.707]``); weights are clamped from below
    to ``1e-12 * max`` so every ``n <= d_out * d_in`` can be drawn. ``n`` bins are drawn without
    replacement with probability proportional to ``w``, exactly as
    ``torch.multinomial(w, n, replacement=False, generator=torch.Generator().manual_seed(seed))``
    does it (keys ``w / Exp(1)``, top ``n``), but without ``multinomial``'s ``2**24`` category limit.

    Args:
        d_out: rows of the weight.
        d_in: columns of the weight.
        n: number of entries, ``1 <= n <= d_out * d_in``.
        seed: seed of the CPU generator.
        center: band centre in normalised radial frequency, in ``[0, 0.75]``.
        width: Gaussian width (standard deviation), ``> 0``.

    Returns:
        int64 tensor of shape ``(2, n)`` (rows ``p``, columns ``q``), deterministic in its inputs.

    Raises:
        ValueError: if ``n``, ``center`` or ``width`` is out of range.
    """
    _check_count(n, d_out, d_in)
    if not 0.0 <= center <= 0.75:
        raise ValueError(f"center={center} is out of range: it must be in [0, 0.75]")
    if not width > 0.0 or not math.isfinite(width):
        raise ValueError(f"width={width} is out of range: it must be a finite number > 0")
    weights = _radial_band_weights(d_out, d_in, center, width)
    keys = torch.empty_like(weights).exponential_(1, generator=torch.Generator().manual_seed(seed))
    keys = torch.div(weights, keys, out=keys)
    return _flat_to_indices(torch.topk(keys, n).indices, d_in)


def dense_delta_weight(spectrum: torch.Tensor, indices: torch.Tensor, d_out: int, d_in: int,
                       scaling: float) -> torch.Tensor:
    """PEFT's delta weight ``scaling * Re(ifft2(S))`` with ``S[indices] = spectrum``.

    The FFT runs in float64 for a float64 spectrum (PEFT forces float32 there) and in float32
    otherwise (CPU FFTs have no half precision); the result has the spectrum's dtype.

    Args:
        spectrum: coefficients ``c``, shape ``(n,)``.
        indices: ``(2, n)`` entries from :func:`frequency_indices`.
        d_out: rows of the weight.
        d_in: columns of the weight.
        scaling: the adapter's scaling ``a``.

    Returns:
        ``(d_out, d_in)`` tensor on the spectrum's device, in the spectrum's dtype.
    """
    fdtype = torch.float64 if spectrum.dtype == torch.float64 else torch.float32
    dense = torch.zeros(d_out, d_in, dtype=fdtype, device=spectrum.device)
    idx = indices.to(spectrum.device)
    dense = dense.index_put((idx[0], idx[1]), spectrum.to(fdtype), accumulate=False)
    return (torch.fft.ifft2(dense).real * scaling).to(spectrum.dtype)


@dataclass(frozen=True)
class SpectralPlan:
    """Gather/scatter positions and weights for one adapter; derived only from the indices.

    Tensor fields (``n`` entries; "2n" fields interleave real and imaginary parts):
        indices: ``(2, n)`` the original entries (used by the dense path).
        in_bins, out_bins: ``(n,)`` half-spectrum bins ``g`` of ``rfft(x)`` and ``h`` of ``H``.
        in_cols, out_cols: ``(2n,)`` the same positions in the real views ``(T, 2 K)``.
        fwd_weight: ``(2n,)`` ``[w_out, w_out sigma]`` per entry (forward map).
        bwd_weight: ``(2n,)`` ``[w_in, w_in sigma]`` per entry (transposed map).
        grad_sign: ``(2n,)`` ``[1, sigma]`` per entry (coefficient gradient).
    """

    d_out: int
    d_in: int
    indices: torch.Tensor
    in_bins: torch.Tensor
    out_bins: torch.Tensor
    in_cols: torch.Tensor
    out_cols: torch.Tensor
    fwd_weight: torch.Tensor
    bwd_weight: torch.Tensor
    grad_sign: torch.Tensor

    def to(self, device: torch.device | str) -> "SpectralPlan":
        """Returns the plan with every tensor on ``device``."""
        return replace(self, **{k: v.to(device) for k, v in plan_buffers(self).items()})


def _fold(k: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Half-spectrum bin of frequency ``k``, whether it lies in the lower half, bin weight."""
    lower = k <= d // 2
    bins = torch.where(lower, k, d - k)
    edge = (bins == 0) | (2 * bins == d)
    return bins, lower, torch.where(edge, 1.0, 0.5).to(torch.float32)


def _interleave(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    return torch.stack([re, im], dim=1).reshape(-1)


def make_spectral_plan(indices: torch.Tensor, d_out: int, d_in: int,
                       device: torch.device | str | None = None) -> SpectralPlan:
    """Builds the :class:`SpectralPlan` of ``indices`` for a ``(d_out, d_in)`` weight.

    Args:
        indices: ``(2, n)`` int64 entries (rows ``p < d_out``, columns ``q < d_in``).
        d_out: rows of the weight.
        d_in: columns of the weight.
        device: where the plan's tensors live (default: the device of ``indices``).

    Returns:
        The plan; compute it once per layer and keep its tensors as non-persistent buffers.

    Raises:
        ValueError: if ``indices`` has the wrong shape or an entry is out of range.
    """
    if indices.dim() != 2 or indices.shape[0] != 2 or indices.shape[1] < 1:
        raise ValueError(f"indices must have shape (2, n) with n >= 1, got {tuple(indices.shape)}")
    p, q = indices.to("cpu", torch.int64)
    if p.min() < 0 or p.max() >= d_out or q.min() < 0 or q.max() >= d_in:
        raise ValueError(f"indices out of range for a ({d_out}, {d_in}) weight")
    h, p_lower, w_out = _fold(p, d_out)
    g, q_lower, w_in = _fold(q, d_in)
    # conj on gather when q is in the lower half, conj on fold when p is in the upper half
    sigma = torch.where(q_lower == p_lower, -1.0, 1.0).to(torch.float32)
    # imaginary parts at the DC/Nyquist bins of a real signal vanish: drop them exactly
    interior = ((w_in < 1) & (w_out < 1)).to(torch.float32)
    plan = SpectralPlan(
        d_out=d_out, d_in=d_in, indices=torch.stack([p, q]), in_bins=g, out_bins=h,
        in_cols=_interleave(2 * g, 2 * g + 1), out_cols=_interleave(2 * h, 2 * h + 1),
        fwd_weight=_interleave(w_out, w_out * sigma * interior),
        bwd_weight=_interleave(w_in, w_in * sigma * interior),
        grad_sign=_interleave(torch.ones_like(sigma), sigma * interior),
    )
    logger.debug("spectral plan: (%d, %d) weight, %d entries", d_out, d_in, p.numel())
    return plan.to(device if device is not None else indices.device)


def plan_buffers(plan: SpectralPlan) -> dict[str, torch.Tensor]:
    """The plan's tensors by field name (register them with ``persistent=False``)."""
    return {f.name: getattr(plan, f.name) for f in fields(plan) if f.name not in ("d_out", "d_in")}


def plan_from_buffers(buffers: dict[str, torch.Tensor], d_out: int, d_in: int) -> SpectralPlan:
    """Rebuilds a plan from :func:`plan_buffers` output (e.g. a layer's buffers, already moved)."""
    return SpectralPlan(d_out=d_out, d_in=d_in, **buffers)


@dataclass(frozen=True)
class _Batch:
    """Plans of several adapters concatenated, with the per-adapter entry counts and scalings."""

    d_out: int
    d_in: int
    sizes: list[int]
    scalings: list[float]
    in_bins: torch.Tensor
    out_bins: torch.Tensor
    in_cols: torch.Tensor
    out_cols: torch.Tensor
    fwd_weight: torch.Tensor
    bwd_weight: torch.Tensor
    grad_sign: torch.Tensor


def _batch(plans: Sequence[SpectralPlan], scalings: Sequence[float]) -> _Batch:
    def cat(name: str) -> torch.Tensor:
        parts = [getattr(p, name) for p in plans]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    names = ("in_bins", "out_bins", "in_cols", "out_cols", "fwd_weight", "bwd_weight", "grad_sign")
    return _Batch(d_out=plans[0].d_out, d_in=plans[0].d_in, sizes=[p.in_bins.numel() for p in plans],
                  scalings=[float(a) for a in scalings], **{k: cat(k) for k in names})


def _coefficients(spectra: Sequence[torch.Tensor], b: _Batch, weight: torch.Tensor, norm: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """Per-entry real/imaginary multipliers ``c_i * a / norm * weight``, shape ``(2n,)``."""
    c = torch.cat([s.detach().to(dtype) * (a / norm) for s, a in zip(spectra, b.scalings)])
    return c.repeat_interleave(2) * weight.to(dtype)


def _gather(spec: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Real/imaginary parts of the complex ``(T, K)`` half spectrum at ``cols``: ``(T, 2n)``."""
    return torch.view_as_real(spec).reshape(spec.shape[0], -1).index_select(1, cols)


def _scatter_irfft(z: torch.Tensor, bins: torch.Tensor, length: int) -> torch.Tensor:
    """``irfft`` (size ``length``) of the half spectrum accumulating entries ``z`` at ``bins``."""
    tokens = z.shape[0]
    half = torch.zeros(tokens, length // 2 + 1, dtype=z.dtype.to_complex(), device=z.device)
    half.index_add_(1, bins, torch.view_as_complex(z.view(tokens, -1, 2)))
    return torch.fft.irfft(half, n=length)


class _SpectralApply(torch.autograd.Function):
    """``x @ sum_a dW_a^T`` through half spectra; saves only ``x`` and the spectra."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, b: _Batch, cdtype: torch.dtype, *spectra: torch.Tensor):
        ctx.b, ctx.cdtype = b, cdtype
        ctx.save_for_backward(x, *spectra)
        x2 = x.reshape(-1, b.d_in).to(cdtype)
        if x2.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], b.d_out)
        coef = _coefficients(spectra, b, b.fwd_weight, b.d_in, cdtype)
        z = _gather(torch.fft.rfft(x2), b.in_cols).mul_(coef)
        y = _scatter_irfft(z, b.out_bins, b.d_out)
        return y.to(x.dtype).reshape(*x.shape[:-1], b.d_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, *spectra = ctx.saved_tensors
        b, cdtype = ctx.b, ctx.cdtype
        need_x, need_c = ctx.needs_input_grad[0], any(ctx.needs_input_grad[3:])
        gy = grad_y.reshape(-1, b.d_out).to(cdtype)
        tokens = gy.shape[0]
        grad_x, grad_c = None, [None] * len(spectra)
        if tokens == 0:
            grad_x = torch.zeros_like(x) if need_x else None
            grad_c = [torch.zeros_like(s) for s in spectra] if need_c else grad_c
            return (grad_x, None, None, *grad_c)
        gq = _gather(torch.fft.rfft(gy), b.out_cols)
        if need_c:
            rx = torch.fft.rfft(x.reshape(-1, b.d_in).to(cdtype))
            prod = _gather(rx, b.in_cols).mul_(gq).sum(0)
            dc = (prod * b.grad_sign.to(cdtype)).view(-1, 2).sum(1)
            norm = b.d_out * b.d_in
            grad_c = [(part * (a / norm)).to(s.dtype) for part, a, s in
                      zip(dc.split(b.sizes), b.scalings, spectra)]
        if need_x:
            coef = _coefficients(spectra, b, b.bwd_weight, b.d_out, cdtype)
            grad_x = _scatter_irfft(gq.mul_(coef), b.in_bins, b.d_in).to(x.dtype).reshape(x.shape)
        return (grad_x, None, None, *grad_c)


def _compute_dtype(x: torch.Tensor, spectra: Sequence[torch.Tensor]) -> torch.dtype:
    # CPU FFTs have no half precision and CUDA's needs power-of-two sizes: compute in fp32 at least
    wide = x.dtype == torch.float64 or any(s.dtype == torch.float64 for s in spectra)
    return torch.float64 if wide else torch.float32


def spectral_apply(x: torch.Tensor, spectra: Sequence[torch.Tensor], plans: Sequence[SpectralPlan],
                   scalings: Sequence[float], d_out: int) -> torch.Tensor:
    r"""``x @ (sum_a dW_a).T`` for FourierFT adapters sharing one weight, without building ``dW``.

    One ``rfft`` of ``x`` serves every adapter; their entries are gathered, scaled and scattered
    into one half spectrum and transformed back with one ``irfft`` (see the module docstring).
    Differentiable in ``x`` and every spectrum; backward recomputes ``rfft(x)`` instead of saving
    any ``T x n`` intermediate. FFTs run in float64 if ``x`` or a spectrum is float64, else in
    float32; the result has ``x``'s dtype.

    Args:
        x: input of shape ``(..., d_in)``, any leading shape (also zero tokens), any strides.
        spectra: one coefficient vector ``(n_a,)`` per adapter.
        plans: one :class:`SpectralPlan` per adapter, all for the same ``(d_out, d_in)``, on
            ``x``'s device.
        scalings: one scaling ``a`` per adapter.
        d_out: output features.

    Returns:
        Tensor of shape ``(..., d_out)`` in ``x.dtype``.

    Raises:
        ValueError: on mismatched lengths or shapes.
    """
    if not (len(spectra) == len(plans) == len(scalings)) or not plans:
        raise ValueError(f"need one spectrum, plan and scaling per adapter, got "
                         f"{len(spectra)}, {len(plans)}, {len(scalings)}")
    d_in = plans[0].d_in
    for s, p in zip(spectra, plans):
        if (p.d_out, p.d_in) != (d_out, d_in) or s.shape != p.in_bins.shape:
            raise ValueError(f"spectrum of shape {tuple(s.shape)} and plan for ({p.d_out}, "
                             f"{p.d_in}) do not fit a ({d_out}, {d_in}) weight")
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features, expected d_in={d_in}")
    batch = _batch(plans, scalings)
    return _SpectralApply.apply(x, batch, _compute_dtype(x, spectra), *spectra)
