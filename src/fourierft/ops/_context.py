"""One helper for the ops' context variables (forced routes, route records): set for a block, then reset."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Sequence, TypeVar

T = TypeVar("T")


@contextmanager
def bound(var: ContextVar, value: T) -> Iterator[T]:
    """Inside the block ``var`` holds ``value``; on exit (also on an error) it holds what it held before."""
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)


def forcing(var: ContextVar, route: str, routes: Sequence[str], what: str):
    """``bound(var, route)`` after checking that ``route`` is one of ``routes`` (``what`` names it in the error)."""
    if route not in routes:
        raise ValueError(f"unknown {what} {route!r}: expected one of {routes}")
    return bound(var, route)
