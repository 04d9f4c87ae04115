"""PEFT's ``peft.utils`` names for these two methods, so ``from peft.utils import X`` becomes
``from fourierft.utils import X``.

Everything here is re-exported from where it lives; nothing is defined twice.
"""

from .config import CONFIG_NAME, PeftType, TaskType
from .modules_to_save import ModulesToSaveWrapper
from .methods import BOFTModel, FourierFTModel
from .serialization.state_dict import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from .serialization.tensors import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from .targets import DEFAULT_TARGETS
from .tuner import NoMatchingPeftModuleError, PeftError

#: ``model_type`` -> default ``target_modules`` when a config leaves them ``None`` (a copy; editing it changes nothing).
TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING = {**DEFAULT_TARGETS, **FourierFTModel.default_target_overrides}
TRANSFORMERS_MODELS_TO_BOFT_TARGET_MODULES_MAPPING = {**DEFAULT_TARGETS, **BOFTModel.default_target_overrides}

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
]
