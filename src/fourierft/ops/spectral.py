r"""FourierFT's maths on plain tensors: frequency entries, per-route plans, the weight change, the token maps.

A FourierFT adapter on a weight of shape ``(d_out, d_in)`` holds ``n`` real coefficients ``c`` at
frequency entries ``(p_i, q_i)``. Its weight change is (PEFT's definition)

.. math::
    \Delta W = a\,\mathrm{Re}(\mathrm{ifft2}(S)),\quad S[p_i, q_i] = c_i,\qquad
    \Delta W_{jk} = \frac{a}{d_{out} d_{in}} \sum_i c_i \cos 2\pi\Big(\frac{p_i j}{d_{out}} +
    \frac{q_i k}{d_{in}}\Big).

:func:`delta_weight` is the one place that builds it: each coefficient goes to the Hermitian half spectrum
``(d_out, d_in // 2 + 1)`` (an entry with ``q`` in the upper half as its mirror ``(-p, d_in - q)``, which
leaves the real part unchanged) and one real ``irfft2`` gives ``Re(ifft2(S))``, about twice as fast as
PEFT's complex ``ifft2``. :func:`delta_rows` evaluates selected rows of the same ``dW`` (embeddings).

The activation side applies ``dW`` to token rows without building it. For one token ``x`` (real)

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

The input gradient is the same map with the roles of ``(p, d_out)`` and ``(q, d_in)`` swapped (the sign
``sigma`` is unchanged), applied to ``G = rfft(dL/dy)``; the coefficient gradient is, whichever route
computed the output,

.. math::
    \frac{\partial L}{\partial c_i} = \frac{a}{d_{out} d_{in}} \sum_t
    \big(\mathrm{Re} R_{t,g_i} \mathrm{Re} G_{t,h_i} + \sigma_i \mathrm{Im} R_{t,g_i}
    \mathrm{Im} G_{t,h_i}\big).

The token maps run through the ``fourierft::scatter_products`` and ``fourierft::pair_products`` custom ops
(:mod:`._native`). Which route a layer takes (activation side, ``W + dW``, or a dense ``dW``) is decided
in :mod:`.spectral_op`; every formula here is exact for any ``d_out``, ``d_in`` (odd, prime, non-square).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch

from . import _native

logger = logging.getLogger(__name__)

__all__ = [
    "SpectralPlan",
    "TokenPlan",
    "WeightPlan",
    "band_frequency_indices",
    "concat_token_plans",
    "delta_rows",
    "delta_weight",
    "forward_map",
    "frequency_indices",
    "half_spectrum",
    "make_spectral_plan",
    "make_token_plan",
    "make_weight_plan",
    "spectrum_products",
    "transposed_map",
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
    # in place: this is d_out * d_in float64 values (e.g. 360 MB for 4096 x 11008)
    w = (fp[:, None] ** 2 + fq[None, :] ** 2).sqrt_().reshape(-1)
    w.sub_(center).square_().div_(-2.0 * width**2).exp_()
    return w.clamp_(min=1e-12 * float(w.max()))


def band_frequency_indices(d_out: int, d_in: int, n: int, seed: int, center: float,
                           width: float) -> torch.Tensor:
    r"""Frequency entries drawn from a radial band of the spectrum (the paper's "frequency bias").

    Bin ``(p, q)`` has weight ``w = exp(-(r - center)^2 / (2 width^2))`` on its normalised radial
    frequency ``r = sqrt(fp^2 + fq^2)``, ``fp = min(p, d_out - p)/d_out``,
    ``fq = min(q, d_in - q)/d_in`` (``r`` in ``[0, ~0.707]``), computed in float64 and clamped
    below at ``1e-12 * max`` so any ``n <= d_out * d_in`` can be drawn. ``n`` bins are drawn
    without replacement, proportionally to ``w``, exactly as ``torch.multinomial(w, n,
    replacement=False, generator=torch.Generator().manual_seed(seed))`` does (top ``n`` of
    ``w / Exp(1)`` keys), without ``multinomial``'s limit of ``2**24`` bins.

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


def _check_positions(indices: torch.Tensor, d_out: int, d_in: int) -> None:
    """Shape and range of ``(2, n)`` entries; the range is read only from a plain CPU tensor (where reading it
    costs no device synchronisation), so plans can be made inside ``FakeTensorMode`` or for the meta device."""
    if indices.dim() != 2 or indices.shape[0] != 2 or indices.shape[1] < 1:
        raise ValueError(f"indices must have shape (2, n) with n >= 1, got {tuple(indices.shape)}")
    if type(indices) is torch.Tensor and indices.device.type == "cpu":
        p, q = indices
        if p.min() < 0 or p.max() >= d_out or q.min() < 0 or q.max() >= d_in:
            raise ValueError(f"indices out of range for a ({d_out}, {d_in}) weight")


def _tensor_fields(plan) -> dict[str, torch.Tensor]:
    return {f.name: getattr(plan, f.name) for f in fields(plan) if isinstance(getattr(plan, f.name), torch.Tensor)}


class _Plan:
    """Frozen dataclasses of a layer shape and index tensors, derived from the entries only."""

    def map(self, fn):
        """The plan with ``fn`` applied to every tensor (e.g. a move, or ``FakeTensorMode.from_tensor``)."""
        return replace(self, **{k: fn(v) for k, v in _tensor_fields(self).items()})

    def to(self, device: torch.device | str):
        """The plan with every tensor on ``device``."""
        return self.map(lambda t: t.to(device))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The plan's tensors by field name."""
        return _tensor_fields(self)


@dataclass(frozen=True)
class WeightPlan(_Plan):
    """Where each coefficient lands to build ``dW`` (:func:`delta_weight`): merging, the ``W + dW`` and dense
    routes, Conv2d layers.

    Fields: ``index`` ``(n,)`` int64, the position of entry ``i`` in the real view ``(d_out, 2 K_in)`` of the
    Hermitian half spectrum (``K_in = d_in // 2 + 1``); ``weight`` ``(n,)`` float32, its weight there (1 on
    the DC/Nyquist columns, else 1/2: ``irfft2`` counts each interior column twice).
    """

    d_out: int
    d_in: int
    index: torch.Tensor
    weight: torch.Tensor


@dataclass(frozen=True)
class TokenPlan(_Plan):
    """The activation-side maps and the spectrum gradient (:func:`forward_map`, :func:`transposed_map`,
    :func:`spectrum_products`).

    Fields (``2n`` entries, real and imaginary parts interleaved): ``in_cols``/``out_cols`` int32, the columns
    of the real views ``(T, 2 K_in)`` of ``rfft(x)`` and ``(T, 2 K_out)`` of ``H``; ``fwd_weight``
    ``[w_out, w_out sigma]`` and ``bwd_weight`` ``[w_in, w_in sigma]`` per entry; ``grad_sign`` ``[1, sigma]``.
    Imaginary parts at DC/Nyquist bins of a real signal vanish, so their weights are exactly 0.
    """

    d_out: int
    d_in: int
    in_cols: torch.Tensor
    out_cols: torch.Tensor
    fwd_weight: torch.Tensor
    bwd_weight: torch.Tensor
    grad_sign: torch.Tensor


@dataclass(frozen=True)
class SpectralPlan(_Plan):
    """A linear layer's plan: it may take either route, so it holds both parts."""

    tokens: TokenPlan
    weight: WeightPlan

    @property
    def d_out(self) -> int:
        return self.weight.d_out

    @property
    def d_in(self) -> int:
        return self.weight.d_in

    @property
    def n(self) -> int:
        return self.weight.index.numel()

    def map(self, fn) -> "SpectralPlan":
        return SpectralPlan(self.tokens.map(fn), self.weight.map(fn))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"tokens.{k}": v for k, v in self.tokens.tensors().items()},
                **{f"weight.{k}": v for k, v in self.weight.tensors().items()}}


