r"""The BOFT op: ``x M`` (or ``x M^T``) from ``boft_R`` in one call, one decision per call, no hidden state.

:func:`butterfly_rotate` is the only entry a layer's forward uses. It takes ``Q = cayley(R)``
(:mod:`.butterfly_blocks`), reused only inside :func:`~fourierft.ops.scope.cached_merged_weights`, applies the
multiplicative dropout when asked, and lets :func:`~fourierft.ops.butterfly_routes.choose_rotation` pick the
path (``"fused"``, ``"factors"`` or ``"dense"``, :mod:`.butterfly_paths`) from the device, token count and
geometry. Nothing is stored on the layer, and nothing reads a tensor value back to the host.

Notation: ``n`` features, ``N`` blocks of size ``b`` (``N b = n``), ``m`` butterfly factors,
``B_i = P_i blockdiag(Q_i) P_i^T`` and ``M = B_{m-1} ... B_1 B_0``; the adapter computes ``x M`` on row vectors
(PEFT: ``base(x @ M)``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .butterfly_blocks import cayley, multiplicative_dropout
from .butterfly_paths import dense_matrix_t, fused_blocks, rotate_by_factors, rotate_dense, rotate_fused
from .butterfly_plan import ButterflyPlan, make_butterfly_plan, permutation_plan
from .butterfly_routes import choose_rotation
from .scope import active_scope, scope_key

__all__ = ["butterfly_rotate", "dense_rotation", "rotate", "rotate_per_sample", "rotate_transpose",
           "rotation_blocks"]

_PATHS = {"fused": rotate_fused, "factors": rotate_by_factors, "dense": rotate_dense}


def rotation_blocks(r: torch.Tensor, *, dropout: float = 0.0) -> torch.Tensor:
    """``Q = cayley(R)`` ``(m, N, b, b)``, with multiplicative dropout ``p = dropout`` when it is non-zero.

    Inside :func:`~fourierft.ops.scope.cached_merged_weights` the inversion runs once per ``R`` and version;
    later calls reuse its value, with the gradient to ``R`` still attached when one is needed. Outside the
    scope (and while ``torch.compile`` traces) it runs on every call.
    """
    scope = active_scope()
    key = None if scope is None else scope_key(r)
    q = None
    if key is not None:
        entry = scope.get(("boft", key[0]))
        if entry is not None and entry[0] == key[1]:
            q = cayley(r, known=entry[2]) if torch.is_grad_enabled() and r.requires_grad else entry[2]
    if q is None:
        q = cayley(r)
        if key is not None:
            scope[("boft", key[0])] = (key[1], r, q.detach())  # holding r keeps its id unique
    return multiplicative_dropout(q, dropout, True) if dropout > 0 else q


def _plan_for(q: torch.Tensor, plan: Optional[ButterflyPlan]) -> ButterflyPlan:
    if q.dim() != 4 or q.shape[-1] != q.shape[-2]:
        raise ValueError(f"Q must have shape (m, N, b, b), got {tuple(q.shape)}.")
    if plan is None:
        return make_butterfly_plan(q.shape[1], q.shape[2], q.shape[0], q.device)
    plan.check(q)
    return plan


def _route(x: torch.Tensor, q: torch.Tensor, plan: ButterflyPlan, tokens: int, route: str | None) -> str:
    grad = torch.is_grad_enabled() and (x.requires_grad or q.requires_grad)
    return choose_rotation(x.device, tokens=tokens, n=plan.n, block_size=plan.size, m=plan.m, width=plan.width,
                           group=plan.group, grad=grad, dtype=x.dtype, route=route)


def _rotate(x: torch.Tensor, q: torch.Tensor, plan: Optional[ButterflyPlan], transpose: bool,
            route: str | None) -> torch.Tensor:
    plan = _plan_for(q, plan)
    if x.shape[-1] != plan.n:
        raise ValueError(f"x has {x.shape[-1]} features but Q describes n = N * b = {plan.n}.")
    z = x.reshape(-1, plan.n)
    chosen = _route(x, q, plan, z.shape[0], route)
    return _PATHS[chosen](z, q, plan, transpose).reshape(x.shape)


def butterfly_rotate(x: torch.Tensor, r: torch.Tensor, plan: ButterflyPlan, *, transpose: bool = False,
                     dropout: float = 0.0, route: str | None = None) -> torch.Tensor:
    """``x M`` (``x M^T`` if ``transpose``) with ``M`` built from ``R = boft_R``: BOFT's rotation in one call.

    Differentiable in ``x`` and ``R``; never builds an ``n x n`` matrix unless the ``"dense"`` path is the
    cheapest (small ``n``, many tokens) or forced.

    Args:
        x: Input ``(..., n)``: any rank and layout, any number of rows (0 included).
        r: ``boft_R`` ``(m, N, b, b)``; ``Q = cayley(R)`` is computed in float32 (or float64) and cast to
            ``x``'s dtype where it meets ``x``.
        plan: The geometry's :class:`~fourierft.ops.butterfly_plan.ButterflyPlan` on ``r``'s device.
        transpose: Apply ``M^T`` (merging a weight) instead of ``M``.
        dropout: Multiplicative dropout probability; pass 0 outside training.
        route: Force a path (tests, benchmarks); default: the cheapest modelled one.

    Returns:
        Tensor shaped and typed like ``x`` (possibly a non-contiguous view).

    Raises:
        ValueError: On shapes that do not fit the plan, or a forced path that does not apply.
    """
    return _rotate(x, rotation_blocks(r, dropout=dropout), plan, transpose, route)


def rotate(x: torch.Tensor, q: torch.Tensor, plan: Optional[ButterflyPlan] = None, *,
           route: str | None = None) -> torch.Tensor:
    """``x M`` from given blocks ``Q`` ``(m, N, b, b)`` (e.g. ``cayley(boft_R)``); see :func:`butterfly_rotate`.

    ``plan`` defaults to the standard butterfly permutations of ``Q``'s geometry (built on every call: a
    layer keeps its own); :func:`~fourierft.ops.butterfly_plan.permutation_plan` gives arbitrary ones.
    """
    return _rotate(x, q, plan, False, route)


def rotate_transpose(x: torch.Tensor, q: torch.Tensor, plan: Optional[ButterflyPlan] = None, *,
                     route: str | None = None) -> torch.Tensor:
    """``x M^T`` (the inverse rotation); arguments as :func:`rotate`.

    Merging: ``W' = diag(s) W M^T = s * rotate_transpose(W, Q)``; unmerging: ``W = rotate(W', Q) / s``.
    """
    return _rotate(x, q, plan, True, route)


def dense_rotation(q: torch.Tensor, perms: torch.Tensor | None = None,
                   plan: Optional[ButterflyPlan] = None) -> torch.Tensor:
    """The ``(n, n)`` matrix ``M`` (PEFT's ``get_delta_weight``): the identity rotated factor by factor.

    Args:
        q: Blocks ``(m, N, b, b)``.
        perms: ``(m, n)`` arbitrary permutations (figures, tests); ``None`` means the standard butterfly ones.
        plan: As for :func:`rotate` (ignored when ``perms`` is given).

    Returns:
        Contiguous ``M`` in ``q``'s dtype, ``rotate(x, q, plan) == x @ M``; ``blockdiag(Q_0)`` if ``m = 1``.
    """
    plan = permutation_plan(perms, q.shape[-1], q.device) if perms is not None else _plan_for(q, plan)
    return dense_matrix_t(q, plan).t().contiguous()


def rotate_per_sample(x: torch.Tensor, qs: list[torch.Tensor], slots: torch.Tensor,
                      plans: Optional[Sequence[ButterflyPlan]] = None) -> torch.Tensor:
    """Mixed-adapter batch: sample ``s`` of ``x`` rotated by adapter ``slots[s]`` (``len(qs)``: unrotated).

    When the adapters share one geometry and the rule picks the fused path, each adapter's blocks are
    built once, stacked with identity blocks for unrotated samples, and the whole batch is rotated by one
    bmm over ``samples x blocks``: the cost does not grow with the number of adapters. Otherwise every
    adapter rotates the batch and each sample keeps its adapter's result (no index is read to the host).

    Args:
        x: input ``(S, ..., n)``; dimension 0 indexes samples.
        qs: one ``(m, N, b, b)`` block tensor per adapter.
        slots: int64 ``(S,)``, on ``x``'s device.
        plans: One :class:`~fourierft.ops.butterfly_plan.ButterflyPlan` per adapter (built here when ``None``).

    Returns:
        Tensor shaped and typed like ``x``.
    """
    plans = [_plan_for(q, None if plans is None else plans[k]) for k, q in enumerate(qs)]
    n, samples = x.shape[-1], x.shape[0]
    if len({tuple(q.shape) for q in qs}) == 1 and plans[0].n == n and \
            _route(x, qs[0], plans[0], x.numel() // max(n, 1), None) == "fused":
        width = plans[0].width
        windows = n // width
        blocks = [fused_blocks(q, plan).to(x.dtype) for q, plan in zip(qs, plans)]
        eye = torch.eye(width, dtype=x.dtype, device=x.device).expand(windows, width, width)
        per_sample = torch.stack(blocks + [eye]).index_select(0, slots)  # (S, windows, w, w)
        z = x.reshape(samples, -1, windows, width).transpose(1, 2)  # (S, windows, T, w)
        return torch.matmul(z, per_sample).transpose(1, 2).reshape(x.shape)
    out = x
    for k, (q, plan) in enumerate(zip(qs, plans)):
        mine = (slots == k).view(-1, *([1] * (x.dim() - 1)))
        out = torch.where(mine, _rotate(x, q, plan, False, None), out)
    return out
