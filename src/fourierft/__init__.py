"""fourierft: fast, PEFT-compatible FourierFT and BOFT adapters for PyTorch and transformers.

Switch from PEFT by changing one import line::

    from fourierft import FourierFTConfig, get_peft_model
"""

from ._version import __version__
from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .config import PeftConfig, PeftType, TaskType, TunerConfig, get_peft_config
from .contract import register_method
from .hotswap import HotswapError, hotswap_adapter, prepare_model_for_hotswap
from .layer import AdapterLayer
from .modules_to_save import ModulesToSaveWrapper
from .ops.scope import cached_merged_weights
from .integrations.optim import adapter_param_groups
from .methods import (BOFTConfig, BOFTConv2d, BOFTLinear, BOFTModel, FourierFTConfig, FourierFTConv2d,
                      FourierFTEmbedding, FourierFTLayer, FourierFTLinear, FourierFTModel)
from .routes import explain_routes
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
    inject_adapter_in_model,
)
from .functional import load_peft_weights, prepare_model_for_kbit_training
from .lora_conversion import convert_to_lora, save_as_lora
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from .serialization.state_dict import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from .serialization.tensors import CheckpointError
from .tuner import AdapterModel, NoMatchingPeftModuleError, PeftError

__all__ = [
    "__version__",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "AdapterLayer",
    "AdapterModel",
    "AdapterTrainer",
    "BOFTConfig",
    "BOFTConv2d",
    "BOFTLinear",
    "BOFTModel",
    "CheckpointError",
    "FourierFTConfig",
    "FourierFTConv2d",
    "FourierFTEmbedding",
    "FourierFTLayer",
    "FourierFTLinear",
    "FourierFTModel",
    "HotswapError",
    "ModulesToSaveWrapper",
    "NoMatchingPeftModuleError",
    "PeftConfig",
    "PeftError",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "SpectrumLRCallback",
    "TaskType",
    "TunerConfig",
    "TunerLayerStatus",
    "TunerModelStatus",
    "adapter_param_groups",
    "cached_merged_weights",
    "convert_to_lora",
    "explain_routes",
    "get_base_model_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_peft_config",
    "get_peft_model",
    "get_peft_model_state_dict",
    "hotswap_adapter",
    "inject_adapter_in_model",
    "load_peft_weights",
    "prepare_model_for_hotswap",
    "register_method",
    "save_as_lora",
    "set_base_model_state_dict",
    "prepare_model_for_kbit_training",
    "set_peft_model_state_dict",
]


def __getattr__(name: str):
    # AdapterTrainer imports transformers.Trainer (seconds); load it only when asked for.
    if name == "AdapterTrainer":
        from .integrations.trainer import AdapterTrainer

        return AdapterTrainer
    if name == "SpectrumLRCallback":
        from .integrations.callbacks import SpectrumLRCallback

        return SpectrumLRCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
