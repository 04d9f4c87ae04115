"""Compatibility module: state dicts and weights files now live in :mod:`fourierft.serialization`.

Kept so that ``from fourierft.checkpoint import ...`` written for earlier versions still works.
"""

from .serialization.folders import atomic_write_dir
from .contract import legacy_ignored_suffixes
from .serialization.state_dict import (
    FINGERPRINT_KEY,
    PEFT_PREFIX,
    LoadResult,
    adapter_key_map,
    derived_fingerprint,
    get_base_model_state_dict,
    get_peft_model_state_dict,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from .serialization.tensors import (
    CHECKSUM_KEY,
    SAFETENSORS_WEIGHTS_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    load_tensors,
    save_tensors,
    tensors_checksum,
)

__all__ = [
    "CHECKSUM_KEY", "FINGERPRINT_KEY", "LEGACY_IGNORED_SUFFIXES", "PEFT_PREFIX", "SAFETENSORS_WEIGHTS_NAME",
    "WEIGHTS_NAME", "CheckpointError", "LoadResult", "adapter_key_map", "atomic_write_dir", "derived_fingerprint",
    "get_base_model_state_dict", "get_peft_model_state_dict", "load_tensors", "save_tensors",
    "set_base_model_state_dict", "set_peft_model_state_dict", "tensors_checksum",
]


def __getattr__(name: str):
    if name == "LEGACY_IGNORED_SUFFIXES":  # now registered per method
        return legacy_ignored_suffixes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
