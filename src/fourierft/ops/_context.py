"""One helper for the ops' context variables (forced routes, route records): set for a block, then reset."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, TypeVar

T = TypeVar("T")


@contextmanager
def bound(var: ContextVar, value: T) -> Iterator[T]:
    """Inside the block ``var`` holds ``value``; on exit (also on an error) it holds what it held before."""
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)
