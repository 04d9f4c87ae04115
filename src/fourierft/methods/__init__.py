"""Adapter methods. Each is one module that ends with one :func:`~fourierft.contract.register_method` call;
adding a built-in method is one import line here."""

from ..contract import MODEL_CLASSES
from .boft import BOFTConfig, BOFTConv2d, BOFTLinear, BOFTModel
from .fourierft import FourierFTConfig, FourierFTLayer, FourierFTLinear, FourierFTModel
from .fourierft_layers import FourierFTConv2d, FourierFTEmbedding

__all__ = ["BOFTConfig", "BOFTConv2d", "BOFTLinear", "BOFTModel", "FourierFTConfig", "FourierFTConv2d",
           "FourierFTEmbedding", "FourierFTLayer", "FourierFTLinear", "FourierFTModel", "MODEL_CLASSES"]
