"""The method contract: what an adapter method supplies, its vocabulary, and its one registration call.

Glossary (one name per idea, used across the code and the docs):

method
    An adapter algorithm (FourierFT, BOFT), known by its **type string** (``"FOURIERFT"``), which is the
    ``peft_type`` of its configs and files.
adapter
    One named instance of a method in a model (``"default"``), with its own config and tensors.
config
    The method's dataclass (a :class:`~fourierft.config.TunerConfig`). The object a user passes in is
    never changed: entry points **resolve** it into the model's own copy, which ``peft_config[name]`` shows.
tuner
    The :class:`~fourierft.tuner.AdapterModel` subclass that finds the **targets** (modules a config
    selects) and swaps adapter layers in for them.
adapter layer
    The :class:`~fourierft.layer.AdapterLayer` subclass wrapping one **base layer**; it holds the adapter
    tensors of every adapter on that layer.
adapter tensors
    The trainable, saved tensors of an adapter: in adapter layers the ``ParameterDict`` entries named by
    ``adapter_layer_names`` (each name starts with the method's **prefix**, e.g. ``fourierft_spectrum``;
    they are the file format), plus the adapter's ``modules_to_save`` copies. Listed by
    :meth:`AdapterLayer.named_adapter_tensors` (one layer) and :meth:`AdapterModel.adapter_tensors` (model).
plan
    Derived tensors rebuilt from a config and a layer's shape, never saved: FourierFT's frequency positions
    and :class:`~fourierft.ops.spectral.SpectralPlan`, BOFT's :class:`~fourierft.ops.butterfly.ButterflyPlan`.
    A layer holds its plans on its adapters' device; live layers of one shape share them
    (:class:`~fourierft.plans.SharedPlans`). **Derived tensors** are the plan tensors a file fingerprints.
merge / unmerge
    Fold an adapter into the base weight / take it out again, exactly.
mixed batch
    A batch whose samples use different adapters (``adapter_names=[...]``, ``"__base__"`` for none).

A method is one module that defines a config class, one or more adapter layer classes and a tuner class,
and ends with one call to :func:`register_method`. Adding a method touches nothing else but the import line
that loads its module (``fourierft/methods/__init__.py`` for built-in methods); see ``docs/adding-a-method.md``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from .config import PeftConfig, register_config
from .layer import AdapterLayer
from .tuner import AdapterModel


@runtime_checkable
class MethodLayer(Protocol):
    """What an adapter layer class supplies (subclass :class:`~fourierft.layer.AdapterLayer`, which owns
    the shared bookkeeping: active adapters, enable/disable, merge/unmerge order, delete, mixed batches).

    Required (the base class has no working default):

    * ``adapter_layer_names``: the ``ParameterDict`` attributes holding the adapter tensors.
    * ``update_layer``: create one adapter's tensors (drawing random values in PEFT's order, if PEFT has
      the method, so that the same seed gives the same adapter).
    * ``adapter_forward``: the unmerged output with the given adapters active.
    * ``merged_weight`` / ``unmerged_weight``: the base weight with the adapter folded in / taken out.

    Optional (the base class has a default):

    * ``other_param_names``: per-adapter plain dicts (settings, plans) removed by ``delete_adapter``.
    * ``check_target``: reject a target before anything changes (default: accept).
    * ``mixed_forward``: a mixed batch (default: one ``adapter_forward`` per adapter's samples).
    * ``derived_tensors``: plan tensors fingerprinted in files (default: none).
    * ``check_merge``: extra checks before a safe merge (default: the merged weight is finite).
    * ``prepare_plans``: build the adapters' plans on their device now (called after an adapter is created
      and after ``PeftModel.to``/``cuda``/``cpu``), so that a ``torch.compile``'d forward only looks them up.
    * ``move_adapter``: put a new adapter on the base weight's device and dtype.
    * ``hotswap_values``: the values of an adapter's tensors, in their current shapes, that make it compute
      another adapter (:func:`~fourierft.hotswap_adapter`); default: same shapes only, no identity fill.
    * ``hotswap_padding``: check that a layer can be padded to a larger adapter config and return the config
      to rebuild it with (:func:`~fourierft.prepare_model_for_hotswap`); default: no padding.
    * ``peft_module_type``: the layer's ``module_type`` in status reports (default: its repr name).
    """

    adapter_layer_names: tuple[str, ...]
    other_param_names: tuple[str, ...]

    @classmethod
    def check_target(cls, module: nn.Module, config: Any, key: str) -> Any: ...

    def update_layer(self, adapter_name: str, config: Any, **kwargs: Any) -> None: ...

    def adapter_forward(self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any
                        ) -> torch.Tensor: ...

    def mixed_forward(self, x: torch.Tensor, groups: dict[str, torch.Tensor], *args: Any, **kwargs: Any
                      ) -> torch.Tensor: ...

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor: ...

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor: ...

    def derived_tensors(self, adapter_name: str) -> list[torch.Tensor]: ...

    def check_merge(self, adapter_names: Optional[list[str]] = None) -> None: ...

    def prepare_plans(self) -> None: ...

    def move_adapter(self, adapter_name: str, *, autocast_adapter_dtype: bool = True) -> None: ...

    def hotswap_values(self, adapter_name: str, key: str, new: Optional[dict], new_config: Any, config: Any
                       ) -> dict[str, torch.Tensor]: ...

    def hotswap_padding(self, adapter_name: str, key: str, config: Any) -> Any: ...


@runtime_checkable
class MethodTuner(Protocol):
    """What a tuner class supplies (subclass :class:`~fourierft.tuner.AdapterModel`).

    * ``prefix``: the start of every adapter tensor name (``"fourierft_"``).
    * ``layer_cls`` and ``target_types``: the adapter layer class and the module types it wraps.
    * ``default_target_overrides``: ``{model_type: [names]}`` where the method's default targets differ
      from PEFT's table (optional).
    * ``layer_classes``: ``(base type, layer class)`` pairs for module types ``layer_cls`` does not wrap
      (optional; or :meth:`~fourierft.tuner.AdapterModel.register_layer` once the class exists).
    * ``config_from_weights``: adjust the model's copy of a loaded config to the weights file before
      injection, e.g. BOFT's factor count (optional).
    * ``hotswap_padded_config``: the adapter config grown to :func:`~fourierft.prepare_model_for_hotswap`'s
      targets (optional; default: the method has no padding).
    * ``combine_weighted``: add an adapter whose weight change is exactly ``sum(w * dW)`` of existing ones, for
      :meth:`~fourierft.tuner.AdapterModel.add_weighted_adapter` (optional; default: refused, no exact form).
    """

    peft_type: ClassVar[str]
    prefix: ClassVar[str]
    target_types: ClassVar[tuple[type, ...]]
    default_target_overrides: ClassVar[dict]
    layer_classes: ClassVar[tuple]

    @staticmethod
    def config_from_weights(config: Any, tensors: dict) -> None: ...

    @classmethod
    def hotswap_padded_config(cls, config: Any, **targets: Any) -> Any: ...

    def combine_weighted(self, adapters: list[str], weights: list[float], adapter_name: str) -> None: ...


@dataclasses.dataclass(frozen=True)
class Method:
    """One registered method (see :func:`register_method`)."""

    peft_type: str
    config_cls: type[PeftConfig]
    tuner_cls: type
    default_adapter_lr: Optional[float] = None
    legacy_ignored_suffixes: tuple[str, ...] = ()


#: ``type string -> Method``, in registration order.
METHODS: dict[str, Method] = {}
#: ``type string -> tuner class`` (a view kept in step with :data:`METHODS`).
MODEL_CLASSES: dict[str, type] = {}
#: ``type string -> learning rate`` of a method's adapter tensors when none is given (``AdapterTrainer``).
DEFAULT_ADAPTER_LR: dict[str, float] = {}

_REQUIRED_LAYER_HOOKS = ("update_layer", "adapter_forward", "merged_weight", "unmerged_weight")


def _check_classes(peft_type: str, config_cls: type, tuner_cls: type) -> None:
    if not (isinstance(config_cls, type) and issubclass(config_cls, PeftConfig)):
        raise TypeError(f"config_cls must be a PeftConfig subclass, got {config_cls!r}")
    if not (isinstance(tuner_cls, type) and issubclass(tuner_cls, AdapterModel)):
        raise TypeError(f"tuner_cls must be an AdapterModel subclass, got {tuner_cls!r}")
    unset = [name for name in ("prefix", "layer_cls", "target_types") if not getattr(tuner_cls, name, None)]
    if unset:
        raise TypeError(f"{tuner_cls.__name__} must set {', '.join(unset)} to be registered as {peft_type}")
    layer_cls = tuner_cls.layer_cls
    missing = [h for h in _REQUIRED_LAYER_HOOKS if getattr(layer_cls, h) is getattr(AdapterLayer, h)]
    if missing or not layer_cls.adapter_layer_names:
        raise TypeError(f"{layer_cls.__name__} does not implement {missing or ['adapter_layer_names']}")
    unprefixed = [n for n in layer_cls.adapter_layer_names if not n.startswith(tuner_cls.prefix)]
    if unprefixed:
        raise ValueError(f"Adapter tensor names {unprefixed} of {layer_cls.__name__} must start with the "
                         f"prefix {tuner_cls.prefix!r} (they name the tensors in files)")


def _same_or_set(cls: type, attr: str, peft_type: str) -> None:
    current = cls.__dict__.get(attr, "")  # not inherited: a subclass may be another method
    if current and current != peft_type:
        raise ValueError(f"{cls.__name__}.{attr} is {current!r}, not {peft_type!r}")
    setattr(cls, attr, peft_type)


def register_method(peft_type: str, config_cls: type[PeftConfig], tuner_cls: type[AdapterModel], *,
                    default_adapter_lr: Optional[float] = None,
                    legacy_ignored_suffixes: tuple[str, ...] = ()) -> Method:
    """Make a method known everywhere: configs, files, ``get_peft_model``, loading and training helpers.

    Call it once, at the end of the method's module.

    Args:
        peft_type: The type string (upper case by convention, e.g. ``"FOURIERFT"``); set as
            ``config_cls.PEFT_TYPE`` and ``tuner_cls.peft_type``.
        config_cls: The config dataclass (a :class:`~fourierft.config.TunerConfig` subclass).
        tuner_cls: The tuner (an :class:`~fourierft.tuner.AdapterModel` subclass) with its layer class.
        default_adapter_lr: Learning rate for the adapter tensors when none is given (``AdapterTrainer``,
            :func:`~fourierft.integrations.optim.resolve_adapter_lr`); ``None``: the trainer's own.
        legacy_ignored_suffixes: Keys older PEFT files hold for this method that carry nothing to load
            (e.g. BOFT's ``.boft_P``); loading skips them and reports them as unexpected keys.

    Returns:
        The registration record.

    Raises:
        ValueError: The type string is taken by another method, or disagrees with the classes.
        TypeError: The classes do not implement the contract (:class:`MethodLayer`, :class:`MethodTuner`).
    """
    if not isinstance(peft_type, str) or not peft_type:
        raise ValueError(f"peft_type must be a non-empty string, got {peft_type!r}")
    _check_classes(peft_type, config_cls, tuner_cls)
    method = Method(peft_type, config_cls, tuner_cls, default_adapter_lr, tuple(legacy_ignored_suffixes))
    known = METHODS.get(peft_type)
    if known is not None and (known.config_cls, known.tuner_cls) != (config_cls, tuner_cls):
        raise ValueError(f"Method type {peft_type!r} is already registered by {known.tuner_cls.__name__}")
    _same_or_set(config_cls, "PEFT_TYPE", peft_type)
    _same_or_set(tuner_cls, "peft_type", peft_type)
    register_config(config_cls)
    METHODS[peft_type] = method
    MODEL_CLASSES[peft_type] = tuner_cls
    DEFAULT_ADAPTER_LR.pop(peft_type, None)
    if default_adapter_lr is not None:
        DEFAULT_ADAPTER_LR[peft_type] = default_adapter_lr
    return method


def type_string(peft_type: Any) -> Any:
    """``peft_type`` as a plain string (an enum member's value), anything else as it is."""
    return getattr(peft_type, "value", peft_type)


def tuner_class(config: PeftConfig) -> type[AdapterModel]:
    """The tuner class of ``config``'s method.

    Raises:
        TypeError: ``config`` is not a fourierft config.
        ValueError: Its ``peft_type`` is not registered.
    """
    if not isinstance(config, PeftConfig):
        raise TypeError(f"Expected a fourierft PeftConfig (e.g. FourierFTConfig), got {type(config).__name__}")
    peft_type = type_string(config.peft_type)
    if peft_type not in MODEL_CLASSES:
        raise ValueError(f"peft_type {config.peft_type!r} is not supported; supported: {sorted(MODEL_CLASSES)}")
    return MODEL_CLASSES[peft_type]


def legacy_ignored_suffixes() -> tuple[str, ...]:
    """Every registered method's legacy file keys that loading skips."""
    return tuple(s for method in METHODS.values() for s in method.legacy_ignored_suffixes)
