"""Adapter methods. Each is one module; registering a method is one entry in ``_MODEL_CLASSES``."""

from .boft import BOFTConfig, BOFTConv2d, BOFTLinear, BOFTModel
from .fourierft import FourierFTConfig, FourierFTLinear, FourierFTModel
from .fourierft_layers import FourierFTConv2d, FourierFTEmbedding  # registers them with FourierFTModel

_MODEL_CLASSES = (FourierFTModel, BOFTModel)

#: ``peft_type`` -> tuner class.
MODEL_CLASSES = {cls.peft_type: cls for cls in _MODEL_CLASSES}

__all__ = ["BOFTConfig", "BOFTConv2d", "BOFTLinear", "BOFTModel", "FourierFTConfig", "FourierFTConv2d",
           "FourierFTEmbedding", "FourierFTLinear", "FourierFTModel", "MODEL_CLASSES"]
