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

Cost per step: ``O(T (d_in log d_in + d_out log d_out) + T n)``: five FFTs of ``T`` rows (forward
``rfft``/``irfft``; backward ``rfft(dL/dy)``, ``rfft(x)`` recomputed, ``irfft``) and gathers/scatters
over ``T x n`` entries, done in token blocks of ``2**17`` values on CPU. No tensor of
``d_out * d_in`` elements is created while gradients are needed; without gradients,
:func:`choose_path` may pick the dense route (``ifft2`` then one GEMM) for small layers.
"""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch
from torch.autograd.function import once_differentiable

from . import _native

logger = logging.getLogger(__name__)

__all__ = [
    "SpectralPlan",
    "delta_weight",
    "forced_path",
    "merged_weight",
    "band_frequency_indices",
    "choose_path",
    "dense_delta_weight",
    "frequency_indices",
    "make_spectral_plan",
    "PATHS",
    "plan_buffers",
    "plan_from_buffers",
    "linear_spectral_apply",
    "path_costs",
    "spectral_apply",
    "spectral_apply_per_sample",
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


def dense_delta_weight(spectrum: torch.Tensor, indices: torch.Tensor, d_out: int, d_in: int,
                       scaling: float) -> torch.Tensor:
    """PEFT's delta weight ``scaling * Re(ifft2(S))`` with ``S[indices] = spectrum``.

    The FFT runs in float64 for a float64 spectrum (PEFT forces float32 there) and in float32
    otherwise (CPU FFTs have no half precision); the result has the spectrum's dtype.

    Args:
        spectrum: coefficients ``c``, shape ``(n,)``.
        indices: ``(2, n)`` entries (rows ``p``, columns ``q``) from :func:`frequency_indices`.
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
        merge_index: ``(n,)`` where entry ``i`` lands in the real view ``(d_out, 2 K_in)`` of the
            Hermitian half spectrum whose ``irfft2`` is ``Re(ifft2(S))`` (merged path).
        merge_weight: ``(n,)`` its weight there (``w_in``: 1 on the DC/Nyquist columns, else 1/2).
        pair_crow, pair_cols: CSR pattern ``(2 K_in, 2 K_out)`` of the distinct ``(in_col, out_col)``
            pairs (the sampled products of the spectrum gradient on the merged path).
        pair_inverse: ``(2n,)`` the distinct pair of each real/imaginary entry.

    A plan made by concatenating adapters (:func:`_concat`) has empty ``pair_*`` fields.
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
    merge_index: torch.Tensor
    merge_weight: torch.Tensor
    pair_crow: torch.Tensor
    pair_cols: torch.Tensor
    pair_inverse: torch.Tensor

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
        The plan; compute it once per layer shape and keep it with the layers that use it.

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
    in_cols, out_cols = _interleave(2 * g, 2 * g + 1), _interleave(2 * h, 2 * h + 1)
    # merged path: an entry with q in the upper half is stored as its mirror (-p, d_in - q), so that the
    # values of the half spectrum stay real; irfft2 then counts each interior column twice (w_in = 1/2)
    merge_rows = torch.where(q_lower, p, (d_out - p) % d_out)
    crow, cols, inverse = _pair_pattern(in_cols, out_cols, 2 * (d_in // 2 + 1), 2 * (d_out // 2 + 1))
    plan = SpectralPlan(
        d_out=d_out, d_in=d_in, indices=torch.stack([p, q]), in_bins=g, out_bins=h,
        in_cols=in_cols, out_cols=out_cols,
        fwd_weight=_interleave(w_out, w_out * sigma * interior),
        bwd_weight=_interleave(w_in, w_in * sigma * interior),
        grad_sign=_interleave(torch.ones_like(sigma), sigma * interior),
        merge_index=merge_rows * (2 * (d_in // 2 + 1)) + 2 * g, merge_weight=w_in,
        pair_crow=crow, pair_cols=cols, pair_inverse=inverse,
    )
    logger.debug("spectral plan: (%d, %d) weight, %d entries", d_out, d_in, p.numel())
    return plan.to(device if device is not None else indices.device)


def _pair_pattern(in_cols: torch.Tensor, out_cols: torch.Tensor, rows: int,
                  cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR ``(crow, col)`` of the distinct ``(in_col, out_col)`` pairs in a ``rows x cols`` grid, and the
    distinct pair of each entry (entries ``(p, q)``, ``(-p, -q)`` and their mirrors share pairs)."""
    key = in_cols * cols + out_cols
    unique, inverse = torch.unique(key, sorted=True, return_inverse=True)
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(unique // cols, minlength=rows).cumsum(0)
    return crow, unique % cols, inverse


_PAIR_FIELDS = ("pair_crow", "pair_cols", "pair_inverse")


def plan_buffers(plan: SpectralPlan) -> dict[str, torch.Tensor]:
    """The plan's tensors by field name (register them with ``persistent=False``)."""
    return {f.name: getattr(plan, f.name) for f in fields(plan) if f.name not in ("d_out", "d_in")}


def plan_from_buffers(buffers: dict[str, torch.Tensor], d_out: int, d_in: int) -> SpectralPlan:
    """Rebuilds a plan from :func:`plan_buffers` output (e.g. a layer's buffers, already moved)."""
    return SpectralPlan(d_out=d_out, d_in=d_in, **buffers)


def _concat(plans: Sequence[SpectralPlan]) -> SpectralPlan:
    """One plan holding every adapter's entries, in order (they share one rfft and one irfft)."""
    if len(plans) == 1:
        return plans[0]
    parts = {k: [getattr(p, k) for p in plans] for k in plan_buffers(plans[0]) if k not in _PAIR_FIELDS}
    empty = plans[0].pair_cols.new_empty(0)
    return SpectralPlan(d_out=plans[0].d_out, d_in=plans[0].d_in, **{k: empty for k in _PAIR_FIELDS},
                        **{k: torch.cat(v, dim=-1) for k, v in parts.items()})


def _coefficients(spectra: Sequence[torch.Tensor], scalings: Sequence[float], weight: torch.Tensor,
                  norm: int, dtype: torch.dtype, slots: torch.Tensor | None = None) -> torch.Tensor:
    """Per-entry real/imaginary multipliers ``c_i * a / norm * weight`` as rows ``(S, 2n)``.

    Without ``slots`` the adapters' entries are concatenated into one row (``S = 1``, every token
    uses the sum of the adapters). With ``slots`` (one adapter index per sample, ``len(spectra)``
    for none) the adapters must share one plan; row ``s`` holds the entries of sample ``s``'s
    adapter, or zeros.
    """
    parts = [s.detach().to(dtype) * (a / norm) for s, a in zip(spectra, scalings)]
    if slots is None:
        return (torch.cat(parts).repeat_interleave(2) * weight.to(dtype)).unsqueeze(0)
    table = torch.stack(parts + [torch.zeros_like(parts[0])]).repeat_interleave(2, dim=1)
    return table.mul_(weight.to(dtype)).index_select(0, slots)


# Entries per token block on CPU: the (rows, 2n) work buffers stay in cache (512 KiB in fp32),
# which measured 20% faster than whole-tensor gathers at d=768, T=1024, n=1000. GPUs take one block.
_BLOCK_ELEMS = 1 << 17


def _blocks(tokens: int, samples: int, entries: int, device: torch.device):
    """Token blocks ``(start, end, first_sample, end_sample)`` for ``samples`` equal runs of rows.

    A block lies inside one sample or covers whole samples, so that a ``(S, 2n)`` coefficient
    table applies to it as ``z.view(k, -1, 2n) * coef[first:end, None]``.
    """
    per = tokens // samples
    rows = tokens if device.type != "cpu" else max(1, min(tokens, _BLOCK_ELEMS // entries))
    if per == 0:
        return
    if rows < per:  # blocks within each sample
        for i in range(samples):
            for s in range(i * per, (i + 1) * per, rows):
                yield s, min(s + rows, (i + 1) * per), i, i + 1
        return
    step = rows // per  # whole samples per block
    for i in range(0, samples, step):
        j = min(i + step, samples)
        yield i * per, j * per, i, j




def _use_native(t: torch.Tensor) -> bool:
    """Whether the CPU kernels of :mod:`._native` run on ``t``: a plain CPU tensor outside any trace
    (``torch.compile`` sees the torch implementation, which it can trace)."""
    return (t.device.type == "cpu" and type(t) is torch.Tensor and not torch.compiler.is_compiling()
            and _native.available())


def _real_view(spec: torch.Tensor) -> torch.Tensor:
    """``(T, K)`` complex as ``(T, 2K)`` real, real and imaginary parts interleaved."""
    return torch.view_as_real(spec).reshape(spec.shape[0], -1)


def _half_spectrum(source: torch.Tensor, cols: int, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """Where to accumulate a ``(T, cols)`` half spectrum, and whether it still needs zeroing per block.

    If ``cols`` fits in the row width of ``source`` (the spectrum being gathered from; square layers,
    and one direction of rectangular ones), ``H`` takes the first ``T * cols`` values of its memory:
    row ``t`` of ``H`` then only overlaps rows ``<= t`` of ``source``, which blocks taken in order have
    already gathered. That saves a fresh ``T x cols`` allocation and its page faults (zeroing a new
    2 MB CPU tensor measured 0.7 ms, touching warm memory 0.1 ms). Otherwise new zeros, made as real
    zeros: complex ``torch.zeros`` measured 4x slower on CPU (torch 2.13).
    """
    tokens = source.shape[0]
    if cols <= source.shape[1] and source.is_contiguous():
        return source.view(-1)[: tokens * cols].view(tokens, cols), True
    return torch.view_as_complex(torch.zeros(tokens, cols, 2, dtype=dtype, device=source.device)), False


def _forward_map(rx: torch.Tensor, b: SpectralPlan, coef: torch.Tensor) -> torch.Tensor:
    """``x @ dW^T`` from ``rx = rfft(x)``: gather, scale, scatter into ``H``, one ``irfft``.

    ``coef`` is ``(S, 2n)``: the ``T`` rows form ``S`` equal runs, run ``s`` scaled by row ``s``.
    Tokens go through in blocks so that the ``T x 2n`` entry values never exist at once. ``rx``
    is overwritten (it may hold ``H``).
    """
    tokens, src = rx.shape[0], _real_view(rx)
    samples, entries = coef.shape
    if samples == 1 and _use_native(rx):
        half = torch.zeros(tokens, 2 * (b.d_out // 2 + 1), dtype=coef.dtype)
        _native.scatter_products(src, half, b.in_cols.to(torch.int32), b.out_cols.to(torch.int32), coef[0])
        return torch.fft.irfft(torch.view_as_complex(half.view(tokens, -1, 2)), n=b.d_out)
    half, reused = _half_spectrum(rx, b.d_out // 2 + 1, coef.dtype)
    blocks = list(_blocks(tokens, samples, entries, rx.device))
    buf = torch.empty(blocks[0][1] - blocks[0][0], entries, dtype=coef.dtype, device=rx.device)
    for s, e, i, j in blocks:
        z = torch.index_select(src[s:e], 1, b.in_cols, out=buf[: e - s])
        z.view(j - i, -1, entries).mul_(coef[i:j].unsqueeze(1))
        if reused:  # this block's source rows are gathered: its rows of H may now be written
            half[s:e].zero_()
        half[s:e].index_add_(1, b.out_bins, torch.view_as_complex(z.view(e - s, -1, 2)))
    return torch.fft.irfft(half, n=b.d_out)


def _backward_map(gy: torch.Tensor, x2: torch.Tensor | None, b: SpectralPlan, coef: torch.Tensor | None,
                  samples: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Input gradient (if ``coef``) and per-entry ``sum_t`` products (if ``x2``), from ``dL/dy``.

    Returns:
        ``(grad_x2, prod)``: ``(T, d_in)`` and ``(S, 2n)`` with ``prod[s, 2i] = sum_t Re R Re G`` and
        ``prod[s, 2i+1] = sum_t Im R Im G`` at entry ``i`` over the tokens of sample run ``s``.
    """
    tokens, entries = gy.shape[0], b.in_cols.numel()
    g_spec = torch.fft.rfft(gy)
    g_src = _real_view(g_spec)
    if samples == 1 and _use_native(gy):
        in_cols, out_cols = b.in_cols.to(torch.int32), b.out_cols.to(torch.int32)
        prod = grad_x2 = None
        if x2 is not None:
            prod = _native.pair_products(_real_view(torch.fft.rfft(x2)), g_src, in_cols, out_cols).unsqueeze(0)
        if coef is not None:
            half = torch.zeros(tokens, 2 * (b.d_in // 2 + 1), dtype=gy.dtype)
            _native.scatter_products(g_src, half, out_cols, in_cols, coef[0])
            grad_x2 = torch.fft.irfft(torch.view_as_complex(half.view(tokens, -1, 2)), n=b.d_in)
        return grad_x2, prod
    prod = half = x_src = x_buf = None
    reused = False
    blocks = list(_blocks(tokens, samples, entries, gy.device))
    g_buf = torch.empty(blocks[0][1] - blocks[0][0], entries, dtype=gy.dtype, device=gy.device)
    if x2 is not None:
        x_src, x_buf = _real_view(torch.fft.rfft(x2)), torch.empty_like(g_buf)
        prod = torch.zeros(samples, entries, dtype=gy.dtype, device=gy.device)
    if coef is not None:
        half, reused = _half_spectrum(g_spec, b.d_in // 2 + 1, gy.dtype)
    for s, e, i, j in blocks:
        g = torch.index_select(g_src[s:e], 1, b.out_cols, out=g_buf[: e - s])
        if prod is not None:
            xg = torch.index_select(x_src[s:e], 1, b.in_cols, out=x_buf[: e - s]).mul_(g)
            prod[i:j] += xg.view(j - i, -1, entries).sum(1)
        if half is not None:
            g.view(j - i, -1, entries).mul_(coef[i:j].unsqueeze(1))
            if reused:
                half[s:e].zero_()
            half[s:e].index_add_(1, b.in_bins, torch.view_as_complex(g.view(e - s, -1, 2)))
    grad_x2 = torch.fft.irfft(half, n=b.d_in) if half is not None else None
    return grad_x2, prod


def _spectrum_grads(prod: torch.Tensor, b: SpectralPlan, spectra: Sequence[torch.Tensor], scalings: Sequence[float],
                    cdtype: torch.dtype, slots: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Each spectrum's gradient from :func:`_backward_map`'s per-run products ``prod`` ``(S, 2n)``."""
    if slots is not None:  # sum each adapter's samples; the last row collects adapter-less ones
        prod = prod.new_zeros(len(spectra) + 1, prod.shape[1]).index_add_(0, slots, prod)[:-1]
    dc = (prod * b.grad_sign.to(cdtype)).reshape(-1, 2).sum(1) / (b.d_out * b.d_in)
    return [(part * a).to(s.dtype) for part, a, s in zip(dc.split([s.numel() for s in spectra]), scalings, spectra)]


def delta_weight(spectra: Sequence[torch.Tensor], plans: Sequence[SpectralPlan], scalings: Sequence[float],
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    r"""``sum_a dW_a`` as a ``(d_out, d_in)`` tensor, by one real ``irfft2`` (no gradient).

    Equal to the sum of :func:`dense_delta_weight` (PEFT's complex ``ifft2`` of the full spectrum)
    but about twice as fast: each real coefficient goes to the Hermitian half spectrum
    ``(d_out, d_in // 2 + 1)`` (an entry in the upper half of the columns as its mirror
    ``(-p, d_in - q)``, which leaves the real part unchanged), and ``irfft2`` of that is
    ``Re(ifft2(S))``.

    Args:
        spectra: one coefficient vector ``(n_a,)`` per adapter (read, not differentiated).
        plans: their :class:`SpectralPlan` objects, for one ``(d_out, d_in)``.
        scalings: one scaling ``a`` per adapter.
        dtype: float32 or float64, the dtype of the FFT and of the result.

    Returns:
        ``(d_out, d_in)`` tensor of ``dtype`` on the plans' device.
    """
    d_out, d_in = plans[0].d_out, plans[0].d_in
    cols = 2 * (d_in // 2 + 1)
    half = torch.zeros(d_out * cols, dtype=dtype, device=plans[0].merge_index.device)
    with torch.no_grad():
        for c, b, a in zip(spectra, plans, scalings):
            half.index_add_(0, b.merge_index, c.detach().to(dtype) * b.merge_weight.to(dtype), alpha=float(a))
    return torch.fft.irfft2(torch.view_as_complex(half.view(d_out, cols // 2, 2)), s=(d_out, d_in))


def merged_weight(weight: torch.Tensor, spectra: Sequence[torch.Tensor], plans: Sequence[SpectralPlan],
                  scalings: Sequence[float], transposed: bool = False) -> torch.Tensor:
    """``W + sum_a dW_a`` in ``nn.Linear``'s orientation ``(d_out, d_in)`` and ``weight``'s dtype.

    A new tensor every call (it is what the merged path of :func:`linear_spectral_apply` multiplies
    with); ``weight`` is stored ``(d_in, d_out)`` when ``transposed`` (transformers' ``Conv1D``).
    """
    dw = delta_weight(spectra, plans, scalings, _compute_dtype(weight, spectra))
    with torch.no_grad():
        return dw.add_(weight.t() if transposed else weight).to(weight.dtype)


def _pair_block_rows(cols: int, device: torch.device, tokens: int) -> int:
    """Tokens per block of :func:`_sampled_products`: two ``(cols, rows)`` transposed blocks of about
    ``2**17`` values each stay in a core's L2 cache; GPUs take one block."""
    if device.type != "cpu":
        return max(tokens, 1)
    return max(16, min(tokens, _BLOCK_ELEMS // cols))


def _sampled_products(x2: torch.Tensor, gy: torch.Tensor, plans: Sequence[SpectralPlan]) -> list[torch.Tensor]:
    """Per plan, ``(1, 2n)`` products ``sum_t R[t, in_col] G[t, out_col]`` of ``R = rfft(x)``, ``G = rfft(dL/dy)``
    (real views), as :func:`_backward_map` returns them, by sampled dense-dense products.

    Tokens go in blocks; each block's half spectra are transposed to feature-major (bins by tokens) so
    that every distinct pair is one contiguous dot product over the block's tokens
    (``torch.sparse.sampled_addmm`` on the plan's CSR pattern). That replaces ``2 x T x 2n``
    element gathers by ``T x (2 K_in + 2 K_out)`` transposed copies, which wins when ``n`` is large
    against the widths (``n = 1000`` at ``d = 768``).
    """
    tokens, device = x2.shape[0], x2.device
    if _use_native(x2):
        r, g = _real_view(torch.fft.rfft(x2)), _real_view(torch.fft.rfft(gy))
        return [_native.pair_products(r, g, b.in_cols.to(torch.int32), b.out_cols.to(torch.int32)).unsqueeze(0)
                for b in plans]
    rows_in, rows_out = 2 * (plans[0].d_in // 2 + 1), 2 * (plans[0].d_out // 2 + 1)
    block = _pair_block_rows(max(rows_in, rows_out), device, tokens)
    with warnings.catch_warnings():  # torch's "sparse CSR support is in beta" notice, once per process
        warnings.simplefilter("ignore", UserWarning)
        patterns = [torch.sparse_csr_tensor(b.pair_crow, b.pair_cols, x2.new_zeros(b.pair_cols.numel()),
                                            (rows_in, rows_out), check_invariants=False) for b in plans]
    sums = [x2.new_zeros(b.pair_cols.numel()) for b in plans]
    r_t = x2.new_empty(rows_in, block)
    g_t = x2.new_empty(rows_out, block)
    for s in range(0, tokens, block):
        k = min(block, tokens - s)
        rt = r_t[:, :k] if k == block else x2.new_empty(rows_in, k)
        gt = g_t[:, :k] if k == block else x2.new_empty(rows_out, k)
        rt.copy_(_real_view(torch.fft.rfft(x2[s:s + k])).t())
        gt.copy_(_real_view(torch.fft.rfft(gy[s:s + k])).t())
        for acc, pattern in zip(sums, patterns):
            acc += torch.sparse.sampled_addmm(pattern, rt, gt.t(), beta=0.0).values()
    return [acc[b.pair_inverse].unsqueeze(0) for acc, b in zip(sums, plans)]


def _check_adapters(x: torch.Tensor, spectra: Sequence[torch.Tensor], plans: Sequence[SpectralPlan],
                    scalings: Sequence[float], d_out: int, d_in: int) -> None:
    """Raise ``ValueError`` unless there is one spectrum, plan and scaling per adapter, all fitting
    a ``(d_out, d_in)`` weight and ``x``."""
    if not (len(spectra) == len(plans) == len(scalings)) or not plans:
        raise ValueError(f"need one spectrum, plan and scaling per adapter, got "
                         f"{len(spectra)}, {len(plans)}, {len(scalings)}")
    for s, p in zip(spectra, plans):
        if (p.d_out, p.d_in) != (d_out, d_in) or s.shape != p.in_bins.shape:
            raise ValueError(f"spectrum of shape {tuple(s.shape)} and plan for ({p.d_out}, "
                             f"{p.d_in}) do not fit a ({d_out}, {d_in}) weight")
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features, expected d_in={d_in}")


class _SpectralApply(torch.autograd.Function):
    """``x @ dW^T`` through half spectra (summed adapters, or one adapter per sample via ``slots``);
    saves only ``x`` and the spectra."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, b: SpectralPlan, scalings: list[float], cdtype: torch.dtype,
                slots: torch.Tensor | None, *spectra: torch.Tensor) -> torch.Tensor:
        ctx.b, ctx.scalings, ctx.cdtype, ctx.x_meta, ctx.slots = b, scalings, cdtype, (x.shape, x.dtype), slots
        # x is only needed for the spectrum gradient (a frozen base layer does not save it)
        ctx.save_for_backward(x if any(s.requires_grad for s in spectra) else None, *spectra)
        x2 = x.reshape(-1, b.d_in).to(cdtype)
        if x2.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], b.d_out)
        coef = _coefficients(spectra, scalings, b.fwd_weight, b.d_in, cdtype, slots)
        y = _forward_map(torch.fft.rfft(x2), b, coef)
        return y.to(x.dtype).reshape(*x.shape[:-1], b.d_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, *spectra = ctx.saved_tensors
        b, scalings, cdtype, (x_shape, x_dtype), slots = ctx.b, ctx.scalings, ctx.cdtype, ctx.x_meta, ctx.slots
        need_x, need_c = ctx.needs_input_grad[0], any(ctx.needs_input_grad[5:])
        gy = grad_y.reshape(-1, b.d_out).to(cdtype)
        if gy.shape[0] == 0:
            grad_x = grad_y.new_zeros(x_shape, dtype=x_dtype) if need_x else None
            return (grad_x, None, None, None, None, *[torch.zeros_like(s) for s in spectra])
        x2 = x.reshape(-1, b.d_in).to(cdtype) if need_c else None
        coef = _coefficients(spectra, scalings, b.bwd_weight, b.d_out, cdtype, slots) if need_x else None
        samples = 1 if slots is None else slots.numel()
        grad_x2, prod = _backward_map(gy, x2, b, coef, samples)
        grad_x = grad_x2.to(x_dtype).reshape(x_shape) if need_x else None
        grad_c = _spectrum_grads(prod, b, spectra, scalings, cdtype, slots) if need_c else [None] * len(spectra)
        return (grad_x, None, None, None, None, *grad_c)


class _LinearSpectralApply(torch.autograd.Function):
    """A frozen linear layer plus the adapters' change, in one autograd node.

    Same maths as :class:`_SpectralApply`, but the base product is computed here too, so that the
    adapter's output and input gradient are added in place into the base layer's (no extra
    ``T x d_out`` output and ``T x d_in`` gradient buffers, no autograd accumulation). Saves ``x``
    (only if a spectrum needs a gradient), the frozen weight and the spectra.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool,
                b: SpectralPlan, scalings: list[float], cdtype: torch.dtype, *spectra: torch.Tensor) -> torch.Tensor:
        ctx.b, ctx.scalings, ctx.cdtype, ctx.transposed = b, scalings, cdtype, transposed
        ctx.save_for_backward(x if any(s.requires_grad for s in spectra) else None, weight, *spectra)
        y = torch.nn.functional.linear(x, weight.t() if transposed else weight, bias)
        x2 = x.reshape(-1, b.d_in).to(cdtype)
        if x2.shape[0]:
            coef = _coefficients(spectra, scalings, b.fwd_weight, b.d_in, cdtype)
            y.view(-1, b.d_out).add_(_forward_map(torch.fft.rfft(x2), b, coef).to(y.dtype))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, weight, *spectra = ctx.saved_tensors
        b, scalings, cdtype = ctx.b, ctx.scalings, ctx.cdtype
        need_x, need_c = ctx.needs_input_grad[0], any(ctx.needs_input_grad[7:])
        gy = grad_y.reshape(-1, b.d_out)
        grad_x = None
        if need_x:
            grad_x = grad_y.matmul(weight.t() if ctx.transposed else weight)
        if gy.shape[0] == 0:
            return (grad_x, None, None, None, None, None, None, *[torch.zeros_like(s) for s in spectra])
        x2 = x.reshape(-1, b.d_in).to(cdtype) if need_c else None
        coef = _coefficients(spectra, scalings, b.bwd_weight, b.d_out, cdtype) if need_x else None
        grad_x2, prod = _backward_map(gy.to(cdtype), x2, b, coef, 1)
        if need_x:
            grad_x.view(-1, b.d_in).add_(grad_x2.to(grad_x.dtype))
        grad_c = _spectrum_grads(prod, b, spectra, scalings, cdtype) if need_c else [None] * len(spectra)
        return (grad_x, None, None, None, None, None, None, *grad_c)


class _MergedLinearApply(torch.autograd.Function):
    """A frozen linear layer with its adapters merged in for this step: ``y = x @ (W + dW)^T + b``.

    ``merged`` (``W + dW``, oriented ``(d_out, d_in)``, built by :func:`merged_weight` with no
    gradient) serves the forward and the input gradient, one GEMM each, as in the frozen layer. The
    spectrum gradient comes from the half spectra of ``x`` and ``dL/dy``
    (:func:`_sampled_products`). Saves ``x`` (only if a spectrum needs a gradient), ``merged`` and
    the spectra.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, merged: torch.Tensor, bias: torch.Tensor | None, plans: list[SpectralPlan],
                scalings: list[float], cdtype: torch.dtype, *spectra: torch.Tensor) -> torch.Tensor:
        ctx.plans, ctx.scalings, ctx.cdtype = plans, scalings, cdtype
        ctx.save_for_backward(x if any(s.requires_grad for s in spectra) else None, merged, *spectra)
        return torch.nn.functional.linear(x, merged, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, merged, *spectra = ctx.saved_tensors
        plans, scalings, cdtype = ctx.plans, ctx.scalings, ctx.cdtype
        need_x, need_c = ctx.needs_input_grad[0], any(ctx.needs_input_grad[6:])
        grad_x = grad_y.matmul(merged) if need_x else None
        grad_c = [None] * len(spectra)
        if need_c:
            b0 = plans[0]
            x2, gy = x.reshape(-1, b0.d_in).to(cdtype), grad_y.reshape(-1, b0.d_out).to(cdtype)
            if x2.shape[0] == 0:
                grad_c = [torch.zeros_like(s) for s in spectra]
            else:
                prods = _sampled_products(x2, gy, plans)
                grad_c = [_spectrum_grads(p, b, [s], [a], cdtype)[0]
                          for p, b, s, a in zip(prods, plans, spectra, scalings)]
        return (grad_x, None, None, None, None, None, *grad_c)


def _compute_dtype(x: torch.Tensor, spectra: Sequence[torch.Tensor]) -> torch.dtype:
    # CPU FFTs have no half precision and CUDA's needs power-of-two sizes: compute in fp32 at least
    wide = x.dtype == torch.float64 or any(s.dtype == torch.float64 for s in spectra)
    return torch.float64 if wide else torch.float32


# Cost model of choose_path, in ns, fitted on this project's 2-core AMD EPYC (torch 2.13, MKL FFTs) from
# benchmarks/bench_spectral_op.py's forced-path runs and the timings of the parts; one table per thread
# count and per implementation of the token maps (the native kernels of ._native, or torch's gathers).
# Per token: "entry" per entry and map (gather, scale, scatter), "fft" per (d log2 d) point of one real
# FFT, "pair" per sampled product of the spectrum gradient, "transpose" per value copied to feature-major
# (torch fallback of the merged path only). Per step: "ifft2" per (d_out d_in log2(d_out d_in)) point of
# building dW ("ifft2_big" beyond 2**22 values, where it falls out of cache), "mac" per multiply-add of a
# GEMM. Both paths have about the same fixed cost (a few hundred microseconds), left out.
_COSTS = {
    (True, 1): dict(entry=4.5, fft=0.40, pair=0.9, transpose=0.0, ifft2=0.30, ifft2_big=0.60, mac=0.025),
    (True, 2): dict(entry=3.0, fft=0.25, pair=0.45, transpose=0.0, ifft2=0.20, ifft2_big=0.40, mac=0.014),
    (False, 1): dict(entry=7.0, fft=0.40, pair=0.2, transpose=1.4, ifft2=0.30, ifft2_big=0.60, mac=0.025),
    (False, 2): dict(entry=5.0, fft=0.25, pair=0.1, transpose=1.0, ifft2=0.20, ifft2_big=0.40, mac=0.014),
}
PATHS = ("spectral", "merged", "dense")
_FORCED: list[str] = []


@contextmanager
def forced_path(path: str):
    """Within the block, :func:`choose_path` answers ``path`` wherever that path applies.

    For tests and benchmarks that compare paths on the same inputs. ``"merged"`` applies to
    :func:`linear_spectral_apply` with a float32/float64 weight, ``"dense"`` to :func:`spectral_apply`
    without gradients, ``"spectral"`` everywhere; elsewhere the rule still decides.

    Raises:
        ValueError: if ``path`` is not one of :data:`PATHS`.
    """
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}: expected one of {PATHS}")
    _FORCED.append(path)
    try:
        yield
    finally:
        _FORCED.pop()


def _fft_points(d: int) -> float:
    return d * math.log2(max(d, 2))


def path_costs(tokens: int, d_out: int, d_in: int, n_total: int, needs_grad: bool, *, fused: bool = False,
               dtype: torch.dtype = torch.float32, threads: int | None = None,
               cached: bool = False) -> dict[str, float]:
    """Modelled nanoseconds of each path that applies (see :func:`choose_path`), beyond the frozen layer."""
    compiling = torch.compiler.is_compiling()
    if threads is None:  # torch.get_num_threads() breaks a traced graph; a trace assumes several threads
        threads = 2 if compiling else torch.get_num_threads()
    native = not compiling and _native.available()
    k = _COSTS[(native, 1 if threads <= 1 else 2)]
    f_in, f_out = _fft_points(d_in), _fft_points(d_out)
    size = d_out * d_in
    build = 0.0 if cached else k["ifft2" if size <= 1 << 22 else "ifft2_big"] * size * math.log2(max(size, 2))
    if needs_grad:  # rfft x, irfft H | rfft dL/dy, rfft x again, irfft; maps: forward, input grad, products
        per_token = 3 * k["entry"] * n_total + k["fft"] * (3 * f_in + 2 * f_out)
    else:
        per_token = k["entry"] * n_total + k["fft"] * (f_in + f_out)
    costs = {"spectral": tokens * per_token}
    if fused and dtype in (torch.float32, torch.float64):
        merged = build
        if needs_grad:
            pairs = 2 * n_total
            copies = 2 * (d_in // 2 + 1) + 2 * (d_out // 2 + 1)
            merged += tokens * (k["fft"] * (f_in + f_out) + k["transpose"] * copies + k["pair"] * pairs)
        costs["merged"] = merged
    if not fused and not needs_grad:
        costs["dense"] = build + k["mac"] * tokens * size
    return costs


def choose_path(tokens: int, d_out: int, d_in: int, n_total: int, needs_grad: bool, *, fused: bool = False,
                dtype: torch.dtype = torch.float32, threads: int | None = None, cached: bool = False) -> str:
    """Which path to take for ``tokens`` rows through a ``(d_out, d_in)`` layer with ``n_total`` entries.

    * ``"spectral"``: the activation-side map (module docstring); never builds a ``d_out x d_in``
      tensor. Per token it costs 2 FFTs and one gather/scatter map without gradients, 5 and 3 with.
    * ``"merged"`` (``fused``: the frozen base product runs inside the adapter's op, float32/float64):
      ``W + dW`` built once (one real ``irfft2``), then the frozen layer's GEMMs on it; with gradients
      the spectrum gradient adds 2 FFTs, 2 transposed copies and ``2 n`` sampled products per token.
      ``cached``: ``W + dW`` is already built (gradient accumulation, repeated inference).
    * ``"dense"`` (not ``fused``, no gradients): ``dW`` built, then one extra GEMM ``x @ dW^T``.

    The costs are :func:`path_costs`' model, fitted per thread count (``threads``, default
    ``torch.get_num_threads()``) and for the native kernels being available or not. Measured with
    ``benchmarks/bench_spectral_op.py --methods frozen,ours@spectral,ours@merged`` (2 threads, n=1000,
    a training step): the merged path wins at d=384 and at d=768-1024 from a few hundred tokens per
    forward, the spectral path at d >= 2048 below about a thousand tokens (building ``dW`` costs 11 ms
    at 2048 and 146 ms at 4096) and for very short inputs. Inside :func:`forced_path` the forced path
    is returned where it applies.
    """
    if tokens == 0:
        return "spectral"
    costs = path_costs(tokens, d_out, d_in, n_total, needs_grad, fused=fused, dtype=dtype, threads=threads,
                       cached=cached)
    if _FORCED and _FORCED[-1] in costs:
        return _FORCED[-1]
    return min(costs, key=costs.get)


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
    d_in = plans[0].d_in if plans else 0
    _check_adapters(x, spectra, plans, scalings, d_out, d_in)
    cdtype = _compute_dtype(x, spectra)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *spectra))
    tokens, n_total = x.numel() // max(d_in, 1), sum(s.numel() for s in spectra)
    if choose_path(tokens, d_out, d_in, n_total, needs_grad) == "dense":
        with torch.no_grad():
            dw = sum(dense_delta_weight(s.to(cdtype), p.indices, d_out, d_in, a)
                     for s, p, a in zip(spectra, plans, scalings))
            return torch.nn.functional.linear(x.to(cdtype), dw).to(x.dtype)
    scalings = [float(a) for a in scalings]
    return _SpectralApply.apply(x, _concat(plans), scalings, cdtype, None, *spectra)


def spectral_apply_per_sample(x: torch.Tensor, spectra: Sequence[torch.Tensor], plan: SpectralPlan,
                              scalings: Sequence[float], slots: torch.Tensor) -> torch.Tensor:
    r"""Mixed-adapter batch: sample ``s`` of ``x`` gets ``x_s @ dW_{slots[s]}.T``, in one pass.

    The adapters must share one plan (same shape, ``n`` and seed: the usual case, since PEFT uses one
    seed for every layer). Then one ``rfft`` of the whole batch, one gather/scatter with a per-sample
    coefficient row and one ``irfft`` serve every adapter, instead of one pass per adapter.
    Differentiable in ``x`` and every spectrum, like :func:`spectral_apply`.

    Args:
        x: input ``(S, ..., d_in)``; dimension 0 indexes samples.
        spectra: one coefficient vector ``(n,)`` per adapter.
        plan: the adapters' shared :class:`SpectralPlan`, on ``x``'s device.
        scalings: one scaling ``a`` per adapter.
        slots: int64 ``(S,)`` on ``x``'s device: the adapter index of each sample, or
            ``len(spectra)`` for a sample without adapter (its output is zero).

    Returns:
        Tensor of shape ``(S, ..., d_out)`` in ``x.dtype``.

    Raises:
        ValueError: on mismatched lengths or shapes.
    """
    if len(spectra) != len(scalings) or not spectra:
        raise ValueError(f"need one spectrum and scaling per adapter, got {len(spectra)}, {len(scalings)}")
    for s in spectra:
        if s.shape != plan.in_bins.shape:
            raise ValueError(f"spectrum of shape {tuple(s.shape)} does not fit the shared plan "
                             f"({plan.in_bins.numel()} entries)")
    if x.dim() < 2 or x.shape[-1] != plan.d_in:
        raise ValueError(f"x must be (samples, ..., {plan.d_in}), got {tuple(x.shape)}")
    if slots.dim() != 1 or slots.numel() != x.shape[0]:
        raise ValueError(f"slots must hold one adapter index per sample ({x.shape[0]}), got {tuple(slots.shape)}")
    cdtype = _compute_dtype(x, spectra)
    scalings = [float(a) for a in scalings]
    return _SpectralApply.apply(x, plan, scalings, cdtype, slots.to(torch.long), *spectra)


def linear_spectral_apply(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          spectra: Sequence[torch.Tensor], plans: Sequence[SpectralPlan],
                          scalings: Sequence[float], transposed: bool = False, path: str | None = None,
                          merged: torch.Tensor | None = None) -> torch.Tensor:
    r"""``linear(x, W, bias) + x @ (sum_a dW_a).T`` for a **frozen** ``W``, as one autograd node.

    Equal to ``F.linear(x, W, bias) + spectral_apply(x, ...)`` but cheaper to train. Two paths
    (:func:`choose_path` with ``fused=True`` picks one unless ``path`` is given):

    * ``"spectral"``: the adapters' output and input gradient, computed on the activations, are
      added in place into the base layer's;
    * ``"merged"``: one GEMM on ``W + dW`` forward and one backward, as the frozen layer does, and
      the spectrum gradient from the half spectra of ``x`` and ``dL/dy``. ``merged`` passes a
      ``W + dW`` already built by :func:`merged_weight` for these spectra (a layer keeps it across
      the micro-batches of one optimizer step); it implies this path.

    ``weight`` and ``bias`` get no gradient (use :func:`spectral_apply` beside the base layer when
    they train).

    Args:
        x: input ``(..., d_in)``.
        weight: ``(d_out, d_in)`` (``nn.Linear``), or ``(d_in, d_out)`` with ``transposed=True``
            (transformers' ``Conv1D``); same dtype as ``x``.
        bias: ``(d_out,)`` or ``None``.
        spectra: one coefficient vector ``(n_a,)`` per adapter.
        plans: one :class:`SpectralPlan` per adapter, on ``x``'s device.
        scalings: one scaling ``a`` per adapter.
        transposed: whether ``weight`` is stored ``(d_in, d_out)``.
        path: ``"spectral"`` or ``"merged"``; ``None`` lets :func:`choose_path` decide.
        merged: ``W + dW`` for exactly these spectra, ``(d_out, d_in)``, in ``weight``'s dtype.

    Returns:
        Tensor ``(..., d_out)`` in ``x.dtype``.

    Raises:
        ValueError: on mismatched lengths or shapes, an unknown path, or a weight or bias that
            requires grad.
    """
    d_out, d_in = (weight.shape[1], weight.shape[0]) if transposed else tuple(weight.shape)
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("linear_spectral_apply needs a frozen weight and bias (requires_grad=False)")
    _check_adapters(x, spectra, plans, scalings, d_out, d_in)
    if path not in (None, "spectral", "merged"):
        raise ValueError(f"linear_spectral_apply: unknown path {path!r}, expected 'spectral' or 'merged'")
    if merged is not None:
        if merged.shape != (d_out, d_in) or merged.dtype != weight.dtype:
            raise ValueError(f"merged must be a ({d_out}, {d_in}) {weight.dtype} tensor, got "
                             f"{tuple(merged.shape)} {merged.dtype}")
        path = "merged"
    cdtype = _compute_dtype(x, spectra)
    scalings = [float(a) for a in scalings]
    if path is None:
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *spectra))
        path = choose_path(x.numel() // d_in, d_out, d_in, sum(s.numel() for s in spectra), needs_grad,
                           fused=True, dtype=weight.dtype)
    if path == "merged":
        if merged is None:
            merged = merged_weight(weight, spectra, plans, scalings, transposed)
        return _MergedLinearApply.apply(x, merged, bias, list(plans), scalings, cdtype, *spectra)
    return _LinearSpectralApply.apply(x, weight, bias, transposed, _concat(plans), scalings, cdtype, *spectra)
