"""PEFT's ``peft.utils`` names for these two methods, so ``from peft.utils import X`` becomes
``from fourierft.utils import X``.

Everything here is re-exported from where it lives; nothing is defined twice.
"""

from .checkpoint import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, get_peft_model_state_dict, set_peft_model_state_dict
from .config import CONFIG_NAME, PeftType, TaskType
from .layer import ModulesToSaveWrapper

__all__ = [
    "CONFIG_NAME",
    "ModulesToSaveWrapper",
    "PeftType",
    "SAFETENSORS_WEIGHTS_NAME",
    "TaskType",
    "WEIGHTS_NAME",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
]
