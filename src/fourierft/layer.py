"""Method-agnostic adapter layer plumbing.

:class:`AdapterLayer` wraps a frozen ``base_layer`` and keeps, per adapter name, the method's tensors in
``ParameterDict``s named in ``adapter_layer_names`` (these are the trainable, saved tensors). It owns the
bookkeeping every method shares: active adapters, enable/disable, merge/unmerge, delete, mixed batches. What a
method subclass supplies (four required hooks, five optional ones) is written down, with the glossary, in
:class:`fourierft.contract.MethodLayer`.

:class:`SharedPlans` lets live layers of one shape share their plans (derived tensors) without a global cache.

:class:`ModulesToSaveWrapper` keeps a trainable copy of a whole module per adapter (``modules_to_save``).
"""

from __future__ import annotations

import copy
import logging
import warnings
import weakref
from typing import Any, Callable, Hashable, Iterable, Optional, Sequence

import torch
from torch import nn

from . import quantized

logger = logging.getLogger(__name__)


class AdapterLayer(nn.Module):
    """Base class of every adapted layer (see the module docstring for the method contract)."""

    #: ParameterDict attributes holding each adapter's trainable tensors, e.g. ``("fourierft_spectrum",)``.
    adapter_layer_names: tuple[str, ...] = ()
    #: Other per-adapter attributes (plain dicts) removed on ``delete_adapter``.
    other_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        #: Per-sample adapter names during a mixed-adapter batch (set by the tuner, else ``None``).
        self.sample_adapters: Optional[list[str]] = None
        #: Quantized base weights replaced by a merge, by adapter name (unmerging puts them back exactly).
        self._premerge_weights: dict[str, dict] = {}

    # ------------------------------------------------------------------ state
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def active_adapter(self) -> list[str]:
        """The active adapters' names: a list on an adapter layer, as in PEFT (the model's is a name)."""
        return list(self._active_adapters)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.base_layer, "bias", None)

    def get_base_layer(self) -> nn.Module:
        """The innermost wrapped module."""
        base = self.base_layer
        while isinstance(base, AdapterLayer):
            base = base.base_layer
        return base

    def adapter_names(self) -> list[str]:
        """Every adapter this layer holds, in creation order."""
        first = getattr(self, self.adapter_layer_names[0])
        return list(first.keys())

    def named_adapter_tensors(self, adapter_name: str) -> Iterable[tuple[str, nn.Parameter]]:
        """``(attribute, tensor)`` pairs of one adapter's adapter tensors on this layer (``adapter_layer_names``)."""
        for attr in self.adapter_layer_names:
            params = getattr(self, attr)
            if adapter_name in params:
                yield attr, params[adapter_name]

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Activate ``adapter_names``; their tensors train unless ``inference_mode``, all others are frozen."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in self.adapter_names():
            for _, p in self.named_adapter_tensors(name):
                p.requires_grad_(name in names and not inference_mode)
        # kept as given, as in PEFT: a layer that lacks a name reports the model's active adapters (the
        # forward and merges skip names the layer does not hold)
        self._active_adapters = names

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn gradients on or off for the tensors of ``adapter_names`` in this layer."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            for _, p in self.named_adapter_tensors(name):
                p.requires_grad_(requires_grad)

    def enable_adapters(self, enabled: bool) -> None:
        """Switch the adapters' contribution on or off (the base layer's output is unchanged)."""
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``'s tensors; the remaining adapters stay as they are."""
        for attr in self.adapter_layer_names + self.other_param_names:
            store = getattr(self, attr)
            if adapter_name in store:
                del store[adapter_name]
        if adapter_name in self._active_adapters:
            self._active_adapters.remove(adapter_name)
            if not self._active_adapters and self.adapter_names():
                new_active = self.adapter_names()[0]
                warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                              f"{new_active}.")
                self._active_adapters = [new_active]

    # ------------------------------------------------------------------ merging
    def _to_merge(self, adapter_names: Optional[list[str]]) -> list[str]:
        names = self._active_adapters if adapter_names is None else adapter_names
        return [n for n in names if n in self.adapter_names() and n not in self.merged_adapters]

    def check_merge(self, adapter_names: Optional[list[str]] = None) -> None:
        """Raise ``ValueError`` if merging ``adapter_names`` would give a non-finite weight; changes nothing."""
        weight = quantized.dense_weight(self.get_base_layer())
        for name in self._to_merge(adapter_names):
            weight = self.merged_weight(name, weight)
            if not torch.isfinite(weight).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold adapters into the base weight, in order.

        Args:
            safe_merge: First check that the merged weight is finite; if not, nothing is changed.
            adapter_names: Which adapters to merge; default the active ones.

        Raises:
            ValueError: ``safe_merge`` found NaN or Inf (the base weight is left untouched).
        """
        if safe_merge:
            self.check_merge(adapter_names)
        base = self.get_base_layer()
        for name in self._to_merge(adapter_names):
            # a quantized base is de-quantized, merged and re-quantized (see fourierft.quantized); a plain
            # weight is written contiguous: a transposed result would make the merged model unsavable
            snapshot = quantized.replace_weight(base, self.merged_weight(name, quantized.dense_weight(base)))
            if snapshot is not None:
                self._premerge_weights[name] = snapshot
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo :meth:`merge`, newest first; warns (as PEFT) when nothing is merged."""
        if not self.merged_adapters:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            self.unmerge_last()

    def unmerge_last(self) -> None:
        """Undo the most recent merge."""
        base = self.get_base_layer()
        name = self.merged_adapters[-1]  # popped only once undone: a failed unmerge leaves a consistent state
        if name in self._premerge_weights:
            quantized.restore_weight(base, self._premerge_weights.pop(name))
        else:
            quantized.replace_weight(base, self.unmerged_weight(name, base.weight.data))
        self.merged_adapters.pop()

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if torch.is_grad_enabled() and quantized.is_repacked(self.base_layer) and self._needs_grad(x):
            quantized.unpack(self.base_layer)  # bitsandbytes' CPU inference layout has no backward
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.sample_adapters is not None:
            groups = sample_groups(self.sample_adapters, x.shape[0] if x.dim() else 0, self.adapter_names(), x.device)
            if groups:
                return self.mixed_forward(x, groups, *args, **kwargs)
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        names = [n for n in self._active_adapters if n in self.adapter_names()]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        return self.adapter_forward(x, names, *args, **kwargs)

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return bool(getattr(x, "requires_grad", False)) or any(
            p.requires_grad for n in self._active_adapters for _, p in self.named_adapter_tensors(n))

    # ------------------------------------------------------------------ method contract
    @classmethod
    def check_target(cls, module: nn.Module, config, key: str) -> None:
        """Raise ``ValueError`` if ``config`` cannot be applied to ``module`` (called before any change)."""

    def derived_tensors(self, adapter_name: str) -> list[torch.Tensor]:
        """Tensors rebuilt from the config rather than saved (fingerprinted in adapter files)."""
        return []

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def adapter_forward(self, x: torch.Tensor, adapter_names: list[str], *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def mixed_forward(self, x: torch.Tensor, groups: dict[str, torch.Tensor], *args, **kwargs) -> torch.Tensor:
        """Output for a batch whose samples use different adapters: ``groups`` maps an adapter name to
        the sample indices using it; the other samples get the base output. This generic version runs
        each group separately; methods override it to share the base computation."""
        out = self.base_layer(x, *args, **kwargs)
        for name, index in groups.items():
            out = out.index_copy(0, index, self.adapter_forward(x[index], [name], *args, **kwargs).to(out.dtype))
        return out

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def _move_adapter(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Put the adapter on the base weight's device and dtype; fp16/bf16 are then upcast to fp32.

        The round trip through the base dtype reproduces PEFT's initial values exactly.
        """
        weight = self.get_base_layer().weight
        for attr, param in list(self.named_adapter_tensors(adapter_name)):
            if param.device.type == "meta":  # to be filled by loading: give the placeholder the final dtype
                dtype = weight.dtype if weight.dtype.is_floating_point else param.dtype
                if autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16):
                    dtype = torch.float32
                param.data = torch.empty(param.shape, dtype=dtype, device="meta")
                continue
            data = param.data.to(weight.device)
            if weight.dtype.is_floating_point:
                data = data.to(weight.dtype)
            if autocast_adapter_dtype and data.dtype in (torch.float16, torch.bfloat16):
                data = data.float()
            if data.device.type != "meta" and type(data) is type(param.data):
                param.data = data
            if param.device != data.device:
                # a base model on the meta device (FSDP2 meta-init, accelerate's init_empty_weights) or of fake
                # tensors: ``.data =`` cannot change such a tensor's type or device, so a new parameter replaces it
                getattr(self, attr)[adapter_name] = nn.Parameter(data, requires_grad=param.requires_grad)
        self.prepare_plans()

    def prepare_plans(self) -> None:
        """Build every adapter's plans on its device now, outside any torch.compile trace (default: no plans).

        Called when an adapter is created and after the model moves (``PeftModel.to``/``cuda``/``cpu``); a
        method with plans builds them in its own ``plan`` lookups otherwise, on first use.
        """

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}, active={self._active_adapters}"


BASE_ADAPTER_NAME = "__base__"


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


class ModulesToSaveWrapper(nn.Module):
    """Keeps the original module frozen and a trainable deep copy per adapter (``modules_to_save``)."""

    #: Where the per-adapter copies live, as on an adapter layer (code walking adapter-holding modules reads it).
    adapter_layer_names: tuple[str, ...] = ("modules_to_save",)
    other_param_names: tuple[str, ...] = ()

    def __init__(self, module_to_save: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict()
        self._active_adapter: Optional[str] = None
        self._disable_adapters = False
        self.sample_adapters: Optional[list[str]] = None
        self.update(adapter_name)
        self.set_adapter(adapter_name)

    @property
    def active_adapter(self) -> Optional[str]:
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        """PEFT's list form of :attr:`active_adapter` (empty when none is active)."""
        return [] if self._active_adapter is None else [self._active_adapter]

    @property
    def disable_adapters(self) -> bool:
        """True while the adapters are disabled (the original module runs)."""
        return self._disable_adapters

    @property
    def weight(self) -> torch.Tensor:
        return self._active_module().weight

    def _active_module(self) -> nn.Module:
        if self._disable_adapters or self._active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self._active_adapter]

    def update(self, adapter_name: str) -> None:
        """Add a trainable copy of the original module for ``adapter_name``."""
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)

    @property
    def merged_adapters(self) -> list[str]:
        """Always empty: a copy is never merged (as PEFT's wrapper)."""
        return []

    def check_set_adapter(self, adapter_names: str | list[str]) -> Optional[str]:
        """The one name among ``adapter_names`` that has a copy here, or ``None``; changes nothing.

        Raises:
            ValueError: Several of them have a copy here (PEFT's wording).
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        owned = [n for n in names if n in self.modules_to_save]
        if len(owned) > 1:
            raise ValueError(f"Only one adapter can be set at a time for {self}, got {len(owned)}")
        return owned[0] if owned else None

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Use ``adapter_names``' copy (at most one of them may have one); it trains unless ``inference_mode``."""
        active = self.check_set_adapter(adapter_names)
        owned = [] if active is None else [active]
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name in owned and not inference_mode)
        self._active_adapter = active

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn gradients on or off for the copies of ``adapter_names`` held here."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if name in self.modules_to_save:
                self.modules_to_save[name].requires_grad_(requires_grad)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self._active_adapter == adapter_name:
            remaining = list(self.modules_to_save.keys())
            self._active_adapter = remaining[0] if remaining else None

    def forward(self, *args, **kwargs):
        if self.sample_adapters is None or self._disable_adapters or not args:
            return self._active_module()(*args, **kwargs)
        x = args[0]
        groups = sample_groups(self.sample_adapters, x.shape[0], list(self.modules_to_save.keys()), x.device)
        out = self.original_module(*args, **kwargs)
        for name, index in groups.items():
            part = self.modules_to_save[name](x[index], *args[1:], **kwargs)
            out = out.index_copy(0, index, part.to(out.dtype))
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save", "_active_adapter", "_disable_adapters"):
                raise
            return getattr(self._active_module(), name)
