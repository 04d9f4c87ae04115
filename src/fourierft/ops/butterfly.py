"""Pure tensor functions for BOFT (orthogonal butterfly fine-tuning).

Notation (``n`` features, ``N`` blocks of size ``b``, ``N * b = n``, ``m`` butterfly factors):

* ``R`` of shape ``(m, N, b, b)`` is the trainable ``boft_R``; ``Q = cayley(R)`` is orthogonal per block.
* ``perms`` of shape ``(m, n)``: ``perms[i]`` is the block-butterfly permutation of factor ``i``
  (row 0 is the identity). ``P_i[j, perms[i, j]] = 1``, so ``(P_i x)[j] = x[perms[i, j]]``.
* Factor ``B_i = P_i blockdiag(Q_i) P_i^T`` and rotation ``M = B_{m-1} ... B_1 B_0``.
* The adapter multiplies row vectors: ``rotate(x) = x M`` (PEFT computes ``base(x @ M)``).

Structure used for speed: for butterfly permutations, factor ``i`` only couples positions inside
aligned chunks of ``b * 2**i`` features, so ``M`` is block diagonal with blocks of width
``L = b * 2**(m - 1)``. When ``L`` is small, ``rotate`` builds those ``(n / L, L, L)`` blocks
(never an ``n x n`` matrix) and applies them with one batched matmul; otherwise it applies the
factors one by one with gathers and ``(N, b, b)`` batched matmuls.
"""

from __future__ import annotations

import logging
import functools

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "block_geometry",
    "block_butterfly_perm",
    "butterfly_permutations",
    "cayley",
    "rotate",
    "rotate_transpose",
    "dense_rotation",
    "multiplicative_dropout",
]

# Widest diagonal block of M that `rotate` builds explicitly; wider rotations go factor by factor.
_MAX_FUSED_WIDTH = 256
# Preferred matmul width: tiny blocks are grouped up to this width (measured fastest on CPU GEMM).
_GROUP_WIDTH = 32
# Fused blocks up to this width are built as a chain of bmms, wider ones factor by factor.
_CHAIN_MAX_WIDTH = 64
# Below this block size, batched LAPACK inversion is fast; above it, `_inverse` recurses.
_LAPACK_INV_MAX = 7


