"""Adapter configurations: the shared ``PeftConfig`` base, JSON in/out and PEFT's field names.

A config is a plain dataclass. Its JSON form (``adapter_config.json``) uses exactly PEFT's keys so that
adapters move both ways between ``fourierft`` and ``peft``. Method configs (``FourierFTConfig``,
``BOFTConfig``) subclass :class:`PeftConfig` and register themselves in :data:`CONFIG_CLASSES`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import warnings
from typing import Any, ClassVar, Optional, Union

from ._version import FORMAT_VERSION
from .hub import HUB_KWARGS, resolve_file
from .targets import validate_tuner_fields

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"

#: ``peft_type`` -> config class; filled by :func:`register_config`.
CONFIG_CLASSES: dict[str, type["PeftConfig"]] = {}


class TaskType(str, enum.Enum):
    """Task types understood by :func:`fourierft.get_peft_model` (PEFT's values)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(str, enum.Enum):
    """Adapter methods implemented here (PEFT's values)."""

    FOURIERFT = "FOURIERFT"
    BOFT = "BOFT"


def _as_peft_type(value: str) -> Union[str, "PeftType"]:
    """``value`` as a :class:`PeftType` member (PEFT's type for ``config.peft_type``); a method registered
    from outside the package, with a type string the enum does not list, keeps its plain string."""
    try:
        return PeftType(value)
    except ValueError:
        return value


def register_config(cls: type["PeftConfig"]) -> type["PeftConfig"]:
    """Class decorator: make ``cls`` loadable by its ``PEFT_TYPE``."""
    CONFIG_CLASSES[cls.PEFT_TYPE] = cls
    return cls


def _load_json(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        try:
            data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


@dataclasses.dataclass
class PeftConfig:
    """Fields shared by every adapter config, with PEFT's names and defaults.

    Args:
        task_type: One of :class:`TaskType` or ``None``; selects the ``PeftModelFor*`` class.
        peft_type: Set by the subclass; any value passed in is overwritten.
        auto_mapping: Base-model class info, filled when saving a model with no task type.
        peft_version: Version of the file format's writer, filled automatically.
        base_model_name_or_path: The base model's name, filled by ``get_peft_model``.
        revision: Revision of the base model.
        inference_mode: Freeze the adapter (set when loading with ``is_trainable=False``).
    """

    PEFT_TYPE: ClassVar[str] = ""
    #: Our own fields that PEFT does not know; written to JSON only when not ``None``.
    EXTENSION_FIELDS: ClassVar[tuple[str, ...]] = ()

    task_type: Optional[Union[str, TaskType]] = None
    peft_type: Optional[Union[str, PeftType]] = None
    auto_mapping: Optional[dict] = None
    peft_version: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if self.PEFT_TYPE:
            self.peft_type = _as_peft_type(self.PEFT_TYPE)
        if self.peft_version is None:
            self.peft_version = FORMAT_VERSION
        if not isinstance(self.inference_mode, bool):
            raise ValueError(f"inference_mode must be a bool, got {self.inference_mode!r}")
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        valid = [t.value for t in TaskType]
        if self.task_type is not None and self.task_type not in valid:
            raise ValueError(
                f"Invalid task type: '{self.task_type}'. Must be one of the following task types: "
                f"{', '.join(valid)}."
            )

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict with PEFT's keys (sets become sorted lists)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self.EXTENSION_FIELDS and value is None:
                continue
            if isinstance(value, enum.Enum):
                value = value.value
            if isinstance(value, (set, frozenset)):
                value = sorted(value)
            elif isinstance(value, tuple):
                value = list(value)
            if f.name == "modules_to_save" and isinstance(value, list):
                # PEFT appends the task heads on every load, so its files grow by "classifier, score" each
                # round trip; the list means a set of names, so it is written once each, in order.
                value = list(dict.fromkeys(value))
            out[f.name] = value
        return out

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write ``adapter_config.json`` into ``save_directory``."""
        if os.path.isfile(save_directory):
            raise AssertionError(f"Provided path ({save_directory}) should be a directory, not a file")
        os.makedirs(save_directory, exist_ok=True)
        data = self.to_dict()
        with open(os.path.join(save_directory, CONFIG_NAME), "w", encoding="utf-8") as fh:
            fh.write(json.dumps(data, indent=2, sort_keys=True))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PeftConfig":
        """Build a config from a dict, choosing the class by ``peft_type`` and ignoring unknown keys."""
        if not isinstance(data, dict):
            raise TypeError(f"An adapter config must be a dict, got {type(data).__name__}")
        data = dict(data)
        if "peft_type" not in data:
            raise TypeError(
                f"The {cls.__name__} config that is trying to be loaded is missing required keys: {{'peft_type'}}."
            )
        target = cls
        if not cls.PEFT_TYPE or cls.PEFT_TYPE != data["peft_type"]:
            peft_type = data["peft_type"]
            if not isinstance(peft_type, str) or peft_type not in CONFIG_CLASSES:
                raise ValueError(
                    f"peft_type {peft_type!r} is not supported by fourierft; supported: {sorted(CONFIG_CLASSES)}"
                )
            target = CONFIG_CLASSES[peft_type]
        if "runtime_config" in data:
            warnings.warn("The configuration file contains a `runtime_config` key. This is ignored. Runtime "
                          "configurations are only valid at runtime.")
            data.pop("runtime_config")
        names = {f.name for f in dataclasses.fields(target)}
        unknown = [k for k in data if k not in names]
        if unknown:
            warnings.warn(
                f"Unexpected keyword arguments {sorted(unknown)} for class {target.__name__}, these are ignored. "
                "This probably means that the configuration file was saved by a newer version of the library."
            )
        config = target(**{k: v for k, v in data.items() if k in names})
        # files from peft <= 0.20 carry no peft_version (the rule: serialization.state_dict.is_legacy_format)
        config._legacy_format = "peft_version" not in data
        return config

    @classmethod
    def from_json_file(cls, path_json_file: str) -> dict[str, Any]:
        """Read a config JSON file into a dict (PEFT's semantics: returns the dict, not a config).

        Args:
            path_json_file: Path of the JSON file.
        """
        data = _load_json(path_json_file)
        if "runtime_config" in data:
            warnings.warn("The configuration file contains a `runtime_config` key. This is ignored. Runtime "
                          "configurations are only valid at runtime.")
            del data["runtime_config"]
        return data

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs
    ) -> "PeftConfig":
        """Load ``adapter_config.json`` from a directory or a Hub repo id (its cache honoured offline).

        Args:
            pretrained_model_name_or_path: A local directory or a Hugging Face Hub repo id.
            subfolder: Optional sub-directory holding the config.
            **kwargs: ``revision``, ``cache_dir``, ``token``... for the Hub; other keys override fields.

        Raises:
            FileNotFoundError: No config could be found.
            TypeError: The file has no ``peft_type``.
        """
        overrides = {k: v for k, v in kwargs.items() if k not in HUB_KWARGS}
        path = resolve_file(pretrained_model_name_or_path, (CONFIG_NAME,), subfolder, **kwargs)
        data = _load_json(path)
        data.update(overrides)
        return cls.from_dict(data)

    @classmethod
    def from_peft_type(cls, **kwargs) -> "PeftConfig":
        """Build the config class named by ``kwargs['peft_type']``."""
        return cls.from_dict(kwargs)

    @property
    def is_prompt_learning(self) -> bool:
        """Always ``False``: both methods here are tuners (PEFT's attribute)."""
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        """Always ``False``: neither method is an adaption prompt (PEFT's attribute)."""
        return False

    @classmethod
    def check_kwargs(cls, **kwargs) -> dict[str, Any]:
        """PEFT's hook for checking keyword arguments before a config is built; returns them unchanged."""
        return kwargs


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """Build a config from a dict holding ``peft_type`` (PEFT's ``get_peft_config``)."""
    return PeftConfig.from_dict(config_dict)


@dataclasses.dataclass
class TunerConfig(PeftConfig):
    """Fields shared by layer-replacing methods: which modules to adapt and what else to train.

    Args:
        target_modules: Module names (exact or dotted suffix) or one regex (full match); ``None`` picks
            the default for the model type; ``"all-linear"`` picks every linear layer but the output head.
        exclude_modules: Names or one regex never to adapt.
        fan_in_fan_out: True when the target stores its weight as ``(in, out)`` (transformers ``Conv1D``);
            corrected automatically, with a warning, to match the layer type.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"<method>_only"`` (train the adapted layers'
            biases).
        modules_to_save: Extra modules trained and saved in full (e.g. a classifier head).
        layers_to_transform: Layer indices to adapt (with ``layers_pattern`` naming the layer list).
        layers_pattern: Name(s) of the module list holding the layers, e.g. ``"layers"``.
        init_weights: Method-specific initialisation switch.
    """

    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    init_weights: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_tuner_fields(self)
        self._check_bias_owner()

    def _check_bias_owner(self) -> None:
        """``"<method>_only"`` must not name another registered method (``bias="boft_only"`` on FourierFT)."""
        owner = self.bias[: -len("_only")].upper() if self.bias.endswith("_only") else ""
        if owner and self.PEFT_TYPE and owner != self.PEFT_TYPE and owner in CONFIG_CLASSES:
            raise ValueError(f"bias={self.bias!r} is another method's option; a {self.PEFT_TYPE} adapter takes "
                             f"'none', 'all' or '{self.PEFT_TYPE.lower()}_only'")
