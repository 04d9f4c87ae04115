"""Method-agnostic tuner core: find targets, swap in adapter layers, manage adapters.

:class:`AdapterModel` knows nothing of spectra or rotations. A method subclasses it and sets ``prefix``
(``"fourierft_"``), ``layer_cls`` (an :class:`~fourierft.layer.AdapterLayer`) and ``target_types`` (the module
types it can wrap); the optional hooks are listed in :class:`fourierft.contract.MethodTuner`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import re
import warnings
from typing import ClassVar, Iterable, Iterator, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from . import quantized
from .layer import AdapterLayer, next_active
from .mixed_batch import BASE_ADAPTER_NAME, SampleAdapters
from .modules_to_save import ModulesToSaveWrapper
from .partitioned import check_gatherable, gathered
from .targets import is_excluded, is_target, layer_coverage, resolve_target_modules

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[^./\\\s]+$")


class PeftError(Exception):
    """Base class of this library's own errors that PEFT also raises under its own class (PEFT's ``PeftError``)."""


class NoMatchingPeftModuleError(PeftError, ValueError):
    """No module of the model matches the config's ``target_modules`` (PEFT's exception of the same name; a
    ``ValueError``, as in PEFT)."""


def check_adapter_name(name: object) -> str:
    """Reject names that cannot be a ParameterDict key or a folder name.

    Raises:
        ValueError: ``name`` is not a non-empty string free of ``.``, ``/``, ``\\`` and whitespace.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"Invalid adapter name {name!r}: use a non-empty string without '.', '/', '\\\\' or whitespace"
        )
    return name


def _names(adapter_names: object) -> list[str]:
    """One name or a list of names, as a list."""
    if isinstance(adapter_names, str):
        return [adapter_names]
    if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"Expected an adapter name or a list of adapter names, got {adapter_names!r}")
    return list(adapter_names)


