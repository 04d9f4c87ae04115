"""Method-agnostic adapter layer plumbing.

:class:`AdapterLayer` wraps a frozen ``base_layer`` and keeps, per adapter name, the method's tensors in
``ParameterDict``s named in ``adapter_layer_names`` (these are the trainable, saved tensors). It owns the
bookkeeping every method shares: active adapters, enable/disable, merge/unmerge, delete, mixed batches. What a
method subclass supplies (four required hooks, and optional ones with working defaults) is written down, with the glossary, in
:class:`fourierft.contract.MethodLayer`.

Beside it: :mod:`fourierft.plans` (plans shared between live layers), :mod:`fourierft.mixed_batch` (per-sample
adapter indices) and :mod:`fourierft.modules_to_save` (``ModulesToSaveWrapper``).
"""

from __future__ import annotations

import logging
import warnings
from typing import Iterable, Optional, Sequence

import torch
from torch import nn
from torch.nn.modules import module as _module_registry  # the global hook dicts

from . import quantized
from .mixed_batch import sample_groups

logger = logging.getLogger(__name__)


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (its own or global ones), which skipping the call would lose.

    A layer that computes its base product itself (FourierFT's fused routes) first asks this of the base.
    Private API: torch has no public way to ask whether a module (or the global registry filled by
    ``register_module_forward_hook`` and friends) holds hooks; these dicts are where ``Module.__call__``
    itself looks. tests/test_private_api.py fails loudly if they are renamed.
    """
    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
           getattr(module, "_backward_pre_hooks", None))
    shared = (getattr(_module_registry, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))
    if any(bool(h) for h in (*own, *shared)):
        return True
    # accelerate's hooks (device_map offload, align_devices) replace the instance's forward instead
    return "forward" in module.__dict__ or hasattr(module, "_hf_hook")


def next_active(active: Sequence[str], deleted: str, remaining: Sequence[str]) -> list[str]:
    """The one rule for the active adapters after ``deleted`` is deleted, used by layers, ``modules_to_save``
    wrappers and tuners alike: the other active adapters stay active; if none is left, the remaining adapter
    whose name sorts first takes over (PEFT's rule); with no adapter left, none is active.

    Args:
        active: The active adapters before the deletion.
        deleted: The deleted adapter.
        remaining: The adapters left.
    """
    still = [name for name in active if name != deleted]
    return still or sorted(remaining)[:1]


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
        #: Plain base weights replaced by a merge, by adapter name: the tensor itself, no copy (unmerging puts
        #: it back, bit for bit, where subtracting dW again would round).
        self._premerge_tensors: dict[str, torch.Tensor] = {}

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
        """Remove ``adapter_name``'s tensors; the active adapters follow :func:`next_active`."""
        for attr in self.adapter_layer_names + self.other_param_names:
            store = getattr(self, attr)
            if adapter_name in store:
                del store[adapter_name]
        if adapter_name in self._active_adapters:
            new_active = next_active(self._active_adapters, adapter_name, self.adapter_names())
            if new_active and self._active_adapters == [adapter_name]:  # a fallback took over
                warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                              f"{new_active[0]}.")
            self._active_adapters = new_active

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

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None, *,
              keep_original: bool = True) -> None:
        """Fold adapters into the base weight, in order.

        Args:
            safe_merge: First check that the merged weight is finite; if not, nothing is changed.
            adapter_names: Which adapters to merge; default the active ones.
            keep_original: Keep the weight each merge replaces, so that :meth:`unmerge` restores it bit for
                bit (TRL merges and unmerges on every weight sync; subtracting dW again would round, and the
                rounding would add up). It holds one weight per merged adapter until unmerged. ``False``
                (``merge_and_unload``, which never unmerges) subtracts dW on unmerge instead.

        Raises:
            ValueError: ``safe_merge`` found NaN or Inf (the base weight is left untouched).
        """
        if safe_merge:
            self.check_merge(adapter_names)
        base = self.get_base_layer()
        for name in self._to_merge(adapter_names):
            # a quantized base is de-quantized, merged and re-quantized (see fourierft.quantized); a plain
            # weight is written contiguous: a transposed result would make the merged model unsavable
            original = base.weight.data
            snapshot = quantized.replace_weight(base, self.merged_weight(name, quantized.dense_weight(base)))
            if snapshot is not None:
                self._premerge_weights[name] = snapshot
            elif keep_original and quantized.quant_kind(base) is None:  # bitsandbytes keeps state beside .data
                self._premerge_tensors[name] = original
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
        elif name in self._premerge_tensors:
            base.weight.data = self._premerge_tensors.pop(name)
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

    def move_adapter(self, adapter_name: str, *, autocast_adapter_dtype: bool = True) -> None:
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

    # ------------------------------------------------------------------ optional hooks: hot-swapping, status
    #: The layer's ``module_type`` in status reports (PEFT's class name, e.g. ``"boft.Linear"``); ``None``: the
    #: name its repr starts with.
    peft_module_type: Optional[str] = None

    def hotswap_values(self, adapter_name: str, key: str, new: Optional[dict[str, torch.Tensor]], new_config,
                       config) -> dict[str, torch.Tensor]:
        """Values for adapter ``adapter_name``'s tensors, in their current shapes, that make it compute the new
        adapter (:func:`fourierft.hotswap_adapter` copies them in).

        Args:
            adapter_name: The model's adapter being overwritten.
            key: The layer's name in the model (as ``check_target`` gets it).
            new: The new adapter's tensors for this layer by attribute name (``{"fourierft_spectrum": c}``), or
                ``None`` when the new adapter does not target this layer.
            new_config: The new adapter's config, or ``None`` (then taken to equal ``config``).
            config: The model's config of ``adapter_name``.

        Default: the new tensors as they are, when every shape matches; an untargeted layer is refused (a
        method that has an identity adapter returns it instead).

        Raises:
            ValueError: The new adapter does not fit this layer.
        """
        if new is None:
            raise ValueError(f"the new adapter has no tensors for this {type(self).__name__} layer")
        current = dict(self.named_adapter_tensors(adapter_name))
        for attr, value in new.items():
            if tuple(value.shape) != tuple(current[attr].shape):
                raise ValueError(f"{attr}: shape {tuple(value.shape)}, the model expects {tuple(current[attr].shape)}")
        return dict(new)

    def hotswap_padding(self, adapter_name: str, key: str, config):
        """The config to rebuild adapter ``adapter_name`` with so that it holds every adapter up to ``config``'s
        size (:func:`fourierft.prepare_model_for_hotswap`), after checking that it can. The rebuilt tensors get
        the old values in their leading slice, so padding must not change the outputs.

        Args:
            adapter_name: The adapter to pad.
            key: The layer's name in the model.
            config: The padded adapter config (from the tuner's ``hotswap_padded_config``).

        Default: the method has no padding.

        Raises:
            ValueError: This layer cannot be padded to ``config``.
        """
        raise ValueError(f"{type(self).__name__} layers cannot be padded for hot-swapping")

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}, active={self._active_adapters}"
