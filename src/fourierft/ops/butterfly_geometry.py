"""BOFT's block geometry and block-butterfly permutations: functions of the layer width and the config alone.

``n`` features in ``N`` blocks of size ``b`` (``N b = n``), ``m`` butterfly factors. Factor ``i`` permutes
with ``P_i``, ``(P_i x)[j] = x[perms[i, j]]``; ``P_0`` is the identity (DESIGN.md section 4).
"""

from __future__ import annotations

import torch

__all__ = ["block_geometry", "block_butterfly_perm", "butterfly_permutations"]


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
