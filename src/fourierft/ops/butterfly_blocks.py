"""BOFT's orthogonal blocks: ``Q = cayley(R)`` and the multiplicative dropout applied to them.

``R`` ``(m, N, b, b)`` is ``boft_R``; ``S = (R - R^T) / 2`` and ``Q = (I - S)(I + S)^-1`` block by block, so
every block is orthogonal and ``R = 0`` gives the identity (DESIGN.md section 4).
"""

from __future__ import annotations

import torch

__all__ = ["cayley", "multiplicative_dropout"]

_LAPACK_INV_MAX = 7  # batched LAPACK inversion is fast below 8x8 and slow above (2-core CPU); `_inverse` recurses


def _inverse(a: torch.Tensor) -> torch.Tensor:
    """Batched inverse of ``A = I + S`` (``S`` skew) by block Schur recursion down to LAPACK sizes.

    ``A = [[P, U], [V, W]]``, ``Z = W - V P^-1 U``:
    ``A^-1 = [[P^-1 + P^-1 U Z^-1 V P^-1, -P^-1 U Z^-1], [-Z^-1 V P^-1, Z^-1]]``. ``P`` and ``Z`` keep a
    positive definite symmetric part, so they are invertible and need no pivoting.
    """
    size = a.shape[-1]
    if size <= _LAPACK_INV_MAX:
        return torch.linalg.inv_ex(a)[0]
    h = size // 2
    p, u, v, w = a[..., :h, :h], a[..., :h, h:], a[..., h:, :h], a[..., h:, h:]
    p_inv = _inverse(p)
    pu = p_inv @ u
    vp = v @ p_inv
    z_inv = _inverse(w - v @ pu)
    top_right = -pu @ z_inv
    bottom_left = -z_inv @ vp
    top_left = p_inv - top_right @ vp
    return torch.cat([torch.cat([top_left, top_right], -1), torch.cat([bottom_left, z_inv], -1)], -2)


class _Cayley(torch.autograd.Function):
    """``Q = (I - S)(I + S)^-1 = 2 (I + S)^-1 - I`` with ``S = (R - R^T) / 2``.

    Backward: ``dQ = -2 A^-1 dS A^-1`` with ``A^-1 = (Q + I) / 2``, so
    ``dL/dS = -(Q^T + I) G (Q^T + I) / 2`` and ``dL/dR = (dL/dS - dL/dS^T) / 2``: it needs ``Q`` only, which
    is why a ``Q`` computed earlier for the same ``R`` (``known``) can stand in for the forward.
    """

    @staticmethod
    def forward(ctx, r: torch.Tensor, known: torch.Tensor | None) -> torch.Tensor:
        if known is None:
            eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
            known = _inverse(torch.add(eye, r - r.mT, alpha=0.5)).mul_(2.0).sub_(eye)  # a fresh result: in place
        ctx.save_for_backward(known)
        return known

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (q,) = ctx.saved_tensors
        a_inv_t = q.mT + torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
        h = a_inv_t @ grad @ a_inv_t  # dL/dS = -h / 2, dL/dR = (dL/dS - dL/dS^T) / 2
        return (h - h.mT).mul_(-0.25), None


def cayley(r: torch.Tensor, *, known: torch.Tensor | None = None) -> torch.Tensor:
    """Cayley transform of the skew part of ``R``, batched over leading dimensions.

    ``S = (R - R^T) / 2`` and ``Q = (I - S)(I + S)^{-1}``, which is orthogonal (``R = 0`` gives ``I``).
    Computed in float32 (float64 if ``R`` is float64) and returned in ``R``'s dtype.

    Args:
        r: Tensor of shape ``(..., b, b)``.
        known: ``cayley(r)`` computed earlier for these exact values of ``r`` (detached): returned as the
            value, with the gradient to ``r`` still attached (no inversion is run).

    Returns:
        Orthogonal ``Q`` with the shape and dtype of ``r``.
    """
    work = torch.float64 if r.dtype == torch.float64 else torch.float32
    flat = r.reshape(-1, r.shape[-2], r.shape[-1]).to(work)
    if known is not None:
        known = known.reshape(flat.shape).to(work)
    return _Cayley.apply(flat, known).reshape(r.shape).to(r.dtype)


def multiplicative_dropout(
    q: torch.Tensor, p: float, training: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """BOFT multiplicative dropout on the Cayley blocks: each block of one factor is dropped with probability ``p``.

    Training with ``p > 0``: draw one factor ``f = torch.randint(0, m)`` and replace ``k`` of its ``N``
    blocks, chosen by ``torch.randperm(N)``, by the identity. PEFT takes ``k = int(p N)``, so ``p N < 1``
    (e.g. 0.1 over 8 blocks) never drops anything; here ``k`` is ``p N`` rounded down or up at random
    (up with probability ``frac(p N)``, one extra ``torch.rand`` draw), so ``E[k] = p N`` and every block
    of the factor is dropped with probability exactly ``p``. When ``p N`` is a whole number no extra number
    is drawn and the result equals PEFT's for equal seeds. In eval or with ``p == 0``, ``q`` is returned as
    is and no random number is drawn. The draws come from the CPU generator, as PEFT's do, and stay tensors:
    no value is read back to the host, and the mask reaches ``q``'s device by one non-blocking copy.

    Args:
        q: Blocks ``(m, N, b, b)``.
        p: Fraction of blocks to drop in the chosen factor.
        training: Whether the module is in training mode.
        generator: Optional CPU generator.

    Returns:
        Tensor like ``q``.
    """
    if not training or p <= 0:
        return q
    if q.dim() != 4 or q.shape[-1] != q.shape[-2]:
        raise ValueError(f"Q must have shape (m, N, b, b), got {tuple(q.shape)}.")
    m, num, size, _ = q.shape
    factor = torch.randint(0, m, (1,), generator=generator, device="cpu")
    whole, frac = divmod(p * num, 1.0)
    order = torch.randperm(num, generator=generator, device="cpu")
    count = torch.full((), int(whole), dtype=torch.long, device="cpu")
    if frac > 1e-9:
        count = count + (torch.rand((), generator=generator, device="cpu") < frac)
    # PEFT shuffles the mask [1]*k + [0]*(N-k) with this order: block j is dropped iff order[j] < k.
    mask = (torch.arange(m, device="cpu")[:, None] == factor) & (order < count)
    eye = torch.eye(size, dtype=q.dtype, device=q.device)
    return torch.where(mask.view(m, num, 1, 1).to(q.device, non_blocking=True), eye, q)
