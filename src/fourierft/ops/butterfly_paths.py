r"""The three ways to compute ``z M`` (or ``z M^T``) for BOFT; :mod:`.butterfly_routes` says which one runs.

* ``"fused"``: build ``M``'s ``(n/L, L, L)`` diagonal blocks from ``Q`` and apply them with one batched
  matmul (``O(T n L)`` in one fast GEMM call).
* ``"factors"``: factor by factor, ``m-1`` first: ``z P_i`` (a gather), ``z blockdiag(Q_i)`` (a batched
  matmul), ``z P_i^T``; neighbouring gathers merged, identities skipped (``m`` bmms, at most ``m + 1`` gathers).
* ``"dense"``: build the ``n x n`` matrix ``M`` (by the factor path on the identity), then one GEMM.

All are plain autograd (with a gather whose backward is a gather); ``z`` is ``(T, n)`` of any layout. Blocks
and ``M`` are built in ``q``'s dtype (float32 or wider) and cast to ``z``'s dtype once.
"""

from __future__ import annotations

import torch

from .butterfly_plan import ButterflyPlan, Gathers

__all__ = ["fused_blocks", "rotate_fused", "rotate_by_factors", "rotate_dense", "dense_matrix_t"]


class _PermuteRows(torch.autograd.Function):
    """``z[index]`` with the gather ``grad[inverse]`` as backward (index_select's is a slow scatter-add)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return z.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.index_select(0, ctx.saved_tensors[0]), None, None


def _grouped(q: torch.Tensor, plan: ButterflyPlan) -> torch.Tensor:
    """``(N, b, b)`` blocks regrouped as the same block diagonal in ``(N b / group, group, group)``."""
    if plan.group_positions is None:
        return q
    flat = q.reshape(plan.n // plan.group, -1)
    out = q.new_zeros(flat.shape[0], plan.group * plan.group)
    return out.index_copy(1, plan.group_positions, flat).view(-1, plan.group, plan.group)


def _factors(zt: torch.Tensor, q: torch.Tensor, gathers: Gathers, plan: ButterflyPlan) -> torch.Tensor:
    """``(z M)^T`` from ``z^T`` ``(n, T)``: column permutations become contiguous row gathers, and
    ``(z blockdiag(Q))^T = blockdiag(Q^T) z^T`` is a bmm on contiguous ``(K, w, T)`` slabs."""
    m, n, t, w = q.shape[0], plan.n, zt.shape[1], plan.group
    # not q[i]: fake CUDA tensors index with an int only on a CUDA build
    factors = (q.reshape(q.shape[1:]),) if m == 1 else q.unbind(0)
    for step in range(m):
        if gathers[step] is not None:
            zt = _PermuteRows.apply(zt, *gathers[step])
        zt = torch.bmm(_grouped(factors[m - 1 - step], plan).mT, zt.reshape(n // w, w, t)).view(n, t)
    return zt if gathers[m] is None else _PermuteRows.apply(zt, *gathers[m])


def rotate_by_factors(z: torch.Tensor, q: torch.Tensor, plan: ButterflyPlan, transpose: bool) -> torch.Tensor:
    """``z M`` (``z M^T`` if ``transpose``) factor by factor; returns a ``(T, n)`` view of its transpose."""
    # M^T = B_0^T ... B_{m-1}^T: the same algorithm with the factors reversed and the blocks transposed.
    q = ((q.flip(0) if q.shape[0] > 1 else q).mT if transpose else q).to(z.dtype)
    return _factors(z.t(), q, plan.gathers[int(transpose)], plan).t()


def fused_blocks(q: torch.Tensor, plan: ButterflyPlan) -> torch.Tensor:
    """``M``'s diagonal blocks ``(n / L, L, L)``, ``L = plan.width``.

    Narrow windows: embed each ``Q_i`` as the windows of ``B_i`` (one ``index_copy``) and multiply
    ``B_{m-1} ... B_0`` (``m - 1`` bmms of ``n L^2``). Wide: rotate the tiled identity ``[I ... I]``
    (``L x n``) factor by factor; ``M`` being block diagonal, its windows are the blocks.
    """
    m, width = q.shape[0], plan.width
    windows = plan.n // width
    if plan.embedding is not None:
        flat = q.reshape(m, windows, -1)
        factors = [q.new_zeros(windows, width * width).index_copy(1, p, f)  # unbind: fake CUDA tensors index
                   for p, f in zip(plan.embedding.unbind(0), flat.unbind(0))]  # with an int only on a CUDA build
        blocks = factors[m - 1].view(windows, width, width)
        for i in range(m - 2, -1, -1):
            blocks = torch.bmm(blocks, factors[i].view(windows, width, width))
        return blocks
    tile_t = torch.eye(width, dtype=q.dtype, device=q.device).repeat(windows, 1)  # (n, L)
    return _factors(tile_t, q, plan.gathers[0], plan).reshape(windows, width, width).mT


def _block_matmul(z: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``z blockdiag(blocks)`` for ``z`` ``(T, K w)``: one bmm on the strided ``(K, T, w)`` view, one copy."""
    t, (k, w, _) = z.shape[0], blocks.shape
    return torch.bmm(z.view(t, k, w).transpose(0, 1), blocks).transpose(0, 1).reshape(t, k * w)


def rotate_fused(z: torch.Tensor, q: torch.Tensor, plan: ButterflyPlan, transpose: bool) -> torch.Tensor:
    """``z M`` (``z M^T``) through ``M``'s diagonal blocks; ``plan.width`` must be non-zero."""
    blocks = fused_blocks(q, plan).to(z.dtype)
    return _block_matmul(z.contiguous(), blocks.mT if transpose else blocks)


def dense_matrix_t(q: torch.Tensor, plan: ButterflyPlan) -> torch.Tensor:
    """``M^T`` ``(n, n)``, contiguous, in ``q``'s dtype: the identity rotated factor by factor."""
    eye = torch.eye(plan.n, dtype=q.dtype, device=q.device)
    return _factors(eye, q, plan.gathers[0], plan)  # (I M)^T, computed as such: no transposed copy


def rotate_dense(z: torch.Tensor, q: torch.Tensor, plan: ButterflyPlan, transpose: bool) -> torch.Tensor:
    """``z M`` (``z M^T``) as one GEMM with the dense ``M``."""
    m_t = dense_matrix_t(q, plan).to(z.dtype)
    return z @ (m_t if transpose else m_t.t())
