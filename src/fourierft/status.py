"""Adapter status reports with PEFT's dataclasses: :func:`get_layer_status` and :func:`get_model_status`.

Values follow PEFT's rules (``"irregular"`` where layers disagree); ``module_type`` is the layer's repr
name, or the PEFT class name its method gives it (the layer class's ``peft_module_type``, e.g. BOFT's
``boft.Linear`` for ``BOFTLinear``).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
from torch import nn
from transformers import PreTrainedModel

from .layer import AdapterLayer
from .modules_to_save import ModulesToSaveWrapper
from .tuner import AdapterModel

__all__ = ["TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status"]

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    """One adapter layer's state (PEFT's fields)."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str]


@dataclass
class TunerModelStatus:
    """The model's adapter state (PEFT's fields); ``"irregular"`` where layers disagree."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[Optional[str], Irregular]


def _agree(values: list) -> Union[bool, Irregular]:
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _adapter_tensors(module: nn.Module) -> dict[str, list[torch.Tensor]]:
    if isinstance(module, AdapterLayer):
        return {n: [p for _, p in module.named_adapter_tensors(n)] for n in module.adapter_names()}
    return {n: list(m.parameters()) for n, m in module.modules_to_save.items()}


def _layer_status(name: str, module: nn.Module) -> TunerLayerStatus:
    tensors = _adapter_tensors(module)
    if isinstance(module, AdapterLayer):
        enabled, active, merged = not module.disable_adapters, module.active_adapters, list(module.merged_adapters)
    else:
        enabled, merged = not module._disable_adapters, []
        active = [module.active_adapter] if module.active_adapter is not None else []
    backend = getattr(module, "quantization_backend", None)
    return TunerLayerStatus(
        name=name,
        module_type=getattr(module, "peft_module_type", None) or repr(module).partition("(")[0],
        enabled=enabled,
        active_adapters=active,
        merged_adapters=merged,
        requires_grad={k: _agree([p.requires_grad for p in v]) for k, v in tensors.items() if v},
        available_adapters=sorted(tensors),
        devices={k: sorted({p.device.type for p in v}) for k, v in tensors.items()},
        quantization_backend=getattr(backend, "backend_name", None),
    )


def _is_peft_model(model: nn.Module) -> bool:
    return isinstance(getattr(model, "base_model", None), AdapterModel) and not isinstance(model, AdapterModel)


def _tuner_of(model: nn.Module) -> nn.Module:
    return model.base_model if _is_peft_model(model) else model


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of every adapter layer and ``modules_to_save`` wrapper, in module order.

    Raises:
        ValueError: The model holds no adapter layer.
    """
    status = [_layer_status(name, m) for name, m in _tuner_of(model).named_modules()
              if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))]
    if not status:
        raise ValueError("No adapter layers found in the model, please ensure that it's a PEFT model or that you "
                         "have PEFT adapters injected in the model.")
    return status


def _counts(model: nn.Module) -> tuple[int, int]:
    trainable = total = 0
    for param in model.parameters():
        count = param.ds_numel if hasattr(param, "ds_numel") else param.numel()
        total += count
        trainable += count if param.requires_grad else 0
    return trainable, total


def _model_identity(model: nn.Module) -> tuple[str, str, dict]:
    if _is_peft_model(model):
        types = {k: str(getattr(c.peft_type, "value", c.peft_type)) for k, c in model.peft_config.items()}
        return type(model.get_base_model()).__name__, type(model.base_model).__name__, types
    return (type(model).__name__ if isinstance(model, PreTrainedModel) else "other"), "None", {}


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The adapter state of the whole model, folded over :func:`get_layer_status` as PEFT does."""
    base_type, adapter_type, peft_types = _model_identity(model)
    trainable, total = _counts(model)
    layers = get_layer_status(model)
    actives = {tuple(s.active_adapters) for s in layers}
    merged_any = sorted(set().union(*(s.merged_adapters for s in layers)))
    merged_ok = all(not (set(s.available_adapters) - set(s.merged_adapters)) & set(merged_any) for s in layers)
    grads, devices = collections.defaultdict(list), collections.defaultdict(set)
    for s in layers:
        for k, v in s.requires_grad.items():
            grads[k].append(v)
        for k, v in s.devices.items():
            devices[k].update(v)
    enabled = {s.enabled for s in layers}
    backends = {s.quantization_backend for s in layers}
    return TunerModelStatus(
        base_model_type=base_type, adapter_model_type=adapter_type, peft_types=peft_types,
        trainable_params=trainable, total_params=total, num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(actives.pop()) if len(actives) == 1 else ("irregular" if actives else []),
        merged_adapters=merged_any if merged_ok else "irregular",
        requires_grad={k: _agree(v) for k, v in grads.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={k: sorted(v) for k, v in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )
