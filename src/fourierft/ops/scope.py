"""The explicit scope in which adapter layers reuse what they derive from their parameters.

FourierFT's op builds ``W + dW`` (or ``dW``) and BOFT's op computes ``Q = cayley(R)``; outside the scope both are
recomputed on every call, and no layer keeps them. Inside :func:`cached_merged_weights` each is computed
once per exact tensor and version and reused, as ``torch.nn.utils.parametrize.cached()`` reuses a
parametrized weight; leaving the scope frees everything.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager

import torch

__all__ = ["active_scope", "cached_merged_weights", "scope_key"]

_SCOPE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fourierft_merged_weights", default=None)


@contextmanager
def cached_merged_weights():
    """Reuse each adapter layer's derived weights within the block; leaving it frees them.

    Like ``torch.nn.utils.parametrize.cached()``: inside, a FourierFT layer builds ``W + dW`` (route
    ``"merged"``) or ``dW`` (route ``"dense"``) once, and a BOFT layer computes its orthogonal blocks
    ``Q = cayley(R)`` once; later
    forwards (gradient-accumulation micro-batches, checkpoint recomputation, repeated inference or generation)
    use them, with gradients still flowing to the parameters. An entry belongs to the exact tensors and their
    version counters, so an in-place update (an optimizer step, ``load_state_dict``) makes the next forward
    compute a new one; writes through ``.data`` bypass version counters, so don't make them inside the block.
    Without gradients, FourierFT layers inside the block count ``W + dW`` as free when they pick their route.
    :class:`~fourierft.AdapterTrainer` opens it around the micro-batches of each optimizer step.

    Example::

        with fourierft.cached_merged_weights():
            for batch in micro_batches:
                model(**batch).loss.backward()
        optimizer.step()
    """
    token = _SCOPE.set({})
    try:
        yield
    finally:
        _SCOPE.get().clear()
        _SCOPE.reset(token)


def active_scope() -> dict | None:
    """The open scope's entries, or ``None`` outside one and while ``torch.compile`` traces (Dynamo cannot read
    context variables; a compiled graph recomputes instead)."""
    return None if torch.compiler.is_compiling() else _SCOPE.get()


def scope_key(*tensors: torch.Tensor) -> tuple | None:
    """``(ids, versions)`` of the tensors an entry belongs to; ``None`` for inference tensors, which have no
    version counter and are never reused. The entry must hold the tensors, so their ids stay unique."""
    if any(t.is_inference() for t in tensors):
        return None
    # Private API: ``Tensor._version`` is the only way to see an in-place change (optimizer step,
    # load_state_dict); torch has no public version counter. tests/test_private_api.py checks it.
    return tuple(id(t) for t in tensors), tuple(t._version for t in tensors)
