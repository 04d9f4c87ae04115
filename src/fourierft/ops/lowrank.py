r"""Low-rank factorisations of a weight change ``dW`` (``d_out x d_in``), on plain tensors.

An operator is anything with ``shape``, ``matmul(X)`` (``dW @ X``), ``rmatmul(Y)`` (``dW^T @ Y``),
``dense()`` and ``frobenius_sq()``. Two are defined here:

* :class:`DenseDelta`: a materialised ``dW`` (BOFT builds it with one butterfly pass over ``W``).
* :class:`SpectralDelta`: FourierFT's ``dW`` without forming it. With frequencies ``(p_i, q_i)``,
  coefficients ``c`` and scaling ``a``,

  .. math::

      (\Delta W X)_j = \frac{a}{d_{out} d_{in}} \mathrm{Re} \sum_i c_i e^{2\pi i p_i j / d_{out}}
      \sum_k X_k e^{2\pi i q_i k / d_{in}},

  an unnormalised inverse FFT of each column of ``X`` (length ``d_in``), a gather at ``q``, a scatter-add at
  ``p`` and an inverse FFT of length ``d_out``: ``O(k (d log d + n))`` for ``k`` columns instead of
  ``O(k d_out d_in)``. ``dW^T Y`` swaps the roles of ``(p, d_out)`` and ``(q, d_in)``. Its squared Frobenius
  norm follows from Parseval: ``Re(ifft2(S)) = ifft2(T)`` with ``T = (S + conj(S[-p, -q])) / 2``, so
  ``||dW||_F^2 = a^2 / (d_out d_in) * sum |T|^2``.

:func:`randomized_svd` is the randomised range finder of Halko, Martinsson and Tropp (2011, algorithm 4.4:
``power_iters`` subspace iterations with a QR after every product), using only the operator's products.
Its rank-``r`` result ``U S V^T`` is ``P dW`` for an orthogonal projector ``P``, so the squared error is
``||dW||_F^2 - sum(S^2)`` exactly; no dense ``dW`` is needed to report it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DenseDelta:
    """A materialised ``dW`` (float32 or wider)."""

    weight: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight @ x

    def rmatmul(self, y: torch.Tensor) -> torch.Tensor:
        return self.weight.T @ y

    def dense(self) -> torch.Tensor:
        return self.weight

    def frobenius_sq(self) -> float:
        return float(torch.linalg.vector_norm(self.weight, dtype=torch.float64)) ** 2


@dataclass(frozen=True)
class SpectralDelta:
    """FourierFT's ``dW = a Re(ifft2(S))``, ``S[p_i, q_i] = c_i``, applied through FFTs (see the module doc)."""

    rows: torch.Tensor  # p, int64 (n,)
    cols: torch.Tensor  # q, int64 (n,)
    coef: torch.Tensor  # c, float (n,)
    scaling: float
    d_out: int
    d_in: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d_out, self.d_in)

    def _apply(self, x: torch.Tensor, gather: torch.Tensor, scatter: torch.Tensor, d_gather: int,
               d_scatter: int) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        spectrum = torch.fft.ifft(x.to(dtype), dim=0, norm="forward")  # sum_k x_k e^{+2 pi i q k / d}
        z = spectrum.index_select(0, gather) * self.coef.to(dtype)[:, None]
        h = torch.zeros(d_scatter, x.shape[1], dtype=z.dtype, device=x.device).index_add_(0, scatter, z)
        out = torch.fft.ifft(h, dim=0, norm="forward").real
        return out * (self.scaling / (d_gather * d_scatter))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``dW @ x`` for ``x`` of shape ``(d_in, k)``."""
        return self._apply(x, self.cols, self.rows, self.d_in, self.d_out)

    def rmatmul(self, y: torch.Tensor) -> torch.Tensor:
        """``dW^T @ y`` for ``y`` of shape ``(d_out, k)``."""
        return self._apply(y, self.rows, self.cols, self.d_out, self.d_in)

    def dense(self) -> torch.Tensor:
        s = torch.zeros(self.d_out, self.d_in, dtype=torch.complex64, device=self.coef.device)
        s[self.rows, self.cols] = self.coef.to(torch.complex64)
        return torch.fft.ifft2(s).real * self.scaling

    def frobenius_sq(self) -> float:
        flat = torch.cat([self.rows * self.d_in + self.cols,
                          ((-self.rows) % self.d_out) * self.d_in + (-self.cols) % self.d_in])
        values = torch.cat([self.coef, self.coef]).double() / 2
        unique, inverse = torch.unique(flat, return_inverse=True)
        t = torch.zeros(unique.numel(), dtype=torch.float64, device=values.device).index_add_(0, inverse, values)
        return float(t.square().sum()) * self.scaling ** 2 / (self.d_out * self.d_in)


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def randomized_svd(op, rank: int, oversample: int = 10, power_iters: int = 2, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` truncated SVD ``(U, S, Vh)`` of ``op`` from its products only.

    Args:
        op: An operator (see the module docstring).
        rank: Number of singular triplets returned (at most ``min(op.shape)``).
        oversample: Extra columns of the random test matrix.
        power_iters: Subspace iterations (each one product with ``dW^T`` and one with ``dW``).
        seed: Seed of the Gaussian test matrix (a private CPU generator; the global RNG is untouched).

    Returns:
        ``U`` ``(d_out, rank)`` and ``Vh`` ``(rank, d_in)`` with orthonormal columns/rows, ``S`` descending.
    """
    m, n = op.shape
    k = min(rank + oversample, m, n)
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(n, k, generator=generator)
    device = _device(op)
    q = _orthonormal(op.matmul(omega.to(device)))
    for _ in range(power_iters):
        q = _orthonormal(op.matmul(_orthonormal(op.rmatmul(q))))
    bt = op.rmatmul(q)  # (n, k) = (Q^T dW)^T
    ub, s, vh = torch.linalg.svd(bt.T, full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vh[:rank]


def exact_svd(op) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full thin SVD of the dense ``dW`` in float32 (``torch.linalg.svd``, as PEFT's conversion does)."""
    return torch.linalg.svd(op.dense().float(), full_matrices=False)


def _device(op) -> torch.device:
    tensor = op.weight if isinstance(op, DenseDelta) else op.coef
    return tensor.device
