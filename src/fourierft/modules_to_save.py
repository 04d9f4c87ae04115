""":class:`ModulesToSaveWrapper`: a trainable copy of a whole module per adapter (``modules_to_save``)."""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from .layer import next_active
from .mixed_batch import sample_groups


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
        return self.active_module().weight

    def active_module(self) -> nn.Module:
        """The module the wrapper runs now: the active adapter's copy, else (disabled, or no copy for the
        active adapter) the original module."""
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
            new_active = next_active([adapter_name], adapter_name, list(self.modules_to_save.keys()))
            self._active_adapter = new_active[0] if new_active else None

    def forward(self, *args, **kwargs):
        if self.sample_adapters is None or self._disable_adapters or not args:
            return self.active_module()(*args, **kwargs)
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
            return getattr(self.active_module(), name)
