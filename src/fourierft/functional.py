"""PEFT's functional API for models holding FourierFT or BOFT layers, with or without a ``PeftModel``.

The same names, signatures and results as ``peft.functional`` (``cast_adapter_dtype``, ``delete_adapter``,
``get_peft_model_state_dict``, ``inject_adapter_in_model``, ``set_adapter``, ``set_peft_model_state_dict``,
``set_requires_grad``) and as PEFT's ``load_peft_weights``, ``get_layer_status`` / ``get_model_status``
(the dataclasses have PEFT's fields) and ``prepare_model_for_kbit_training``. These functions act on the
adapter layers they find in any ``nn.Module``, which is what integrations (diffusers, transformers) use
after :func:`inject_adapter_in_model`.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .layer import AdapterLayer
from .modules_to_save import ModulesToSaveWrapper
from .peft_model import inject_adapter_in_model
from .serialization.folders import apply_key_mapping, load_weights_file
from .serialization.state_dict import get_peft_model_state_dict, set_peft_model_state_dict
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status

logger = logging.getLogger(__name__)

__all__ = [
    "TunerLayerStatus", "TunerModelStatus", "cast_adapter_dtype", "delete_adapter", "get_layer_status",
    "get_model_status", "get_peft_model_state_dict", "inject_adapter_in_model", "load_peft_weights",
    "prepare_model_for_kbit_training", "set_adapter", "set_peft_model_state_dict", "set_requires_grad",
    "set_training",
]

_UPCAST = (torch.float16, torch.bfloat16)


def _names(adapter_names: Union[str, Sequence[str]]) -> list[str]:
    return [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)


# ---------------------------------------------------------------------------------------------- adapters
def cast_adapter_dtype(model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
    """Upcast adapter ``adapter_name``'s float16/bfloat16 tensors to float32 (new ``Parameter`` objects, as PEFT).

    Args:
        model: Any module holding adapter layers.
        adapter_name: The adapter to cast.
        autocast_adapter_dtype: ``False`` does nothing (PEFT's switch).
    """
    if not autocast_adapter_dtype:
        return
    for module in model.modules():
        if not isinstance(module, AdapterLayer):
            continue
        for attr in module.adapter_layer_names:
            store = getattr(module, attr)
            param = store[adapter_name] if adapter_name in store else None
            if param is not None and param.dtype in _UPCAST:
                store[adapter_name] = nn.Parameter(param.detach().float(), requires_grad=param.requires_grad)


def set_adapter(model: nn.Module, adapter_name: Union[str, list[str]], inference_mode: bool = False,
                layer_cls: type = AdapterLayer) -> None:
    """Activate ``adapter_name`` on every adapter layer and ``modules_to_save`` wrapper of ``model``.

    Merged layers are unmerged first (with PEFT's warning). Activated tensors train unless ``inference_mode``.
    """
    names = _names(adapter_name)
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            owned = [n for n in names if n in module.modules_to_save]
            module.set_adapter(owned[:1], inference_mode=inference_mode)
    for module in model.modules():
        if isinstance(module, layer_cls):
            if module.merged:
                logger.warning("Adapter cannot be set when the model is merged. Unmerging the model first.")
                module.unmerge()
            module.set_adapter(names, inference_mode=inference_mode)


def set_requires_grad(model: nn.Module, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
    """Turn gradients on or off for the given adapters' tensors and ``modules_to_save`` copies."""
    names = _names(adapter_names)
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            for name in names:
                for _, param in module.named_adapter_tensors(name):
                    param.requires_grad_(requires_grad)
        elif isinstance(module, ModulesToSaveWrapper):
            for name in names:
                if name in module.modules_to_save:
                    module.modules_to_save[name].requires_grad_(requires_grad)


def set_training(model: nn.Module, adapter_names: Union[str, Sequence[str]], training: bool = True) -> None:
    """Put the given adapters' own submodules in training (or eval) mode (PEFT 0.22's ``set_training``).

    These are the ``modules_to_save`` copies and any per-adapter ``nn.ModuleDict`` entry of an adapter layer.
    FourierFT has none; BOFT's block dropout follows its layer's ``train()``/``eval()`` mode, since it is a rate
    per adapter here rather than a dropout module.
    """
    names = _names(adapter_names)
    for module in model.modules():
        if not isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            continue
        for attr in module.adapter_layer_names + module.other_param_names:
            store = getattr(module, attr, None)
            if isinstance(store, nn.ModuleDict):
                for name in names:
                    if name in store:
                        store[name].train(training)


def delete_adapter(model: nn.Module, adapter_name: str, prefix: str,
                   layer_cls: type = AdapterLayer) -> Optional[list[str]]:
    """Delete ``adapter_name`` from every adapter layer (not from ``peft_config``, as in PEFT).

    Args:
        model: Any module holding adapter layers.
        adapter_name: The adapter to delete.
        prefix: The method's parameter prefix (``"fourierft_"``, ``"boft_"``); modules whose name contains
            it are skipped.
        layer_cls: Only layers of this class are touched.

    Returns:
        The active adapters of the first layer after deletion (to pass to :func:`set_adapter`), or
        ``None`` when the model has no such layer.
    """
    merged = [k for k, m in model.named_modules() if isinstance(m, AdapterLayer) and adapter_name in m.merged_adapters]
    if merged:
        raise ValueError(f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them first.")
    new_active = None
    for key, module in model.named_modules():
        if prefix in key or not isinstance(module, layer_cls):
            continue
        was_active = adapter_name in module.active_adapters
        module.delete_adapter(adapter_name)
        if was_active:  # the adapter taking over trains, as after set_adapter (PEFT's layer behaviour)
            module.set_adapter(module.active_adapters)
        if new_active is None:
            new_active = module.active_adapters[:]
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            module.delete_adapter(adapter_name)
            if new_active is not None:
                module.set_adapter([n for n in new_active if n in module.modules_to_save][:1])
    return new_active


# ---------------------------------------------------------------------------------------------- files
def load_peft_weights(model_id: str, device: Optional[str] = None, key_mapping: Optional[dict[str, str]] = None,
                      **hf_hub_download_kwargs) -> dict[str, torch.Tensor]:
    """Read an adapter's weights (``adapter_model.safetensors`` preferred, else a weights-only ``.bin``).

    Args:
        model_id: A local folder or a Hub repo id.
        device: Where to put the tensors; default CUDA when available, else the CPU.
        key_mapping: ``{regex: replacement}`` applied to each key without its ``base_model.model.``
            prefix (first matching pattern wins), as PEFT does.
        **hf_hub_download_kwargs: ``subfolder``, ``revision``, ``token``, ``cache_dir``, ...

    Raises:
        FileNotFoundError: No weights file. CheckpointError: The file is unreadable.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tensors, _ = load_weights_file(model_id, **hf_hub_download_kwargs)
    tensors = {k: v.to(device) for k, v in tensors.items()}
    return apply_key_mapping(tensors, key_mapping)


# ---------------------------------------------------------------------------------------------- k-bit
_QUANT_METHODS = ("gptq", "aqlm", "eetq", "torchao", "hqq")


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    activation_checkpointing_kwargs: Optional[dict] = None,
                                    auto_clear_cache: bool = True, *,
                                    gradient_checkpointing_kwargs: Optional[dict] = None) -> nn.Module:
    """Get a (quantized) transformers model ready for adapter training, as PEFT's function does.

    Freezes every parameter; unless the model is quantized by GPTQ/AQLM/EETQ/torchao/HQQ, upcasts float16
    and bfloat16 parameters (not bitsandbytes 4-bit ones) to float32; for a quantized model, enables
    gradient checkpointing (and input gradients when checkpointing is reentrant).

    Args:
        model: A ``transformers.PreTrainedModel`` (any module for the freezing and casting).
        use_gradient_checkpointing: Enable gradient checkpointing on a quantized model.
        activation_checkpointing_kwargs: Passed to ``gradient_checkpointing_enable`` (PEFT 0.22's name).
        auto_clear_cache: Empty the CUDA cache after upcasting.
        gradient_checkpointing_kwargs: The older name of ``activation_checkpointing_kwargs``, deprecated as in
            PEFT 0.22 (``FutureWarning``); giving both raises ``ValueError``.

    Returns:
        ``model``, changed in place.
    """
    method = getattr(model, "quantization_method", None)
    method = getattr(method, "value", method)
    other_quant = method in _QUANT_METHODS or getattr(model, "hqq_quantized", False)
    kbit = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    if gradient_checkpointing_kwargs and activation_checkpointing_kwargs:
        raise ValueError("Pass activation_checkpointing_kwargs only: gradient_checkpointing_kwargs is its deprecated "
                         "older name")
    if gradient_checkpointing_kwargs:
        warnings.warn("`gradient_checkpointing_kwargs` is deprecated; use `activation_checkpointing_kwargs` (PEFT "
                      "0.22's name)", FutureWarning, stacklevel=2)
    kwargs = dict(activation_checkpointing_kwargs or gradient_checkpointing_kwargs or {})
    for param in model.parameters():
        param.requires_grad = False
    if not other_quant:
        for param in model.parameters():
            if param.dtype in _UPCAST and type(param).__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
    if (kbit or other_quant) and use_gradient_checkpointing:
        _enable_checkpointing(model, kwargs)
    return model


def _enable_checkpointing(model: nn.Module, kwargs: dict) -> None:
    if kwargs.get("use_reentrant", True):  # reentrant checkpointing needs an input that requires grad
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        else:
            model.get_input_embeddings().register_forward_hook(lambda module, args, output: output.requires_grad_(True))
    if "gradient_checkpointing_kwargs" in inspect.signature(model.gradient_checkpointing_enable).parameters:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        if kwargs:
            logger.warning("gradient_checkpointing_kwargs is not supported by this transformers version; ignored")
        model.gradient_checkpointing_enable()
