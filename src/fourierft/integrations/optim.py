"""Optimizer parameter groups with one learning rate for adapter tensors and another for everything else.

FourierFT's spectral coefficients need a far larger step than a classification head: the paper trains the
spectrum at 10 to 100 times the head's learning rate (RoBERTa-base on GLUE: 0.05 to 0.12 for the spectrum,
0.001 to 0.011 for the head), and one shared small learning rate (1e-4, say) leaves the spectrum where it
started. :func:`adapter_param_groups` splits a model's trainable tensors accordingly; it works with any
``torch.optim`` optimizer and any training loop::

    optimizer = torch.optim.AdamW(adapter_param_groups(model, adapter_lr=5e-2, head_lr=1e-3))

Adapter tensors are found structurally (the tensors of every adapter layer), never by name.
"""

from __future__ import annotations

import logging
from typing import Optional

from torch import nn

from ..contract import DEFAULT_ADAPTER_LR, type_string
from ..layer import AdapterLayer

logger = logging.getLogger(__name__)


def adapter_tensor_ids(model: nn.Module) -> set[int]:
    """``id`` of every adapter tensor (all adapters, trainable or not) in ``model``."""
    ids = set()
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            for name in module.adapter_names():
                ids.update(id(p) for _, p in module.named_adapter_tensors(name))
    return ids


adapter_parameter_ids = adapter_tensor_ids  # earlier name


def _no_decay(module: nn.Module, param_name: str) -> bool:
    return param_name == "bias" or "norm" in type(module).__name__.lower()


def adapter_param_groups(
    model: nn.Module,
    adapter_lr: float,
    head_lr: float,
    weight_decay: float = 0.0,
    adapter_weight_decay: float = 0.0,
) -> list[dict]:
    """Split ``model``'s trainable tensors into optimizer parameter groups.

    Args:
        model: A :class:`~fourierft.PeftModel`, or any model with adapter layers injected.
        adapter_lr: Learning rate of the adapter tensors (e.g. ``fourierft_spectrum``, ``boft_R``).
        head_lr: Learning rate of every other trainable tensor: ``modules_to_save`` copies such as a
            classification head, trainable biases (``bias="all"``), anything the user unfroze.
        weight_decay: Decoupled weight decay of the other trainable weights; never applied to biases and
            normalisation layers.
        adapter_weight_decay: Weight decay of the adapter tensors (default none: decay pulls a FourierFT
            spectrum towards zero and a BOFT scale ``boft_s`` away from its neutral value of one).

    Returns:
        Up to three groups, each a dict with ``params``, ``lr``, ``weight_decay`` and a ``name``
        (``"adapter"``, ``"head"``, ``"head_no_decay"``); empty groups are left out. Frozen tensors are in
        none, and no tensor is in two.

    Raises:
        ValueError: A learning rate is not positive, or nothing in ``model`` is trainable.
    """
    for label, lr in (("adapter_lr", adapter_lr), ("head_lr", head_lr)):
        if not lr > 0:
            raise ValueError(f"{label} must be a positive learning rate, got {lr!r}")
    adapter_ids = adapter_tensor_ids(model)
    groups: dict[str, list[nn.Parameter]] = {"adapter": [], "head": [], "head_no_decay": []}
    seen: set[int] = set()
    for module in model.modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if id(param) in adapter_ids:
                groups["adapter"].append(param)
            else:
                groups["head_no_decay" if _no_decay(module, param_name) else "head"].append(param)
    if not seen:
        raise ValueError("The model has no trainable parameters")
    settings = {"adapter": (adapter_lr, adapter_weight_decay), "head": (head_lr, weight_decay),
                "head_no_decay": (head_lr, 0.0)}
    result = [{"params": params, "lr": settings[name][0], "weight_decay": settings[name][1], "name": name}
              for name, params in groups.items() if params]
    logger.info("Parameter groups: %s", ", ".join(
        f"{g['name']} ({sum(p.numel() for p in g['params']):,d} params, lr={g['lr']:g})" for g in result))
    return result


def resolve_adapter_lr(model: nn.Module, adapter_lr: Optional[float], fallback: float) -> float:
    """``adapter_lr`` if given, else the default its method registered (``default_adapter_lr`` of
    :func:`~fourierft.contract.register_method`, kept in :data:`~fourierft.contract.DEFAULT_ADAPTER_LR`), else
    ``fallback``."""
    if adapter_lr is not None:
        return adapter_lr
    configs = getattr(model, "peft_config", None) or {}
    types = {type_string(c.peft_type) for c in configs.values()}
    defaults = [DEFAULT_ADAPTER_LR[t] for t in types if t in DEFAULT_ADAPTER_LR]
    return defaults[0] if len(defaults) == 1 and len(types) == 1 else fallback
