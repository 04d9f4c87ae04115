"""The index tensors of one BOFT geometry on one device (:class:`ButterflyPlan`): derived from it, never saved.

Factor ``i`` of the butterfly permutations only mixes aligned chunks of ``b 2**i`` features, so
``M = B_{m-1} ... B_0`` is block diagonal with width ``L = b 2**(m-1)``. A plan knows that width (the fused
path builds those blocks), the gathers the factor-by-factor path runs, and where narrow blocks go when they
are grouped up to a wider batched matmul (tiny GEMMs are slow).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from ._placement import on_real_cpu, place
from .butterfly_geometry import butterfly_permutations

logger = logging.getLogger(__name__)

__all__ = ["ButterflyPlan", "make_butterfly_plan", "permutation_plan"]

_GROUP_WIDTH = 32  # narrower blocks are grouped up to this width: tiny GEMMs are slow (2-core CPU)
_CHAIN_MAX_WIDTH = 64  # fused blocks up to this width come from a chain of bmms, wider from gathers

Gathers = tuple  # m + 1 gathers, each None (identity) or (index, inverse index)


def _gathers(perms: torch.Tensor) -> Gathers:
    """Gathers for ``z M``: before factors ``m-1, ..., 0``, then after factor 0.

    ``z B_i = ((z P_i) blockdiag(Q_i)) P_i^T`` with ``z P_i = z[:, inv_i]`` and ``z P_i^T = z[:, perm_i]``;
    neighbouring ``P_i^T`` and ``P_{i-1}`` merge into one gather ``perm_i[inv_{i-1}]``.
    """
    m, n = perms.shape
    inv = torch.argsort(perms, dim=1)
    ident = torch.arange(n, device=perms.device)
    gathers = [inv[m - 1]] + [perms[i][inv[i - 1]] for i in range(m - 1, 0, -1)] + [perms[0]]
    return tuple(None if torch.equal(g, ident) else (g, torch.argsort(g)) for g in gathers)


def _group_positions(size: int, width: int) -> torch.Tensor:
    """Flat positions of block ``k``'s entry ``(a, c)``, i.e. ``(k b + a, k b + c)``, in a width group."""
    k = torch.arange(width // size)[:, None, None] * size
    a = torch.arange(size)
    return ((k + a[:, None]) * width + k + a).reshape(-1)


def _embedding(n: int, num: int, size: int, m: int, width: int) -> torch.Tensor:
    """Flat positions ``(m, g b b)`` of each ``Q_i`` entry in a ``width x width`` window of ``B_i``.

    ``B_i[u, v] = D_i[p(u), p(v)]`` with ``p`` the factor's permutation on one window (the same in all
    windows), so block ``k``'s entry ``(a, c)`` lands at ``(p^-1(k b + a), p^-1(k b + c))``.
    """
    inv = torch.argsort(butterfly_permutations(n, num, size, m)[:, :width], dim=1)
    rows = (torch.arange(width // size)[:, None] * size + torch.arange(size)).reshape(-1, size, 1)
    return (inv[:, rows] * width + inv[:, rows.mT]).reshape(m, -1)


def group_width(n: int, width: int) -> int:
    """Double ``width`` towards ``_GROUP_WIDTH`` (tiny GEMMs are slow), keeping it a divisor below ``n``."""
    while width < _GROUP_WIDTH and n % (2 * width) == 0 and 2 * width < n:
        width *= 2
    return width


@dataclass(frozen=True, eq=False)
class ButterflyPlan:
    """The index tensors of one geometry ``(N, b, m)`` on one device: derived from it alone, never saved.

    Build it once with :func:`make_butterfly_plan` and pass it to the rotation op; a layer keeps its own.

    Attributes:
        num, size, m: ``N``, ``b`` and ``m``.
        gathers: ``(for M, for M^T)``: ``m + 1`` gathers each, ``None`` (identity) or ``(index, inverse)``.
        width: Width of ``M``'s diagonal blocks for the fused path, grouped up (``0``: no such blocks, as for
            arbitrary permutations).
        group: Width the factor-by-factor path groups its blocks to; ``group_positions`` says where they go
            (``None``: not grouped).
        embedding: Where each ``Q_i`` entry goes in a fused window (``None``: built by rotating the identity).
    """

    num: int
    size: int
    m: int
    gathers: tuple[Gathers, Gathers]
    width: int
    group: int
    group_positions: Optional[torch.Tensor]
    embedding: Optional[torch.Tensor]
    device: torch.device

    @property
    def n(self) -> int:
        return self.num * self.size

    def check(self, q: torch.Tensor) -> None:
        """Raise ``ValueError`` if ``q`` (``(m, N, b, b)``) is not of this plan's geometry or device."""
        if tuple(q.shape[:3]) != (self.m, self.num, self.size) or q.device != self.device:
            raise ValueError(f"The butterfly plan is for Q of shape {(self.m, self.num, self.size, self.size)} on "
                             f"{self.device}, got {tuple(q.shape)} on {q.device}")


def _move(gathers: Gathers, device: torch.device) -> Gathers:
    return tuple(g and (place(g[0], device), place(g[1], device)) for g in gathers)


def _plan(perms: torch.Tensor, num: int, size: int, width: int, device: torch.device) -> ButterflyPlan:
    m, n = perms.shape
    gathers = on_real_cpu(lambda: (_gathers(perms), _gathers(perms.flip(0))))  # identity tests read CPU values
    group = group_width(n, size)
    positions = on_real_cpu(_group_positions, size, group) if group != size else None
    embedding = on_real_cpu(_embedding, n, num, size, m, width) if width and width <= _CHAIN_MAX_WIDTH else None
    return ButterflyPlan(
        num=num, size=size, m=m, gathers=(_move(gathers[0], device), _move(gathers[1], device)), width=width,
        group=group, group_positions=None if positions is None else place(positions, device),
        embedding=None if embedding is None else place(embedding, device), device=device)


def make_butterfly_plan(num: int, size: int, m: int, device: torch.device | str = "cpu") -> ButterflyPlan:
    """Build the :class:`ButterflyPlan` of ``N = num`` blocks of size ``b = size`` and ``m`` factors.

    The permutations are computed on the CPU (no device synchronisation) and moved to ``device``.
    """
    device, n = torch.device(device), num * size
    perms = on_real_cpu(butterfly_permutations, n, num, size, m)
    width = size * 2 ** (m - 1)
    width = group_width(n, width) if width < n and n % width == 0 else 0
    logger.debug("BOFT n=%d b=%d m=%d: rotation block width %d", n, size, m, width or n)
    return _plan(perms, num, size, width, device)


def permutation_plan(perms: torch.Tensor, size: int, device: torch.device | str = "cpu") -> ButterflyPlan:
    """A plan for arbitrary permutations ``perms`` ``(m, n)`` (tests, figures): ``P_i[j, perms[i, j]] = 1``.

    Its rotation goes factor by factor or through the dense matrix; the fused path needs the butterfly
    structure and is never offered.
    """
    perms = on_real_cpu(lambda: perms.detach().to("cpu", torch.long))
    m, n = perms.shape
    if n % size != 0:
        raise ValueError(f"Block size {size} does not divide the permutations' length {n}.")
    return _plan(perms, n // size, size, 0, torch.device(device))