# ----------------------------------------------------------------------------------------------
# Geometry and permutations
# ----------------------------------------------------------------------------------------------
def _valid_block_sizes(n: int, m: int) -> list[int]:
    """Block sizes ``b`` with ``n % b == 0`` that satisfy the butterfly constraints for ``m``."""
    sizes = [s for s in range(1, n + 1) if n % s == 0]
    if m > 1:
        sizes = [s for s in sizes if s % 2 == 0 and (n // s) % 2 ** (m - 1) == 0]
    return sizes


def block_geometry(n: int, block_size: int, block_num: int, n_butterfly_factor: int) -> tuple[int, int]:
    """Validate and complete a BOFT block geometry.

    Exactly one of ``block_size`` / ``block_num`` may be 0; the other is derived from ``n``.
    Both non-zero is accepted when ``block_size * block_num == n``.

    With ``m = n_butterfly_factor > 1`` the permutations need ``b`` even (factors pair half blocks of
    ``b / 2``) and ``N % 2**(m-1) == 0`` (factor ``i`` works on chunks of ``2**i`` whole blocks).
    PEFT's remaining checks (``m-1 <= log2 N``, ``n % (b * 2**(m-1)) == 0``, ``N`` even) follow from
    these two.

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

    The vector is cut into ``b`` chunks of ``c = n // b``; each chunk into ``c / r`` sub-blocks of
    length ``r``, which are reordered even-indexed first, then odd-indexed:
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


# ----------------------------------------------------------------------------------------------
# Cayley transform
# ----------------------------------------------------------------------------------------------
def _inverse(a: torch.Tensor) -> torch.Tensor:
    """Batched inverse of ``I + S`` (``S`` skew) by 2x2 block Schur recursion.

    Batched LAPACK inversion is fast for blocks below 8 and slow (per-matrix calls) above, so
    larger blocks are split: with ``A = [[P, U], [V, W]]`` and Schur complement
    ``Z = W - V P^-1 U``, ``A^-1 = [[P^-1 + P^-1 U Z^-1 V P^-1, -P^-1 U Z^-1], [-Z^-1 V P^-1, Z^-1]]``.
    ``P`` and ``Z`` keep a positive definite symmetric part, so no pivoting is needed.
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


# ----------------------------------------------------------------------------------------------
# Applying the rotation
# ----------------------------------------------------------------------------------------------
def _block_matmul(z: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``z @ blockdiag(blocks)`` for ``z`` of shape ``(T, K * w)`` and ``blocks`` ``(K, w, w)``.

    One bmm over ``z`` viewed ``(K, T, w)`` (a strided view, no copy) and one copy back to ``(T, n)``.
    """
    t = z.shape[0]
    k, w, _ = blocks.shape
    return torch.bmm(z.view(t, k, w).transpose(0, 1), blocks).transpose(0, 1).reshape(t, k * w)


class _PermuteColumns(torch.autograd.Function):
    """``z[:, index]`` whose backward is the gather ``grad[:, inverse]`` (``index_select``'s own
    backward is a scatter-add, several times slower)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return z.index_select(1, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


Plan = tuple  # m + 1 entries: None (identity) or (index, inverse index)


def _gather_plan(perms: torch.Tensor) -> Plan:
    """Column gathers for ``z M``: before factors ``m-1, ..., 0`` and after factor 0 (``m + 1`` entries).

    ``z B_i = ((z P_i) blockdiag(Q_i)) P_i^T`` with ``z P_i = z[:, inv_i]`` and ``z P_i^T = z[:, perm_i]``.
    Consecutive ``P_i^T`` and ``P_{i-1}`` merge into the single gather ``perm_i[inv_{i-1}]``; identity
    gathers become ``None``.
    """
    m, n = perms.shape
    inv = torch.argsort(perms, dim=1)
    ident = torch.arange(n, device=perms.device)
    plan = [inv[m - 1]] + [perms[i][inv[i - 1]] for i in range(m - 1, 0, -1)] + [perms[0]]
    return tuple(None if torch.equal(g, ident) else (g, torch.argsort(g)) for g in plan)


def _rotate_by_factors(z: torch.Tensor, q: torch.Tensor, plan: Plan) -> torch.Tensor:
    """``z M`` for ``z`` of shape ``(T, n)``, factor ``m-1`` first: at most ``m + 1`` gathers, ``m`` bmms."""
    m = q.shape[0]
    for step in range(m):
        if plan[step] is not None:
            z = _PermuteColumns.apply(z, *plan[step])
        z = _block_matmul(z, q[m - 1 - step])
    return z if plan[m] is None else _PermuteColumns.apply(z, *plan[m])


def _memo(fn):
    """``functools.lru_cache`` that torch.compile can see through.

    Dynamo ignores ``lru_cache`` and traces the wrapped function on every call (graph breaks at
    ``_gather_plan``'s data-dependent checks); a hit in a plain dict is a constant lookup for it.
    """
    cache: dict = {}

    @functools.wraps(fn)
    def wrapper(*args):
        key = tuple(str(a) if isinstance(a, torch.device) else a for a in args)
        if key not in cache:
            cache[key] = fn(*args)
        return cache[key]

    wrapper.cache_clear = cache.clear
    return wrapper


@_memo
def _butterfly_plan(n: int, num: int, size: int, m: int, device: torch.device):
    """Cached gather plans ``(for M, for M^T)`` of the standard butterfly permutations (built on CPU)."""
    perms = butterfly_permutations(n, num, size, m)

    def move(plan: Plan) -> Plan:
        return tuple(None if g is None else (g[0].to(device), g[1].to(device)) for g in plan)

    return move(_gather_plan(perms)), move(_gather_plan(perms.flip(0)))


@_memo
def _embedding(n: int, num: int, size: int, m: int, width: int, device: torch.device) -> torch.Tensor:
    """Flat positions ``(m, g b b)`` of each ``Q_i`` entry inside a ``width x width`` window of ``B_i``.

    ``B_i[u, v] = D_i[p(u), p(v)]`` (``p`` = the factor's permutation restricted to one window, the same
    for all windows), so block ``k`` entry ``(a, c)`` lands at ``(p^-1(k b + a), p^-1(k b + c))``.
    """
    perms = butterfly_permutations(n, num, size, m)[:, :width]
    inv = torch.argsort(perms, dim=1)  # (m, width)
    rows = (torch.arange(width // size)[:, None] * size + torch.arange(size)).reshape(-1, size, 1)
    cols = rows.transpose(1, 2)
    pos = inv[:, rows] * width + inv[:, cols]  # (m, g, b, b)
    return pos.reshape(m, -1).to(device)


def _fused_width(n: int, size: int, m: int) -> int:
    """Matmul width for the fused path, or 0 when it does not apply.

    ``M`` is block diagonal with width ``L = b 2**(m-1)``; any multiple of ``L`` dividing ``n`` works.
    Small ``L`` is grouped up to ``_GROUP_WIDTH`` (faster GEMM). The width stays below ``n``, so no
    ``n x n`` tensor is ever built.
    """
    width = size * 2 ** (m - 1)
    if width > _MAX_FUSED_WIDTH or width >= n or n % width != 0:
        return 0
    while width < _GROUP_WIDTH and n % (2 * width) == 0 and 2 * width < n:
        width *= 2
    return width


def prepare(num: int, size: int, m: int, device: torch.device | str) -> None:
    """Build the cached permutation plans of a geometry on ``device`` now, outside any torch.compile trace."""
    device, n = torch.device(device), num * size
    _butterfly_plan(n, num, size, m, device)
    width = _fused_width(n, size, m)
    if width and width <= _CHAIN_MAX_WIDTH:
        _embedding(n, num, size, m, width, device)


def _fused_blocks(q: torch.Tensor, width: int) -> torch.Tensor:
    """Diagonal blocks ``(n / width, width, width)`` of ``M`` for the butterfly permutations.

    Narrow windows: embed each ``Q_i`` as ``B_i`` windows (one ``index_copy``) and multiply the chain
    ``B_{m-1} ... B_0`` (``m - 1`` bmms of ``n width^2``). Wide windows: rotate a tiled identity
    ``[I I ... I]`` (``width x n``) factor by factor (``n width b`` per factor); as ``M`` is block
    diagonal with this width, the rows of the result are the blocks.
    """
    m, num, size, _ = q.shape
    n, windows = num * size, num * size // width
    if width <= _CHAIN_MAX_WIDTH:
        pos = _embedding(n, num, size, m, width, q.device)
        flat = q.reshape(m, windows, -1)
        factors = [q.new_zeros(windows, width * width).index_copy(1, pos[i], flat[i]) for i in range(m)]
        blocks = factors[m - 1].view(windows, width, width)
        for i in range(m - 2, -1, -1):
            blocks = torch.bmm(blocks, factors[i].view(windows, width, width))
        return blocks
    tile = torch.eye(width, dtype=q.dtype, device=q.device).repeat(1, windows)
    blocks = _rotate_by_factors(tile, q, _butterfly_plan(n, num, size, m, q.device)[0])
    return blocks.view(width, windows, width).transpose(0, 1).contiguous()  # strided bmm operands are slow


def _apply(x: torch.Tensor, q: torch.Tensor, perms: torch.Tensor | None, transpose: bool) -> torch.Tensor:
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
    if width:
        blocks = _fused_blocks(q, width).to(x.dtype)
        return _block_matmul(z, blocks.mT if transpose else blocks).view(x.shape)
    # M^T = B_0^T ... B_{m-1}^T: the same algorithm with the factors reversed and blocks transposed.
    if perms is None:
        plan = _butterfly_plan(n, num, size, m, x.device)[int(transpose)]
    else:
        plan = _gather_plan(perms.flip(0) if transpose else perms)
    q = q.flip(0).mT if transpose else q
    return _rotate_by_factors(z, q.to(x.dtype), plan).view(x.shape)


def rotate(x: torch.Tensor, q: torch.Tensor, perms: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate row vectors: ``x M`` with ``M = B_{m-1} ... B_0``, ``B_i = P_i blockdiag(Q_i) P_i^T``.

    Never builds an ``n x n`` matrix. Differentiable with plain autograd (gathers and bmms).

    * ``perms=None`` (the BOFT case): the standard butterfly permutations of ``Q``'s geometry.
      When ``L = b 2**(m-1) <= 256`` (and ``L < n``), ``M``'s ``(n/L, L, L)`` diagonal blocks are
      built from ``Q`` and applied with one batched matmul (cost ``O(T n L)``, fast GEMM).
    * Otherwise factor by factor, ``m-1`` first: ``z <- z P_i`` (a gather with ``perm_i^{-1}``),
      ``z <- z blockdiag(Q_i)`` (bmm of ``z`` viewed ``(T, N, b)``), ``z <- z P_i^T`` (a gather with
      ``perm_i``); neighbouring gathers are merged and identities skipped: ``m`` gathers, ``m`` bmms.

    Args:
        x: Input of shape ``(..., n)``; any rank, layout, and number of rows (including 0).
        q: Orthogonal blocks of shape ``(m, N, b, b)`` (``cayley(boft_R)``); cast to ``x.dtype``.
        perms: Optional ``(m, n)`` permutations (explicit ones take the factor-by-factor path).

    Returns:
        ``x M`` with the shape and dtype of ``x``.
    """
    return _apply(x, q, perms, transpose=False)


def rotate_transpose(x: torch.Tensor, q: torch.Tensor, perms: torch.Tensor | None = None) -> torch.Tensor:
    """``x M^T`` (the inverse rotation), same arguments and cost as :func:`rotate`.

    ``M^T = B_0^T ... B_{m-1}^T`` with ``B_i^T = P_i blockdiag(Q_i^T) P_i^T``. Merging uses it:
    ``W' = diag(s) W M^T = diag(s) rotate_transpose(W, Q)``; unmerging is ``rotate(W', Q) / s``.
    """
    return _apply(x, q, perms, transpose=True)


def dense_rotation(q: torch.Tensor, perms: torch.Tensor | None = None) -> torch.Tensor:
    """The ``(n, n)`` rotation ``M = B_{m-1} ... B_0`` (for merging and tests only).

    Args:
        q: Blocks ``(m, N, b, b)``.
        perms: ``(m, n)`` permutations; ``None`` means the standard butterfly ones.

    Returns:
        ``M`` in ``q``'s dtype; ``rotate(x, q, perms) == x @ M``. For ``m = 1``, ``blockdiag(Q_0)``.
    """
    eye = torch.eye(q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
    return _apply(eye, q, perms, transpose=False)


# ----------------------------------------------------------------------------------------------
# Multiplicative dropout
# ----------------------------------------------------------------------------------------------
def multiplicative_dropout(
    q: torch.Tensor, p: float, training: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """BOFT multiplicative dropout on the Cayley blocks, with PEFT's exact semantics.

    In training with ``p > 0``: one factor ``f = torch.randint(0, m)`` is drawn, then
    ``k = int(p * N)`` of its blocks (the first ``k`` of ``torch.randperm(N)``... as a shuffled mask)
    are replaced by the identity; other factors are untouched. ``int`` floors, so ``p * N < 1``
    drops nothing. Random numbers come from the CPU ``generator`` (default: the global RNG) in
    PEFT's order, ``randint`` then ``randperm``, so equal seeds give PEFT's result. Otherwise
    (eval or ``p == 0``) ``q`` is returned unchanged and no random number is drawn.

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
    k = int(p * num)
    order = torch.randperm(num, generator=generator)
    # PEFT shuffles the mask [1]*k + [0]*(N-k) with this order: block j is dropped iff order[j] < k.
    mask = torch.zeros(m, num, 1, 1, dtype=torch.bool)
    mask[factor, :, 0, 0] = order < k
    eye = torch.eye(size, dtype=q.dtype, device=q.device)
    return torch.where(mask.to(q.device), eye, q)
