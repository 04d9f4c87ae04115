"""Pure tensor functions for BOFT (orthogonal butterfly fine-tuning).

Notation: ``n`` features, ``N`` blocks of size ``b`` (``N b = n``), ``m`` butterfly factors.

* ``R`` ``(m, N, b, b)`` is ``boft_R``; ``Q = cayley(R)`` is orthogonal per block.
* ``perms`` ``(m, n)``: ``perms[i]`` is factor ``i``'s block-butterfly permutation (row 0 the identity),
  ``P_i[j, perms[i, j]] = 1``, so ``(P_i x)[j] = x[perms[i, j]]``.
* ``B_i = P_i blockdiag(Q_i) P_i^T`` and ``M = B_{m-1} ... B_1 B_0``; the adapter computes ``x M`` on
  row vectors (PEFT: ``base(x @ M)``).

Speed: factor ``i`` of the butterfly permutations only mixes aligned chunks of ``b 2**i`` features, so
``M`` is block diagonal with width ``L = b 2**(m-1)``. ``rotate`` builds those ``(n/L, L, L)`` blocks
from ``Q`` and applies them with one batched matmul; for wide ``L`` it applies the factors one by one
(gathers and small batched matmuls). No path builds an ``n x n`` matrix except ``dense_rotation``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ._placement import on_real_cpu, place

logger = logging.getLogger(__name__)

__all__ = [
    "block_geometry",
    "block_butterfly_perm",
    "butterfly_permutations",
    "cayley",
    "rotate",
    "rotate_per_sample",
    "rotate_transpose",
    "dense_rotation",
    "multiplicative_dropout",
    "ButterflyPlan",
    "make_butterfly_plan",
    "prepare",
    "scale_output",
]

# Thresholds measured on CPU (2 cores, MKL), see benchmarks/bench_butterfly_op.py:
_MAX_FUSED_WIDTH = 256  # widest diagonal block of M that `rotate` builds; wider goes factor by factor
_GROUP_WIDTH = 32  # narrower blocks are grouped up to this width: tiny GEMMs are slow
_CHAIN_MAX_WIDTH = 64  # fused blocks up to this width come from a chain of bmms, wider from gathers
_LAPACK_INV_MAX = 7  # batched LAPACK inversion is fast below 8x8 and slow above; `_inverse` recurses
_SCALE_CHUNK = 1 << 18  # elements per row chunk in `scale_output`'s backward (1 MiB of float32)


def _valid_block_sizes(n: int, m: int) -> list[int]:
    """Block sizes ``b`` with ``n % b == 0`` that satisfy the butterfly constraints for ``m``."""
    sizes = [s for s in range(1, n + 1) if n % s == 0]
    if m > 1:
        sizes = [s for s in sizes if s % 2 == 0 and (n // s) % 2 ** (m - 1) == 0]
    return sizes


def block_geometry(n: int, block_size: int, block_num: int, n_butterfly_factor: int) -> tuple[int, int]:
    """Validate and complete a BOFT block geometry.

    One of ``block_size`` / ``block_num`` may be 0 (derived from ``n``); both non-zero must multiply to
    ``n``. For ``m > 1`` the permutations need exactly ``b`` even (factors pair half blocks) and
    ``N % 2**(m-1) == 0`` (factor ``i`` permutes chunks of ``2**i`` whole blocks); PEFT's other checks
    (``m-1 <= log2 N``, ``n % (b 2**(m-1)) == 0``, ``N`` even) follow from these two.

    Args:
        n: Number of input features (Linear ``in_features``; Conv2d ``in_channels * k * k``).
        block_size: Block size ``b`` or 0.
        block_num: Number of blocks ``N`` or 0.
        n_butterfly_factor: Number of butterfly factors ``m >= 1``.

    Returns:
        ``(block_size, block_num)`` with ``block_size * block_num == n``.

    Raises:
        ValueError: If the geometry is invalid; the message lists block sizes that would work.
    """
    m = n_butterfly_factor
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"boft_n_butterfly_factor must be an integer >= 1, got {m!r}.")
    if n < 1:
        raise ValueError(f"The number of input features must be positive, got n={n}.")
    if block_size < 0 or block_num < 0:
        raise ValueError(f"boft_block_size ({block_size}) and boft_block_num ({block_num}) must be >= 0.")
    hint = f"valid boft_block_size values for n={n}, boft_n_butterfly_factor={m}: {_valid_block_sizes(n, m)}"
    if block_size == 0 and block_num == 0:
        raise ValueError(f"Set one of boft_block_size or boft_block_num (both are 0); {hint}.")
    if block_size and block_num and block_size * block_num != n:
        raise ValueError(
            f"boft_block_size={block_size} and boft_block_num={block_num} disagree: their product must "
            f"equal n={n}; set only one of them. {hint}."
        )
    given, value = ("boft_block_size", block_size) if block_size else ("boft_block_num", block_num)
    if n % value != 0:
        raise ValueError(f"{given}={value} must divide n={n}; {hint}.")
    size, num = (value, n // value) if block_size else (n // value, value)
    if m > 1 and size % 2 != 0:
        raise ValueError(
            f"boft_block_size={size} (from {given}={value}) must be even when boft_n_butterfly_factor={m} > 1; "
            f"{hint}."
        )
    if m > 1 and num % 2 ** (m - 1) != 0:
        raise ValueError(
            f"boft_block_num={num} (from {given}={value}) must be a multiple of 2**(m-1)={2 ** (m - 1)} for "
            f"boft_n_butterfly_factor={m}; {hint}."
        )
    return size, num


def block_butterfly_perm(n: int, b: int, r: int, n_butterfly_factor: int) -> torch.Tensor:
    """Block-butterfly permutation, identical to PEFT's ``BOFTLayer.block_butterfly_perm``.

    ``b`` chunks of ``c = n / b``, each cut into sub-blocks of length ``r`` reordered even-indexed first:
    ``perm[k c + t r + j] = k c + seq[t] r + j`` with ``seq = [0, 2, 4, ..., 1, 3, 5, ...]``.

    Args:
        n: Length of the permutation.
        b: Number of chunks.
        r: Sub-block length.
        n_butterfly_factor: PEFT's ``nbf0 = m - 1``; 0 gives the identity.

    Returns:
        LongTensor of shape ``(n,)``.

    Raises:
        ValueError: If ``2 b r > n`` (PEFT's check) or the chunks do not tile ``n`` exactly
            (PEFT crashes or misbehaves there).
    """
    if n_butterfly_factor == 0:
        return torch.arange(n)
    if b * r * 2 > n:
        raise ValueError(f"Invalid number of blocks: 2 * b * r = {2 * b * r} > n = {n} (b={b}, r={r}).")
    if b < 1 or r < 1 or n % b != 0 or (n // b) % r != 0:
        raise ValueError(f"Butterfly chunks do not tile n={n}: need b={b} | n and r={r} | n/b.")
    chunk = n // b
    k = chunk // r
    seq = torch.cat([torch.arange(0, k, 2), torch.arange(1, k, 2)])
    within = (seq[:, None] * r + torch.arange(r)).reshape(-1)
    return (torch.arange(0, n, chunk)[:, None] + within).reshape(-1)


def butterfly_permutations(n: int, block_num: int, block_size: int, m: int) -> torch.Tensor:
    """All ``m`` factor permutations, row ``i`` as PEFT builds ``boft_P[i]``.

    ``perms[i] = block_butterfly_perm(n, int(block_num / 2**i), int(block_size / 2), m - 1)``.

    Returns:
        LongTensor of shape ``(m, n)``; row 0 is the identity.
    """
    rows = [block_butterfly_perm(n, int(block_num / 2**i), int(block_size / 2), m - 1) for i in range(m)]
    return torch.stack(rows)


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
    ``dL/dS = -(Q^T + I) G (Q^T + I) / 2`` and ``dL/dR = (dL/dS - dL/dS^T) / 2``; no solve needed.
    """

    @staticmethod
    def forward(ctx, r: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
        s = 0.5 * (r - r.mT)
        q = 2.0 * _inverse(eye + s) - eye
        ctx.save_for_backward(q)
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (q,) = ctx.saved_tensors
        a_inv_t = q.mT + torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
        grad_s = -0.5 * (a_inv_t @ grad @ a_inv_t)
        return 0.5 * (grad_s - grad_s.mT)


def cayley(r: torch.Tensor) -> torch.Tensor:
    """Cayley transform of the skew part of ``R``, batched over leading dimensions.

    ``S = (R - R^T) / 2`` and ``Q = (I - S)(I + S)^{-1}``, which is orthogonal (``R = 0`` gives ``I``).
    Computed in float32 (float64 if ``R`` is float64) and returned in ``R``'s dtype.

    Args:
        r: Tensor of shape ``(..., b, b)``.

    Returns:
        Orthogonal ``Q`` with the shape and dtype of ``r``.
    """
    work = torch.float64 if r.dtype == torch.float64 else torch.float32
    flat = r.reshape(-1, r.shape[-2], r.shape[-1]).to(work)
    return _Cayley.apply(flat).reshape(r.shape).to(r.dtype)


class _PermuteRows(torch.autograd.Function):
    """``z[index]`` with the gather ``grad[inverse]`` as backward (index_select's is a slow scatter-add)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return z.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.index_select(0, ctx.saved_tensors[0]), None, None


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


def _group_positions(size: int, width: int, device: torch.device) -> torch.Tensor:
    """Flat positions of block ``k``'s entry ``(a, c)``, i.e. ``(k b + a, k b + c)``, in a width group."""
    k = torch.arange(width // size)[:, None, None] * size
    a = torch.arange(size)
    return ((k + a[:, None]) * width + k + a).reshape(-1).to(device)


def _embedding(n: int, num: int, size: int, m: int, width: int, device: torch.device) -> torch.Tensor:
    """Flat positions ``(m, g b b)`` of each ``Q_i`` entry in a ``width x width`` window of ``B_i``.

    ``B_i[u, v] = D_i[p(u), p(v)]`` with ``p`` the factor's permutation on one window (the same in all
    windows), so block ``k``'s entry ``(a, c)`` lands at ``(p^-1(k b + a), p^-1(k b + c))``.
    """
    inv = torch.argsort(butterfly_permutations(n, num, size, m)[:, :width], dim=1)
    rows = (torch.arange(width // size)[:, None] * size + torch.arange(size)).reshape(-1, size, 1)
    return (inv[:, rows] * width + inv[:, rows.mT]).reshape(m, -1).to(device)


def _group_width(n: int, width: int) -> int:
    """Double ``width`` towards ``_GROUP_WIDTH`` (tiny GEMMs are slow), keeping it a divisor below ``n``."""
    while width < _GROUP_WIDTH and n % (2 * width) == 0 and 2 * width < n:
        width *= 2
    return width


def _fused_width(n: int, size: int, m: int) -> int:
    """Width of ``M``'s diagonal blocks for the fused path (grouped up), or 0 to go factor by factor."""
    width = size * 2 ** (m - 1)
    if width > _MAX_FUSED_WIDTH or width >= n or n % width != 0:
        return 0
    return _group_width(n, width)


@dataclass(frozen=True, eq=False)
class ButterflyPlan:
    """The index tensors of one geometry ``(N, b, m)`` on one device: derived from it alone, never saved.

    Build it once with :func:`make_butterfly_plan` and pass it to :func:`rotate` and friends; without
    one they build it on every call. It holds no state besides these tensors.

    Attributes:
        num, size, m: ``N``, ``b`` and ``m``.
        gathers: ``(for M, for M^T)``: ``m + 1`` gathers each, ``None`` (identity) or ``(index, inverse)``.
        group_positions: Where narrow blocks go when grouped up to a wider bmm (``None``: not grouped).
        embedding: Where each ``Q_i`` entry goes in a fused window (``None``: not built by a chain of bmms).
    """

    num: int
    size: int
    m: int
    gathers: tuple[Gathers, Gathers]
    group_positions: Optional[torch.Tensor]
    embedding: Optional[torch.Tensor]
    device: torch.device

    def check(self, q: torch.Tensor) -> None:
        """Raise ``ValueError`` if ``q`` (``(m, N, b, b)``) is not of this plan's geometry or device."""
        if tuple(q.shape[:3]) != (self.m, self.num, self.size) or q.device != self.device:
            raise ValueError(f"The butterfly plan is for Q of shape {(self.m, self.num, self.size, self.size)} on "
                             f"{self.device}, got {tuple(q.shape)} on {q.device}")


def make_butterfly_plan(num: int, size: int, m: int, device: torch.device | str = "cpu") -> ButterflyPlan:
    """Build the :class:`ButterflyPlan` of ``N = num`` blocks of size ``b = size`` and ``m`` factors.

    The permutations are computed on the CPU (no device synchronisation) and moved to ``device``.
    """
    device, n = torch.device(device), num * size
    perms = on_real_cpu(butterfly_permutations, n, num, size, m)
    gathers = on_real_cpu(lambda: (_gathers(perms), _gathers(perms.flip(0))))  # identity tests read CPU values
    move = lambda gs: tuple(g and (place(g[0], device), place(g[1], device)) for g in gs)  # noqa: E731
    width = _fused_width(n, size, m)
    logger.debug("BOFT n=%d b=%d m=%d: rotation block width %d", n, size, m, width or n)
    group = _group_width(n, size)
    return ButterflyPlan(
        num=num, size=size, m=m, gathers=(move(gathers[0]), move(gathers[1])),
        group_positions=place(on_real_cpu(_group_positions, size, group, "cpu"), device) if group != size else None,
        embedding=(place(on_real_cpu(_embedding, n, num, size, m, width, "cpu"), device)
                   if width and width <= _CHAIN_MAX_WIDTH else None),
        device=device,
    )


def _plan_for(q: torch.Tensor, plan: Optional[ButterflyPlan]) -> ButterflyPlan:
    if plan is None:
        return make_butterfly_plan(q.shape[1], q.shape[2], q.shape[0], q.device)
    plan.check(q)
    return plan


def _grouped(q: torch.Tensor, width: int, positions: Optional[torch.Tensor]) -> torch.Tensor:
    """``(N, b, b)`` blocks regrouped as the same block diagonal in ``(N b / width, width, width)``."""
    num, size, _ = q.shape
    if width == size:
        return q
    flat = q.reshape(num * size // width, -1)
    pos = positions
    return q.new_zeros(flat.shape[0], width * width).index_copy(1, pos, flat).view(-1, width, width)


def _block_matmul(z: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``z blockdiag(blocks)`` for ``z`` ``(T, K w)``: one bmm on the strided ``(K, T, w)`` view, one copy."""
    t, (k, w, _) = z.shape[0], blocks.shape
    return torch.bmm(z.view(t, k, w).transpose(0, 1), blocks).transpose(0, 1).reshape(t, k * w)


def _rotate_by_factors(z: torch.Tensor, q: torch.Tensor, gathers: Gathers,
                       positions: Optional[torch.Tensor]) -> torch.Tensor:
    """``z M`` factor by factor (``m-1`` first) with at most ``m + 1`` gathers and ``m`` bmms.

    Works on ``z^T`` ``(n, T)``: column permutations become contiguous row gathers, and
    ``(z blockdiag(Q))^T = blockdiag(Q^T) z^T`` is a bmm on contiguous ``(K, w, T)`` slabs. Returns a
    ``(T, n)`` view of ``(z M)^T``.
    """
    m, num, size, _ = q.shape
    n, t = num * size, z.shape[0]
    width = _group_width(n, size)
    zt = z.t()
    for step in range(m):
        if gathers[step] is not None:
            zt = _PermuteRows.apply(zt, *gathers[step])
        zt = torch.bmm(_grouped(q[m - 1 - step], width, positions).mT, zt.reshape(n // width, width, t)).view(n, t)
    return (zt if gathers[m] is None else _PermuteRows.apply(zt, *gathers[m])).t()


def _fused_blocks(q: torch.Tensor, width: int, plan: ButterflyPlan) -> torch.Tensor:
    """``M``'s diagonal blocks ``(n / width, width, width)`` for the butterfly permutations.

    Up to ``_CHAIN_MAX_WIDTH``: embed each ``Q_i`` as the windows of ``B_i`` (one ``index_copy``) and
    multiply ``B_{m-1} ... B_0`` (``m - 1`` bmms of ``n width^2``). Wider: rotate the tiled identity
    ``[I ... I]`` (``width x n``) factor by factor; ``M`` being block diagonal, its windows are the blocks.
    """
    m, num, size, _ = q.shape
    windows = num * size // width
    if width <= _CHAIN_MAX_WIDTH:
        pos, flat = plan.embedding, q.reshape(m, windows, -1)
        factors = [q.new_zeros(windows, width * width).index_copy(1, p, f)  # unbind: fake CUDA tensors index
                   for p, f in zip(pos.unbind(0), flat.unbind(0))]      # with an int only on a CUDA build
        blocks = factors[m - 1].view(windows, width, width)
        for i in range(m - 2, -1, -1):
            blocks = torch.bmm(blocks, factors[i].view(windows, width, width))
        return blocks
    tile_t = torch.eye(width, dtype=q.dtype, device=q.device).repeat(windows, 1)  # (n, width)
    blocks_t = _rotate_by_factors(tile_t.t(), q, plan.gathers[0], plan.group_positions).t()
    return blocks_t.reshape(windows, width, width).mT


def _apply(x: torch.Tensor, q: torch.Tensor, perms: torch.Tensor | None, transpose: bool,
           plan: Optional[ButterflyPlan]) -> torch.Tensor:
    if q.dim() != 4 or q.shape[-1] != q.shape[-2]:
        raise ValueError(f"Q must have shape (m, N, b, b), got {tuple(q.shape)}.")
    m, num, size, _ = q.shape
    n = num * size
    if x.shape[-1] != n:
        raise ValueError(f"x has {x.shape[-1]} features but Q describes n = N * b = {n}.")
    if perms is not None and perms.shape != (m, n):
        raise ValueError(f"perms must have shape {(m, n)} to match Q, got {tuple(perms.shape)}.")
    z = x.reshape(-1, n)
    width = _fused_width(n, size, m) if perms is None else 0
    if perms is None:
        plan = _plan_for(q, plan)
    if width:
        blocks = _fused_blocks(q, width, plan).to(x.dtype)
        return _block_matmul(z, blocks.mT if transpose else blocks).view(x.shape)
    if perms is None:
        gathers, positions = plan.gathers[int(transpose)], plan.group_positions
    else:
        gathers = _gathers(perms.flip(0) if transpose else perms)
        width = _group_width(n, size)
        positions = _group_positions(size, width, x.device) if width != size else None
    # M^T = B_0^T ... B_{m-1}^T: the same algorithm with the factors reversed and the blocks transposed.
    q = q.flip(0).mT if transpose else q
    return _rotate_by_factors(z, q.to(x.dtype), gathers, positions).reshape(x.shape)


def rotate(x: torch.Tensor, q: torch.Tensor, perms: torch.Tensor | None = None,
           plan: Optional[ButterflyPlan] = None) -> torch.Tensor:
    """Rotate row vectors: ``x M`` with ``M = B_{m-1} ... B_0`` and ``B_i = P_i blockdiag(Q_i) P_i^T``.

    Never builds an ``n x n`` matrix; differentiable with plain autograd. Paths:

    * ``perms=None`` (BOFT) and ``L = b 2**(m-1) <= 256``, ``L < n``: build ``M``'s ``(n/L, L, L)``
      diagonal blocks from ``Q`` and apply them with one bmm (``O(T n L)`` in a fast GEMM).
    * Otherwise factor by factor, ``m-1`` first: ``z P_i`` (gather with ``perm_i^-1``), ``z blockdiag(Q_i)``
      (bmm), ``z P_i^T`` (gather with ``perm_i``), neighbouring gathers merged, identities skipped.

    Args:
        x: Input ``(..., n)``: any rank and layout, any number of rows (0 included).
        q: Orthogonal blocks ``(m, N, b, b)``, usually ``cayley(boft_R)``; cast to ``x.dtype``.
        perms: ``(m, n)`` permutations; ``None`` (fast) means the standard butterfly ones.
        plan: The standard permutations' :class:`ButterflyPlan` for ``q``'s geometry and device (built
            here when ``None``; a layer keeps its own).

    Returns:
        ``x M``, shaped and typed like ``x`` (possibly a non-contiguous view).
    """
    return _apply(x, q, perms, transpose=False, plan=plan)


def rotate_per_sample(x: torch.Tensor, qs: list[torch.Tensor], slots: torch.Tensor,
                      plans: Optional[Sequence[ButterflyPlan]] = None) -> torch.Tensor:
    """Mixed-adapter batch: sample ``s`` of ``x`` rotated by adapter ``slots[s]`` (``len(qs)``: unrotated).

    When the adapters share one geometry and :func:`rotate` would use fused diagonal blocks, each
    adapter's blocks are built once, stacked with identity blocks for unrotated samples, and the whole
    batch is rotated by one bmm over ``samples x blocks``: the cost does not grow with the number of
    adapters. Otherwise each adapter's samples are rotated apart (one :func:`rotate` per adapter).

    Args:
        x: input ``(S, ..., n)``; dimension 0 indexes samples.
        qs: one ``(m, N, b, b)`` block tensor per adapter.
        slots: int64 ``(S,)``, on ``x``'s device.
        plans: One :class:`ButterflyPlan` per adapter (built here when ``None``).

    Returns:
        Tensor shaped and typed like ``x``.
    """
    plans = [_plan_for(q, None if plans is None else plans[k]) for k, q in enumerate(qs)]
    n = x.shape[-1]
    shapes = {tuple(q.shape) for q in qs}
    if len(shapes) == 1:
        m, num, size, _ = qs[0].shape
        width = _fused_width(n, size, m) if num * size == n else 0
        if width:
            windows, samples = n // width, x.shape[0]
            blocks = [_fused_blocks(q, width, plan).to(x.dtype) for q, plan in zip(qs, plans)]
            eye = torch.eye(width, dtype=x.dtype, device=x.device).expand(windows, width, width)
            per_sample = torch.stack(blocks + [eye]).index_select(0, slots)  # (S, windows, w, w)
            z = x.reshape(samples, -1, windows, width).transpose(1, 2)  # (S, windows, T, w)
            out = torch.matmul(z, per_sample)
            return out.transpose(1, 2).reshape(x.shape)
    out = x.clone()
    for k, q in enumerate(qs):
        index = (slots == k).nonzero().flatten()
        if index.numel():
            out = out.index_copy(0, index, rotate(x.index_select(0, index), q, plan=plans[k]))
    return out


def rotate_transpose(x: torch.Tensor, q: torch.Tensor, perms: torch.Tensor | None = None,
                     plan: Optional[ButterflyPlan] = None) -> torch.Tensor:
    """``x M^T`` (the inverse rotation); arguments and cost as :func:`rotate`.

    Merging: ``W' = diag(s) W M^T = s * rotate_transpose(W, Q)``; unmerging: ``W = rotate(W', Q) / s``.
    """
    return _apply(x, q, perms, transpose=True, plan=plan)


def dense_rotation(q: torch.Tensor, perms: torch.Tensor | None = None,
                   plan: Optional[ButterflyPlan] = None) -> torch.Tensor:
    """The ``(n, n)`` matrix ``M`` (PEFT's ``get_delta_weight``; the only place it is built).

    Args:
        q: Blocks ``(m, N, b, b)``.
        perms: ``(m, n)`` permutations; ``None`` means the standard butterfly ones.
        plan: As for :func:`rotate`.

    Returns:
        Contiguous ``M`` in ``q``'s dtype, ``rotate(x, q, perms) == x @ M``; ``blockdiag(Q_0)`` if ``m = 1``.
    """
    eye = torch.eye(q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
    return _apply(eye, q, perms, transpose=False, plan=plan).contiguous()


class _ScaleShift(torch.autograd.Function):
    """``(y - b) s + b`` in one pass; backward reads ``G`` and ``y`` once (row chunks stay in cache)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(y, s, bias)
        return y * s if bias is None else torch.addcmul(bias - bias * s, y, s)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        y, s, bias = ctx.saved_tensors
        g, y2 = grad.reshape(-1, s.shape[-1]), y.reshape(-1, s.shape[-1])
        need_y, need_s, need_b = ctx.needs_input_grad
        grad_y = torch.empty_like(g) if need_y else None
        dot, total = torch.zeros_like(s), torch.zeros_like(s)
        step = max(1, _SCALE_CHUNK // s.shape[-1]) if g.device.type == "cpu" else max(1, g.shape[0])
        for i in range(0, g.shape[0], step):
            chunk = g[i : i + step]
            if need_y:
                torch.mul(chunk, s, out=grad_y[i : i + step])
            if need_s:
                dot += (chunk * y2[i : i + step]).sum(0)
            if bias is not None:
                total += chunk.sum(0)
        grad_s = (dot if bias is None else dot - bias * total) if need_s else None
        grad_b = total * (1 - s) if need_b else None
        return (grad_y.view(grad.shape) if need_y else None), grad_s, grad_b


def scale_output(y: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """BOFT's output scale ``(y - b) * s + b`` (``y * s`` without bias), cheaper than the three ops.

    One pass forward; backward ``dy = G s``, ``ds = sum_rows G (y - b)``, ``db = (1 - s) sum_rows G``,
    computed over row chunks so ``G`` and ``y`` are read from memory once. Saves ``y`` (the base
    output) for backward, as the plain formula saves ``y - b``. Not twice differentiable.

    Args:
        y: Base layer output ``(..., out)`` (bias included).
        s: Scale ``(out,)`` in ``y``'s dtype.
        bias: The base layer's bias ``(out,)`` or ``None``.

    Returns:
        Tensor like ``y``.
    """
    return _ScaleShift.apply(y, s, bias)


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
    is and no random number is drawn.

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
    factor = int(torch.randint(0, m, (1,), generator=generator).item())
    k, frac = divmod(p * num, 1.0)
    k = int(k)
    order = torch.randperm(num, generator=generator)
    if frac > 1e-9 and float(torch.rand((), generator=generator)) < frac:
        k += 1
    # PEFT shuffles the mask [1]*k + [0]*(N-k) with this order: block j is dropped iff order[j] < k.
    mask = torch.zeros(m, num, 1, 1, dtype=torch.bool)
    mask[factor, :, 0, 0] = order < k
    eye = torch.eye(size, dtype=q.dtype, device=q.device)
    return torch.where(mask.to(q.device), eye, q)