def _fold(k: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Half-spectrum bin of frequency ``k``, whether it lies in the lower half, bin weight."""
    lower = k <= d // 2
    bins = torch.where(lower, k, d - k)
    edge = (bins == 0) | (2 * bins == d)
    return bins, lower, torch.where(edge, 1.0, 0.5).to(torch.float32)


def _interleave(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    return torch.stack([re, im], dim=1).reshape(-1)


def make_weight_plan(indices: torch.Tensor, d_out: int, d_in: int) -> WeightPlan:
    """The :class:`WeightPlan` of ``(2, n)`` entries (rows ``p < d_out``, columns ``q < d_in``).

    Raises:
        ValueError: if ``indices`` has the wrong shape or (read on the CPU) an entry is out of range.
    """
    _check_positions(indices, d_out, d_in)
    p, q = indices.to(torch.int64)
    g, q_lower, w_in = _fold(q, d_in)
    # an entry with q in the upper half is stored as its mirror (-p, d_in - q): the half spectrum stays real
    rows = torch.where(q_lower, p, (d_out - p) % d_out)
    return WeightPlan(d_out, d_in, rows * (2 * (d_in // 2 + 1)) + 2 * g, w_in)


def make_token_plan(indices: torch.Tensor, d_out: int, d_in: int) -> TokenPlan:
    """The :class:`TokenPlan` of ``(2, n)`` entries (module docstring for the maths).

    Raises:
        ValueError: if ``indices`` has the wrong shape or (read on the CPU) an entry is out of range.
    """
    _check_positions(indices, d_out, d_in)
    p, q = indices.to(torch.int64)
    h, p_lower, w_out = _fold(p, d_out)
    g, q_lower, w_in = _fold(q, d_in)
    # conj on gather when q is in the lower half, conj on fold when p is in the upper half
    sigma = torch.where(q_lower == p_lower, -1.0, 1.0).to(torch.float32)
    interior = ((w_in < 1) & (w_out < 1)).to(torch.float32)
    return TokenPlan(
        d_out, d_in,
        in_cols=_interleave(2 * g, 2 * g + 1).to(torch.int32), out_cols=_interleave(2 * h, 2 * h + 1).to(torch.int32),
        fwd_weight=_interleave(w_out, w_out * sigma * interior),
        bwd_weight=_interleave(w_in, w_in * sigma * interior),
        grad_sign=_interleave(torch.ones_like(sigma), sigma * interior),
    )


def make_spectral_plan(indices: torch.Tensor, d_out: int, d_in: int) -> SpectralPlan:
    """Both plans of a linear layer's ``(2, n)`` entries, on the device of ``indices``."""
    plan = SpectralPlan(make_token_plan(indices, d_out, d_in), make_weight_plan(indices, d_out, d_in))
    logger.debug("spectral plan: (%d, %d) weight, %d entries", d_out, d_in, indices.shape[1])
    return plan


def concat_token_plans(plans: Sequence[TokenPlan]) -> TokenPlan:
    """One token plan holding every adapter's entries, in order (they then share one FFT each way)."""
    if len(plans) == 1:
        return plans[0]
    parts = {k: torch.cat([p.tensors()[k] for p in plans]) for k in plans[0].tensors()}
    return TokenPlan(plans[0].d_out, plans[0].d_in, **parts)


def fft_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any tensor is, else float32: CPU FFTs have no half precision, CUDA's needs power-of-two sizes."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def delta_weight(spectra: Sequence[torch.Tensor], plans: Sequence[WeightPlan], scalings: Sequence[float],
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    r"""``sum_a dW_a = sum_a a * Re(ifft2(S_a))`` as a ``(d_out, d_in)`` tensor, by one real ``irfft2``.

    The library's one definition of the weight change (module docstring); differentiable in the spectra.

    Args:
        spectra: one coefficient vector ``(n_a,)`` per adapter.
        plans: their :class:`WeightPlan` objects, for one ``(d_out, d_in)``, on one device.
        scalings: one scaling ``a`` per adapter.
        dtype: float32 or float64, the dtype of the FFT and of the result (default: :func:`fft_dtype`).

    Returns:
        ``(d_out, d_in)`` tensor on the plans' device.
    """
    d_out, d_in = plans[0].d_out, plans[0].d_in
    dtype = dtype or fft_dtype(*spectra)
    cols = 2 * (d_in // 2 + 1)
    values = torch.cat([c.to(dtype) * (b.weight.to(dtype) * float(a)) for c, b, a in zip(spectra, plans, scalings)])
    index = torch.cat([b.index for b in plans]) if len(plans) > 1 else plans[0].index
    half = torch.zeros(d_out * cols, dtype=dtype, device=index.device).index_add(0, index, values)
    return torch.fft.irfft2(torch.view_as_complex(half.view(d_out, cols // 2, 2)), s=(d_out, d_in))


def delta_rows(ids: torch.Tensor, spectrum: torch.Tensor, indices: torch.Tensor, d_out: int, d_in: int,
               scaling: float) -> torch.Tensor:
    r"""Rows ``ids`` of :func:`delta_weight`'s ``dW`` without building it: ``(len(ids), d_in)``.

    Row ``j`` is ``a / d_out * Re(ifft(Z_j))`` with ``Z_j[q_i] = sum c_i exp(2 pi i p_i j / d_out)``; it costs
    ``O(U (n + d_in log d_in))`` for ``U`` rows against ``O(d_out d_in log(d_out d_in))`` for the table.
    Differentiable in ``spectrum``; computed in :func:`fft_dtype`.

    Args:
        ids: int64 row numbers ``(U,)``.
        spectrum: coefficients ``(n,)``.
        indices: ``(2, n)`` entries on ``ids``' device.
        d_out: rows of the weight.
        d_in: columns of the weight.
        scaling: the adapter's scaling ``a``.
    """
    dtype = fft_dtype(spectrum)
    p, q = indices[0], indices[1]
    turns = torch.remainder(ids.reshape(-1, 1) * p, d_out).to(dtype) * (2 * math.pi / d_out)
    c = spectrum.to(dtype)
    entries = torch.complex(c * torch.cos(turns), c * torch.sin(turns))
    spectra = torch.zeros(ids.numel(), d_in, dtype=entries.dtype, device=ids.device).index_add(1, q, entries)
    return torch.fft.ifft(spectra, dim=1).real * (scaling / d_out)


def _real_view(spec: torch.Tensor) -> torch.Tensor:
    """``(T, K)`` complex as ``(T, 2K)`` real, real and imaginary parts interleaved."""
    return torch.view_as_real(spec).reshape(spec.shape[0], -1)


def _scatter_irfft(src: torch.Tensor, a: torch.Tensor, b: torch.Tensor, coef: torch.Tensor, d: int) -> torch.Tensor:
    half = _native.scatter(src, a, b, coef, 2 * (d // 2 + 1))
    return torch.fft.irfft(torch.view_as_complex(half.view(src.shape[0], -1, 2)), n=d)


def forward_map(x2: torch.Tensor, plan: TokenPlan, coef: torch.Tensor) -> torch.Tensor:
    """``x2 @ dW^T`` for token rows ``x2`` ``(T, d_in)``: ``rfft``, gather-scale-scatter, ``irfft``.

    ``coef`` ``(R, 2n)`` holds ``c_i a / d_in`` times ``fwd_weight`` per entry; the ``T`` rows form ``R`` equal
    runs (samples of a mixed-adapter batch), run ``r`` scaled by row ``r``.
    """
    return _scatter_irfft(_real_view(torch.fft.rfft(x2)), plan.in_cols, plan.out_cols, coef, plan.d_out)


def half_spectrum(rows: torch.Tensor) -> torch.Tensor:
    """``rfft`` of token rows ``(T, d)`` in its real view ``(T, 2 (d // 2 + 1))``, as the token maps read it."""
    return _real_view(torch.fft.rfft(rows))


def transposed_map(g_half: torch.Tensor, plan: TokenPlan, coef: torch.Tensor) -> torch.Tensor:
    """``g2 @ dW`` for gradient rows ``g2`` ``(T, d_out)`` (the input gradient), from ``g_half =
    half_spectrum(g2)``; ``coef`` as in :func:`forward_map` with ``c_i a / d_out`` times ``bwd_weight``."""
    return _scatter_irfft(g_half, plan.out_cols, plan.in_cols, coef, plan.d_in)


def spectrum_products(x2: torch.Tensor, g_half: torch.Tensor, plan: TokenPlan, runs: int = 1) -> torch.Tensor:
    r"""``(runs, n)`` sums over each run's tokens of ``Re R Re G + sigma Im R Im G`` at every entry, where
    ``R = rfft(x2)`` and ``G = rfft(g2)`` (given as ``g_half = half_spectrum(g2)``, which the input gradient
    shares): times ``a / (d_out d_in)`` they are the coefficient gradient."""
    prods = _native.pair(half_spectrum(x2), g_half, plan.in_cols, plan.out_cols, runs)
    return (prods * plan.grad_sign.to(prods.dtype)).view(runs, -1, 2).sum(-1)
