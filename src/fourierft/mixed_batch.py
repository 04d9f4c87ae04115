"""Mixed-adapter batches: which samples use which adapter, as index tensors computed once per batch layout.

:meth:`fourierft.tuner.AdapterModel.mixed_batch` sets a :class:`SampleAdapters` list on every layer for the
length of one forward; adapter layers and :class:`~fourierft.modules_to_save.ModulesToSaveWrapper` turn it
into index tensors with :func:`sample_groups` or :func:`sample_slots`, cached on that list.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch

#: The name a sample gives to run with no adapter.
BASE_ADAPTER_NAME = "__base__"


class SampleAdapters(list):
    """The per-sample adapter names of one mixed batch, with the index tensors every layer looks up.

    Set on the layers by :meth:`fourierft.tuner.AdapterModel.mixed_batch` and dropped when it ends, so
    the index tensors live exactly as long as the batch layout.
    """

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__(names)
        self.index_cache: dict[tuple, Any] = {}


def _cached(sample_adapters: Sequence[str], key: tuple, build: Callable[[], Any]) -> Any:
    cache = getattr(sample_adapters, "index_cache", None)
    if cache is None:
        return build()
    if key not in cache:
        cache[key] = build()
    return cache[key]


def sample_groups(sample_adapters: Sequence[str], batch: int, available: Sequence[str],
                  device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """:func:`_sample_groups` on ``device`` (computed once per batch layout for all layers)."""
    def build():
        return {k: v.to(device) for k, v in _sample_groups(list(sample_adapters), batch, available).items()}

    return _cached(sample_adapters, ("groups", batch, tuple(available), str(device)), build)


def sample_slots(sample_adapters: Sequence[str], batch: int, names: Sequence[str],
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """``(batch,)`` int64: the position in ``names`` of each sample's adapter, ``len(names)`` for samples
    using none of them (computed once per batch layout, like :func:`sample_groups`)."""
    def build():
        repeat = batch // len(sample_adapters)  # validated by sample_groups first
        position = {name: i for i, name in enumerate(names)}
        slots = [position.get(name, len(names)) for name in sample_adapters for _ in range(repeat)]
        return torch.tensor(slots, dtype=torch.long).to(device)

    return _cached(sample_adapters, ("slots", batch, tuple(names), str(device)), build)


def _sample_groups(sample_adapters: Sequence[str], batch: int, available: Sequence[str]) -> dict[str, torch.Tensor]:
    """Sample indices per adapter for a mixed batch; samples naming ``__base__`` or an adapter this layer
    does not hold use the base layer. Beam search repeats each sample ``k`` times: names are repeated alike.

    Raises:
        ValueError: The batch size is not a multiple of the number of names.
    """
    names = list(sample_adapters)
    if not names or batch % len(names):
        raise ValueError(f"adapter_names has {len(names)} entries but the batch has {batch} samples")
    repeat = batch // len(names)
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if name in available:
            groups.setdefault(name, []).extend(range(i * repeat, (i + 1) * repeat))
    return {name: torch.tensor(index, dtype=torch.long) for name, index in groups.items()}