def get_submodule_parent(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    """``(parent, attribute)`` of the module named ``key``."""
    parent_name, _, child = key.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


class PlansFollowMoves:
    """Mixin for wrappers: after the public ``to``/``cuda``/``cpu``/``xpu``/``to_empty`` move the model, build the
    plans for the new device at once (eagerly), so that a ``torch.compile``'d forward only looks them up.

    Public methods are extended, not ``nn.Module._apply``; a model moved another way (e.g. the base model by
    itself) builds them on its first forward instead.
    """

    def _plans_moved(self, result):
        self.prepare_plans()
        return result

    def to(self, *args, **kwargs):
        return self._plans_moved(super().to(*args, **kwargs))

    def cuda(self, *args, **kwargs):
        return self._plans_moved(super().cuda(*args, **kwargs))

    def cpu(self):
        return self._plans_moved(super().cpu())

    def xpu(self, *args, **kwargs):
        return self._plans_moved(super().xpu(*args, **kwargs))

    def to_empty(self, *args, **kwargs):
        return self._plans_moved(super().to_empty(*args, **kwargs))


class AdapterModel(PlansFollowMoves, nn.Module):
    """Wraps a model and injects one method's adapter layers (PEFT's ``BaseTuner``).

    Args:
        model: The model to adapt; modified in place.
        peft_config: A config, or a dict ``{adapter_name: config}``.
        adapter_name: Name of the first adapter.
        low_cpu_mem_usage: Create the adapter tensors on the meta device (to be filled by loading).
        autocast_adapter_dtype: Keep fp16/bf16 adapters in fp32.
    """

    peft_type: ClassVar[str] = ""
    prefix: ClassVar[str] = ""
    layer_cls: ClassVar[type[AdapterLayer]]
    target_types: ClassVar[tuple[type, ...]] = ()
    #: The types ``target_modules="all-linear"`` selects (default: ``target_types``).
    linear_types: ClassVar[tuple[type, ...]] = ()
    default_target_overrides: ClassVar[dict] = {}
    #: ``(base type, adapter layer class)`` pairs for the modules :attr:`layer_cls` does not wrap, first match
    #: wins: set it in the class body, or call :meth:`register_layer`. A tuple, never changed in place.
    layer_classes: ClassVar[tuple[tuple[type, type[AdapterLayer]], ...]] = ()

    def __init__(
        self,
        model: nn.Module,
        peft_config,
        adapter_name: str = "default",
        low_cpu_mem_usage: bool = False,
        *,
        autocast_adapter_dtype: bool = True,
        state_dict: Optional[dict] = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"The model to adapt must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.peft_config: dict = {}
        self.active_adapter: str | list[str] = adapter_name
        configs = peft_config if isinstance(peft_config, dict) else {adapter_name: peft_config}
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            for name, config in configs.items():
                self.inject_adapter(self.model, name, config, autocast_adapter_dtype=autocast_adapter_dtype,
                                    low_cpu_mem_usage=low_cpu_mem_usage)
        except BaseException:
            self._remove_injected(list(self.peft_config))  # all-or-nothing over several configs too
            for p, flag in flags:
                p.requires_grad_(flag)
            raise
        self.model.peft_config = self.peft_config

    def _remove_injected(self, names: list[str]) -> None:
        """Take adapters ``names`` out again, and every layer or wrapper that is left holding no adapter."""
        for name in names:
            self.peft_config.pop(name, None)
            for _, layer in self.adapter_layers():
                layer.delete_adapter(name)
            for wrapper in self._wrappers():
                wrapper.delete_adapter(name)
        for key, module in list(self.model.named_modules()):
            empty = (isinstance(module, AdapterLayer) and not module.adapter_names()) or (
                isinstance(module, ModulesToSaveWrapper) and not len(module.modules_to_save))
            if empty and key:
                parent, attr = get_submodule_parent(self.model, key)
                setattr(parent, attr, module.base_layer if isinstance(module, AdapterLayer) else module.original_module)

    @classmethod
    def register_layer(cls, base_type: type, layer_class: type[AdapterLayer]) -> None:
        """Let this method wrap ``base_type`` modules with ``layer_class`` (``"all-linear"`` still means
        ``linear_types``). The one way to give a method several layer classes, used where the layer class is
        defined after the tuner (FourierFT's Conv2d and Embedding layers); a subclass that registers gets its
        own :attr:`layer_classes` and leaves its parent's as it was."""
        cls.layer_classes = (*cls.layer_classes, (base_type, layer_class))
        if base_type not in cls.target_types:
            cls.target_types = (*cls.target_types, base_type)

    @classmethod
    def layer_class_for(cls, module: nn.Module) -> type[AdapterLayer]:
        """The adapter layer class that wraps ``module``: the first of :attr:`layer_classes` whose base type
        ``module`` (or its base layer) is, else :attr:`layer_cls`."""
        base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
        return next((layer for base_type, layer in cls.layer_classes if isinstance(base, base_type)), cls.layer_cls)

    @staticmethod
    def config_from_weights(config, tensors: dict) -> None:
        """Adjust a loaded config to the weights file before injection (default: nothing to adjust)."""

    @classmethod
    def hotswap_padded_config(cls, config, **targets):
        """A copy of adapter ``config`` grown to ``targets``, :func:`fourierft.prepare_model_for_hotswap`'s
        keyword arguments (FourierFT: ``target_n_frequency``; BOFT: ``target_n_butterfly_factor``).

        Default: the method has no padding.

        Raises:
            ValueError: ``targets`` are not this method's, or none is given.
        """
        raise ValueError(f"{cls.peft_type} adapters cannot be padded for hot-swapping")

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def prepare_plans(self) -> None:
        """Build every adapter layer's plans on its adapters' device now (see ``AdapterLayer.prepare_plans``)."""
        for _, layer in self.adapter_layers():
            layer.prepare_plans()

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether every adapter layer can be converted to LoRA (:func:`fourierft.convert_to_lora`), as PEFT."""
        layers = [layer for _, layer in self.adapter_layers()]
        return bool(layers) and all(getattr(layer, "supports_lora_conversion", lambda _name: False)(adapter_name)
                                    for layer in layers)

    def forward(self, *args, adapter_names: Optional[list[str]] = None, **kwargs):
        """Run the model; ``adapter_names`` (one per sample, ``"__base__"`` for none) mixes adapters in a batch."""
        if self.model.training and torch.is_grad_enabled():  # see fourierft.quantized.is_repacked
            quantized.unpack_all(self.model)
        if adapter_names is None:
            return self.model(*args, **kwargs)
        with self.mixed_batch(adapter_names):
            return self.model(*args, **kwargs)

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names: Optional[list[str]]):
        """Within this context, sample ``i`` of every batch uses adapter ``adapter_names[i]``.

        Raises:
            ValueError: An unknown name, or adapters are merged (their change is already in the weights).
        """
        if adapter_names is None:
            yield
            return
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise ValueError(f"adapter_names must be a list of adapter names, one per sample, got {adapter_names!r}")
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {BASE_ADAPTER_NAME})
        if unknown:
            raise ValueError(f"Unknown adapter names {unknown}; known: {sorted(self.peft_config)} and "
                             f"'{BASE_ADAPTER_NAME}' for the base model")
        modules = [m for m in self.model.modules() if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))]
        if any(isinstance(m, AdapterLayer) and m.merged for m in modules):
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters; unmerge them first")
        names = SampleAdapters(adapter_names)
        for m in modules:
            m.sample_adapters = names
        try:
            yield
        finally:
            for m in modules:
                m.sample_adapters = None

    # ------------------------------------------------------------------ introspection
    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    @property
    def targeted_module_names(self) -> list[str]:
        """Names of the adapted modules, in module order (PEFT's attribute)."""
        return [name for name, _ in self.adapter_layers()]

    @property
    def targeted_parameter_names(self) -> list[str]:
        """Always empty: these methods adapt modules, not bare parameters (PEFT's attribute)."""
        return []

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """``(name, layer)`` for every adapter layer, in module order."""
        for name, module in self.model.named_modules():
            if isinstance(module, AdapterLayer):
                yield name, module

    def _wrappers(self) -> Iterator[ModulesToSaveWrapper]:
        for module in self.model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield module

    # ------------------------------------------------------------------ injection
    def _resolve_targets(self, model: nn.Module, config) -> None:
        """Fill ``target_modules`` of the model's own copy ``config`` (``None``: the method's or PEFT's default)."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if config.target_modules is None and model_type in self.default_target_overrides:
            config.target_modules = set(self.default_target_overrides[model_type])
        config.target_modules = resolve_target_modules(config, model, self.linear_types or self.target_types)

    def _find_targets(self, model: nn.Module, config) -> list[tuple[str, nn.Module]]:
        found, inside_wrapper = [], ()
        for key, module in model.named_modules():
            if not key or isinstance(module, ModulesToSaveWrapper):
                inside_wrapper = (key + ".",) if isinstance(module, ModulesToSaveWrapper) else inside_wrapper
                continue
            if inside_wrapper and key.startswith(inside_wrapper) or ".base_layer" in "." + key:
                continue
            if is_excluded(config, key) or not is_target(config, key):
                continue
            if not isinstance(module, (AdapterLayer,) + self.target_types):
                raise TypeError(
                    f"Target module {key} ({type(module).__name__}) is not supported by {type(self).__name__}; "
                    f"supported types: {', '.join(t.__name__ for t in self.target_types)}"
                )
            found.append((key, module))
        missing, present = layer_coverage(config, [k for k, _ in model.named_modules()])
        if not found:
            layers = "" if missing is None else (
                f" with layers_to_transform={config.layers_to_transform} (modules of that name exist in layers "
                f"{present}; no layer {missing})")
            raise NoMatchingPeftModuleError(
                f"Target modules {config.target_modules} not found in the base model{layers}. "
                "Please check the target modules and try again."
            )
        if missing:  # PEFT adapts the layers that exist; keep that, so its files load, but say so
            logger.warning(
                "layers_to_transform=%s: no target module lies in layer(s) %s (layers holding target modules: "
                "%s); adapting the matching modules only", config.layers_to_transform, missing, present,
            )
        return found

    def _check_new_adapter(self, adapter_name: str, config) -> None:
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name {adapter_name} already exists.")
        if config.peft_type != type(self).peft_type:
            raise ValueError(
                f"Cannot combine adapters of type {config.peft_type} with {type(self).peft_type} in one model"
            )
        with_bias = [n for n, c in self.peft_config.items() if c.bias != "none"]
        if config.bias != "none" and with_bias:
            raise ValueError(
                f"{type(self).__name__} supports only 1 adapter with bias. When using multiple adapters, set bias "
                f"to 'none' for all adapters (adapter {with_bias[0]} already has bias={self.peft_config[with_bias[0]].bias!r})."
            )
        if self.prefix.rstrip("_") and adapter_name in self.prefix:
            warnings.warn(
                f"Adapter name {adapter_name!r} is part of the prefix {self.prefix!r}; this can break key matching "
                "in other tools"
            )

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        config,
        *,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        """Add adapter ``adapter_name`` to every target of ``config``; all-or-nothing.

        ``config`` is never changed: it is resolved (``target_modules`` filled, ``fan_in_fan_out`` corrected)
        into the model's own deep copy, which ``peft_config[adapter_name]`` then shows, as in PEFT. On any
        error the model and this tuner are left exactly as they were.

        Raises:
            ValueError: Bad name, duplicate name, no matching module, or a bad per-layer value.
            TypeError: A matched module has a type this method cannot wrap.
            ImportError: A matched module is a bitsandbytes layer but bitsandbytes cannot be imported.
        """
        self._check_new_adapter(adapter_name, config)
        config = copy.deepcopy(config)  # the model's own copy: resolving it leaves the caller's object as it was
        created: list[tuple[nn.Module, str, nn.Module]] = []
        updated: list[AdapterLayer] = []
        wrapped: list[tuple[nn.Module, str, nn.Module]] = []
        try:
            self._resolve_targets(model, config)
            targets = self._find_targets(model, config)
            for key, module in targets:  # validate every layer before touching any
                self._check_existing_layer(key, module, adapter_name)
                quantized.check_target(module.get_base_layer() if isinstance(module, AdapterLayer) else module, key)
                self.layer_class_for(module).check_target(module, config, key)
            self.peft_config[adapter_name] = config
            device_ctx = torch.device("meta") if low_cpu_mem_usage else contextlib.nullcontext()
            for key, module in targets:
                with device_ctx:
                    if isinstance(module, AdapterLayer):
                        module.update_layer(adapter_name, config, key=key)
                        updated.append(module)
                    else:
                        parent, attr = get_submodule_parent(model, key)
                        new = self.layer_class_for(module)(module, adapter_name, config, key=key)
                        setattr(parent, attr, new)
                        created.append((parent, attr, module))
                        module = new
                module.move_adapter(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
            wrapped = self._wrap_modules_to_save(model, config, adapter_name)
        except BaseException:
            for parent, attr, original in created:
                setattr(parent, attr, original)
            for layer in updated:
                layer.delete_adapter(adapter_name)
            for parent, attr, original in wrapped:
                setattr(parent, attr, original)
            for wrapper in self._wrappers():
                wrapper.delete_adapter(adapter_name)
            self.peft_config.pop(adapter_name, None)
            raise
        self._freeze_base(model)
        others = [(p, p.requires_grad) for p in self.adapter_tensors(n for n in self.peft_config if n != adapter_name)]
        self.set_adapter(self.active_adapters)
        for p, flag in others:  # adding an adapter leaves the others' trainability as it was (as PEFT)
            p.requires_grad_(flag)

    def _check_existing_layer(self, key: str, module: nn.Module, adapter_name: str) -> None:
        """A target that is already adapted (e.g. ``get_peft_model`` called twice on one model) must be of
        this method and must not hold ``adapter_name`` yet: updating it would overwrite that adapter."""
        if not isinstance(module, AdapterLayer):
            return
        if not isinstance(module, self.layer_class_for(module)):
            raise TypeError(
                f"Target module {key} is already adapted by {type(module).__name__}; {type(self).__name__} cannot "
                "add an adapter to it (unload the other method's adapters first)"
            )
        if adapter_name in module.adapter_names():
            raise ValueError(
                f"Target module {key} already holds an adapter named {adapter_name!r} (was the model already "
                "passed to get_peft_model?); use another adapter name"
            )

    def _wrap_modules_to_save(self, model: nn.Module, config, adapter_name: str) -> list:
        """Wrap (or extend) every module named in ``modules_to_save``; PEFT matches by plain suffix."""
        names = config.modules_to_save or []
        new_wrappers = []
        keys = [k for k, _ in model.named_modules()]
        for key in keys:
            if not key or not any(key.endswith(n) for n in names):
                continue
            if ".modules_to_save." in key or key.endswith(".original_module") or ".original_module." in key:
                continue
            target = model.get_submodule(key)
            if isinstance(target, ModulesToSaveWrapper):
                target.update(adapter_name)
                continue
            if isinstance(target, AdapterLayer):
                raise ValueError(f"Module {key} is both adapted and listed in modules_to_save")
            parent, attr = get_submodule_parent(model, key)
            if isinstance(parent, ModulesToSaveWrapper):
                continue
            setattr(parent, attr, ModulesToSaveWrapper(target, adapter_name))
            new_wrappers.append((parent, attr, target))
        return new_wrappers

    @staticmethod
    def _freeze_base(model: nn.Module) -> None:
        for module in model.modules():
            if isinstance(module, AdapterLayer):
                module.base_layer.requires_grad_(False)
            elif isinstance(module, ModulesToSaveWrapper):
                module.original_module.requires_grad_(False)
        owned = set()
        for module in model.modules():
            if isinstance(module, AdapterLayer):
                for attr in module.adapter_layer_names:
                    owned.update(id(p) for p in getattr(module, attr).parameters())
            elif isinstance(module, ModulesToSaveWrapper):
                owned.update(id(p) for p in module.modules_to_save.parameters())
        for p in model.parameters():
            if id(p) not in owned:
                p.requires_grad_(False)

    # ------------------------------------------------------------------ adapter management
    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one or several adapters; they train unless frozen, all others are frozen.

        Raises:
            ValueError: An unknown adapter name.
            TypeError: ``adapter_name`` is neither a name nor a list of names.
        """
        names = _names(adapter_name)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name} not found.")
        for w in self._wrappers():  # every check before any change
            w.check_set_adapter(names)
        for w in self._wrappers():
            w.set_adapter(names, inference_mode=inference_mode or self._frozen(names))
        for _, layer in self.adapter_layers():
            if layer.merged and set(layer.merged_adapters) != set(names):
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
                layer.unmerge()
            layer.set_adapter(names, inference_mode=inference_mode)
            for name in names:
                if self.peft_config[name].inference_mode:
                    for _, p in layer.named_adapter_tensors(name):
                        p.requires_grad_(False)
        self._set_bias_trainable(names, inference_mode)
        self.active_adapter = adapter_name if isinstance(adapter_name, str) else names  # as given, as in PEFT

    def _frozen(self, names: list[str]) -> bool:
        return all(self.peft_config[n].inference_mode for n in names) if names else True

    def _set_bias_trainable(self, names: list[str], inference_mode: bool) -> None:
        for name in names:
            bias = self.peft_config[name].bias
            train = not inference_mode and not self.peft_config[name].inference_mode
            if bias == "all":
                for pname, p in self.model.named_parameters():
                    if (pname == "bias" or pname.endswith(".bias")) and ".original_module." not in pname:
                        p.requires_grad_(train)
            elif bias.endswith("_only"):
                for _, layer in self.adapter_layers():
                    if name in layer.adapter_names() and layer.bias is not None:
                        layer.get_base_layer().bias.requires_grad_(train)

    def adapter_tensors(self, adapter_names: Optional[Iterable[str]] = None) -> Iterator[nn.Parameter]:
        """The tensors of the given adapters (default: all), in their layers and modules_to_save copies."""
        for _, layer in self.adapter_layers():
            for name in layer.adapter_names() if adapter_names is None else adapter_names:
                for _, p in layer.named_adapter_tensors(name):
                    yield p
        for w in self._wrappers():
            for name in w.modules_to_save if adapter_names is None else adapter_names:
                if name in w.modules_to_save:
                    yield from w.modules_to_save[name].parameters()

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Turn gradients on or off for the given adapters' tensors and modules_to_save copies."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for p in self.adapter_tensors(names):
            p.requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; if it was the only active one, the remaining name that sorts first takes
        over (:func:`~fourierft.layer.next_active`, the one rule layers and ``modules_to_save`` wrappers follow too).

        Raises:
            ValueError: Unknown name, or the adapter is merged (nothing is changed).
        """
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        merged = [k for k, layer in self.adapter_layers() if adapter_name in layer.merged_adapters]
        if merged:
            raise ValueError(f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them "
                             "first.")
        del self.peft_config[adapter_name]
        for _, layer in self.adapter_layers():
            layer.delete_adapter(adapter_name)
        for w in self._wrappers():
            w.delete_adapter(adapter_name)
        remaining = next_active(self.active_adapters, adapter_name, list(self.peft_config))
        if remaining:
            self.set_adapter(remaining)
        else:
            self.active_adapter = []
            for _, layer in self.adapter_layers():
                layer.set_adapter([])

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "linear", **kwargs) -> None:
        """Add ``adapter_name`` whose weight change is ``sum(w * dW)`` of ``adapters``, exactly, or refuse.

        The method decides through :meth:`combine_weighted` (FourierFT: adapters sharing frequency positions;
        see :mod:`fourierft.methods.weighted`). The new adapter is inactive, as in PEFT. Unlike PEFT's LoRA
        ``"linear"`` (which sums the A and B factors separately), the result is the exact weighted sum.

        Raises:
            ValueError: Unknown or existing names, weights that are not finite numbers (one per adapter), a
                ``combination_type`` other than ``"linear"``, or adapters with no exact combination (the message
                says what works instead); the model is then unchanged.
        """
        names = _names(adapters)
        if not names or len(set(names) - set(self.peft_config)):
            raise ValueError(f"adapters must name existing adapters, got {adapters!r} (known: {sorted(self.peft_config)})")
        if isinstance(weights, (str, bytes)) or len(list(weights)) != len(names) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
            raise ValueError(f"weights must be one finite number per adapter ({len(names)}), got {weights!r}")
        if combination_type != "linear":
            raise ValueError(
                f"combination_type={combination_type!r} is not supported: only 'linear', the exact weighted sum of the "
                "adapters' weight changes. For peft's other combinations, convert the adapters to LoRA "
                "(fourierft.convert_to_lora) and use peft's add_weighted_adapter")
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name {adapter_name} already exists.")
        check_adapter_name(adapter_name)
        self.combine_weighted(names, [float(w) for w in weights], adapter_name)

    def combine_weighted(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Method hook of :meth:`add_weighted_adapter` (inputs checked): by default no exact form exists."""
        raise ValueError(
            f"{type(self).__name__} cannot combine adapters exactly: a weighted sum of {self.peft_type} weight changes "
            "is not itself such an adapter. Convert each adapter to LoRA first (fourierft.convert_to_lora or "
            "save_as_lora) and combine the LoRA adapters with peft's add_weighted_adapter(..., "
            "combination_type='cat'), the exact weighted sum of their weight changes.")

    def enable_adapter_layers(self) -> None:
        """Turn every adapter layer and modules_to_save copy back on."""
        self._set_enabled(True)

    def disable_adapter_layers(self) -> None:
        """Bypass every adapter layer and modules_to_save copy (merged layers unmerge on next forward)."""
        for name in self.active_adapters:
            bias = self.peft_config[name].bias
            if bias != "none":
                warnings.warn(
                    f"Careful, disabling adapter layers with bias configured to be '{bias}' does not produce the "
                    "same output as the base model would without adaption."
                )
        self._set_enabled(False)

    def adapter_layers_enabled(self) -> bool | str:
        """``True`` when every adapter layer is on, ``False`` when all are off, ``"irregular"`` for a mix
        (PEFT's ``get_model_status().enabled``)."""
        states = {not layer.disable_adapters for _, layer in self.adapter_layers()}
        return states.pop() if len(states) == 1 else ("irregular" if states else True)

    def _set_enabled(self, enabled: bool) -> None:
        # PEFT freezes the tensors of disabled adapters; enabling puts back each flag as it was (PEFT makes
        # every active adapter trainable again, including one loaded with is_trainable=False)
        if not enabled and self.adapter_layers_enabled() is not False:
            self._grads_before_disable = [(p, p.requires_grad) for p in self.adapter_tensors()]
            for p, _ in self._grads_before_disable:
                p.requires_grad_(False)
        elif enabled:
            for p, flag in getattr(self, "_grads_before_disable", None) or ():
                p.requires_grad_(flag)
            self._grads_before_disable = None
        for _, layer in self.adapter_layers():
            layer.enable_adapters(enabled)
        for w in self._wrappers():
            w.enable_adapters(enabled)

    # ------------------------------------------------------------------ merging
    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights in place, keeping the adapter tensors."""
        layers = [layer for _, layer in self.adapter_layers()]
        # None: each layer merges its own active adapters, as in PEFT (they differ from the model's after a
        # layer-level set_adapter)
        names = None if adapter_names is None else _names(adapter_names)
        for name in names or []:
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name} not found.")
        pending = [n for layer in layers for n in layer._to_merge(names)]
        if layers and not pending:
            warnings.warn("All adapters are already merged, nothing to do.")
            return
        merged = sorted({n for layer in layers for n in layer.merged_adapters})
        if merged:
            warnings.warn(f"Already following adapters were merged {','.join(merged)}. You are now additionally "
                          f"merging {','.join(dict.fromkeys(n for n in pending if n not in merged))}.")
        self._merge_layers(layers, names, safe_merge=safe_merge, progressbar=False, keep_original=True)

    def _merge_layers(self, layers, names, *, safe_merge: bool, progressbar: bool, keep_original: bool) -> None:
        keys = {id(layer): key for key, layer in self.adapter_layers()}
        for layer in layers:  # FSDP1 shards are refused before any weight changes
            check_gatherable(layer.get_base_layer(), keys.get(id(layer)))
        if safe_merge:  # check every layer first, so that a broken adapter changes no weight at all
            for layer in layers:
                with gathered(layer.parameters()):
                    layer.check_merge(names)
        for layer in tqdm(layers, desc="Merging", disable=not progressbar):
            with gathered(layer.parameters(), modify=True):  # ZeRO-3: every rank merges, rank 0's result kept
                layer.merge(adapter_names=names, keep_original=keep_original)

    def unmerge_adapter(self, force_reshard: bool = False) -> None:
        """Undo every merge (warns, as PEFT, when nothing is merged).

        ``force_reshard`` (PEFT 0.22: re-shard FSDP2 modules first) is accepted for compatibility and has no
        effect here."""
        layers = [layer for _, layer in self.adapter_layers()]
        if not any(layer.merged for layer in layers):
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self._unmerge_layers([(key, layer) for key, layer in self.adapter_layers()])

    def _unmerge_layers(self, layers: list) -> None:
        for key, layer in layers:  # FSDP1 shards are refused before any weight changes
            check_gatherable(layer.get_base_layer(), key)
        for _, layer in layers:
            with gathered(layer.parameters(), modify=True):  # ZeRO-3: every rank unmerges, rank 0's result kept
                layer.unmerge()

    def _unmerge_all(self) -> None:
        # a layer with nothing merged would warn
        self._unmerge_layers([(key, layer) for key, layer in self.adapter_layers() if layer.merged])

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Optional[list[str]] = None
    ) -> nn.Module:
        """Merge adapters (default: each layer's active ones) and return the base model with plain layers."""
        names = None if adapter_names is None else _names(adapter_names)
        for name in names or []:  # an unknown name would otherwise unload without merging anything
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name} not found.")
        layers = [layer for _, layer in self.adapter_layers()]
        self._merge_layers(layers, names, safe_merge=safe_merge, progressbar=progressbar, keep_original=False)
        return self._unload()

    def unload(self) -> nn.Module:
        """Remove every adapter without merging (merged layers are unmerged first) and return the base model."""
        self._unmerge_all()
        return self._unload()

    def restore_base_model(self) -> nn.Module:
        """Put every original module back (heads included, unlike :meth:`unload`): undoes the injection."""
        self._unmerge_all()
        return self._unload(use_original=True)

    def _unload(self, use_original: bool = False) -> nn.Module:
        for key, layer in list(self.adapter_layers()):
            parent, attr = get_submodule_parent(self.model, key)
            setattr(parent, attr, layer.get_base_layer())
        for key, module in list(self.model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                parent, attr = get_submodule_parent(self.model, key)
                setattr(parent, attr, module.original_module if use_original else module.active_module())
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

