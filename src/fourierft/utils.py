"""PEFT's ``peft.utils`` names, so ``from peft.utils import X`` becomes ``from fourierft.utils import X``.

Everything here is re-exported from where it lives; nothing is defined twice, and nothing names a method: the
target-module tables are built for every registered method (:func:`target_modules_mapping`).
"""

import re

from .config import CONFIG_NAME, PeftType, TaskType
from .contract import MODEL_CLASSES
from .modules_to_save import ModulesToSaveWrapper
from .serialization.state_dict import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from .serialization.tensors import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from .targets import DEFAULT_TARGETS
from .tuner import NoMatchingPeftModuleError, PeftError

_MAPPING_NAME = re.compile(r"TRANSFORMERS_MODELS_TO_(\w+)_TARGET_MODULES_MAPPING")


def target_modules_mapping(peft_type: str) -> dict[str, list[str]]:
    """``model_type`` -> default ``target_modules`` of a registered method when a config leaves them ``None``:
    PEFT's table with the method tuner's ``default_target_overrides`` (a copy; editing it changes nothing).

    PEFT's names for it, ``TRANSFORMERS_MODELS_TO_<TYPE>_TARGET_MODULES_MAPPING`` (e.g. ``..._FOURIERFT_...``,
    ``..._BOFT_...``), are attributes of this module for every registered method.

    Raises:
        KeyError: ``peft_type`` is not registered.
    """
    return {**DEFAULT_TARGETS, **MODEL_CLASSES[peft_type].default_target_overrides}


def __getattr__(name: str):
    match = _MAPPING_NAME.fullmatch(name)
    if match and match.group(1) in MODEL_CLASSES:
        return target_modules_mapping(match.group(1))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {f"TRANSFORMERS_MODELS_TO_{t}_TARGET_MODULES_MAPPING" for t in MODEL_CLASSES})

__all__ = [
    "CONFIG_NAME",
    "ModulesToSaveWrapper",
    "NoMatchingPeftModuleError",
    "PeftError",
    "PeftType",
    "SAFETENSORS_WEIGHTS_NAME",
    "TRANSFORMERS_MODELS_TO_BOFT_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING",
    "TaskType",
    "WEIGHTS_NAME",
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "target_modules_mapping",
]
