"""Plans (derived tensors rebuilt from a config and a layer's shape, never saved) shared between live layers.

Each method keeps one :class:`SharedPlans` per kind of plan; a layer asks it for the plan of its key (shape,
seed, device, ...) and holds the result itself. The registry holds weak references only, so it never outlives
the models that use its plans.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Hashable


class SharedPlans:
    """Plans (derived, unsaved tensors) shared by every layer built with the same key.

    Layers hold a strong reference to the plans they use; this registry holds weak ones only, so that
    layers of one shape share one copy while it lives, and deleting the last model that uses a plan frees
    it: the registry never outgrows the live models. Values must support weak references (tensors,
    dataclass instances).
    """

    def __init__(self) -> None:
        self._plans: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The live plan of ``key``, or ``build()``'s result, registered for the next layer asking."""
        plan = self._plans.get(key)
        if plan is None:
            plan = build()
            self._plans[key] = plan
        return plan

    def __len__(self) -> int:
        return len(self._plans)

    def values(self) -> list:
        """The live plans."""
        return list(self._plans.values())
