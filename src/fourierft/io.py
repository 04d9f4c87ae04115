"""Compatibility module: adapter folders now live in :mod:`fourierft.serialization.folders`.

Kept so that ``from fourierft.io import ...`` written for earlier versions still works.
"""

from .serialization.folders import adapter_dir, load_config, load_weights_file, save_adapters

__all__ = ["adapter_dir", "load_config", "load_weights_file", "save_adapters"]
