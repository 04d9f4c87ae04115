"""Optimizer parameter groups: adapter tensors at their own learning rates, everything else at another.

FourierFT's spectral coefficients need a far larger step than a classification head: the paper trains the
spectrum at 10 to 100 times the head's learning rate (RoBERTa-base on GLUE: 0.05 to 0.12 for the spectrum,
0.001 to 0.011 for the head), and one shared small learning rate (1e-4, say) leaves the spectrum where it
started. How large depends on the layer's width (:mod:`fourierft.integrations.spectrum_lr`), so by default
each FourierFT layer shape gets its own rate. :func:`adapter_param_groups` splits a model's trainable tensors
accordingly; it works with any ``torch.optim`` optimizer and any training loop::

    optimizer = torch.optim.AdamW(adapter_param_groups(model, head_lr=1e-3))

Adapter tensors are found structurally (the tensors of every adapter layer), never by name.
"""

from __future__ import annotations

import logging
from typing import Optional

from torch import nn

from ..contract import DEFAULT_ADAPTER_LR, type_string
from ..layer import AdapterLayer
from .spectrum_lr import SPECTRUM_STEP, describe, spectra, spectrum_lr, warn_slow_spectra

logger = logging.getLogger(__name__)


def adapter_tensor_ids(model: nn.Module) -> set[int]:
    """``id`` of every adapter tensor (all adapters, trainable or not) in ``model``."""
    ids = set()
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            for name in module.adapter_names():
                ids.update(id(p) for _, p in module.named_adapter_tensors(name))
    return ids


def _no_decay(module: nn.Module, param_name: str) -> bool:
    return param_name == "bias" or "norm" in type(module).__name__.lower()


def adapter_param_groups(
    model: nn.Module,
    adapter_lr: Optional[float] = None,
    head_lr: Optional[float] = None,
    weight_decay: float = 0.0,
    adapter_weight_decay: float = 0.0,
    spectrum_step: float = SPECTRUM_STEP,
    check_lr: bool = True,
) -> list[dict]:
    """Split ``model``'s trainable tensors into optimizer parameter groups.

    With ``adapter_lr`` left unset, every FourierFT spectrum gets the learning rate its layer needs
    (:func:`~fourierft.integrations.spectrum_lr.spectrum_lr`: proportional to ``d_out * sqrt(d_in)`` and
    to ``1 / (scaling * sqrt(n_frequency))``), one group per layer shape, so a 4096-wide layer trains as fast
    as a 384-wide one and a model's wide feed-forward layers as fast as its attention projections.

    Args:
        model: A :class:`~fourierft.PeftModel`, or any model with adapter layers injected.
        adapter_lr: One learning rate for every adapter tensor (e.g. ``fourierft_spectrum``, ``boft_R``).
            Default: per layer for FourierFT spectra (see above); other adapter tensors get their method's
            registered default (:data:`~fourierft.contract.DEFAULT_ADAPTER_LR`), else ``head_lr``. A given
            ``adapter_lr`` ten or more times below what a FourierFT layer needs is warned about once.
        head_lr: Learning rate of every other trainable tensor: ``modules_to_save`` copies such as a
            classification head, trainable biases (``bias="all"``), anything the user unfroze. Required when
            there are such tensors.
        weight_decay: Decoupled weight decay of the other trainable weights; never applied to biases and
            normalisation layers.
        adapter_weight_decay: Weight decay of the adapter tensors (default none: decay pulls a FourierFT
            spectrum towards zero and a BOFT scale ``boft_s`` away from its neutral value of one).
        spectrum_step: With ``adapter_lr`` unset: the relative change of each FourierFT layer's weight per
            step that its learning rate aims at (default
            :data:`~fourierft.integrations.spectrum_lr.SPECTRUM_STEP`).
        check_lr: Warn when a given ``adapter_lr`` is far too small for a FourierFT layer. ``AdapterTrainer``
            turns it off: its :class:`~fourierft.integrations.callbacks.SpectrumLRCallback` checks the
            optimizer it ends up with, once.

    Returns:
        Groups, each a dict with ``params``, ``lr``, ``weight_decay`` and a ``name``: ``"adapter"`` (adapter
        tensors at one learning rate), ``"fourierft_spectrum 576x576 n=1000 scaling=150"`` (spectra at their
        layer's rate, with ``adapter_lr`` unset), ``"head"`` and ``"head_no_decay"``; empty groups are left
        out. Frozen tensors are in none, and no tensor is in two.

    Raises:
        ValueError: A learning rate is not positive, nothing in ``model`` is trainable, or ``head_lr`` is
            missing while the model has trainable tensors outside its adapters.
    """
    for label, lr in (("adapter_lr", adapter_lr), ("head_lr", head_lr)):
        if lr is not None and not lr > 0:
            raise ValueError(f"{label} must be a positive learning rate, got {lr!r}")
    adapter_ids = adapter_tensor_ids(model)
    per_layer = {} if adapter_lr is not None else _spectrum_groups(model, spectrum_step)
    groups: dict[str, list[nn.Parameter]] = {"adapter": [], "head": [], "head_no_decay": []}
    seen: set[int] = set()
    for module in model.modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if id(param) in per_layer:
                continue
            if id(param) in adapter_ids:
                groups["adapter"].append(param)
            else:
                groups["head_no_decay" if _no_decay(module, param_name) else "head"].append(param)
    if not seen:
        raise ValueError("The model has no trainable parameters")
    if head_lr is None and (groups["head"] or groups["head_no_decay"]):
        raise ValueError("head_lr is required: the model has trainable tensors outside its adapters "
                         "(a head, modules_to_save, biases)")
    fixed_lr = adapter_lr if adapter_lr is not None else resolve_adapter_lr(model, None, head_lr)
    if groups["adapter"] and fixed_lr is None:
        raise ValueError("adapter_lr is required: this model's adapter tensors have no default learning rate")
    settings = {"adapter": (fixed_lr, adapter_weight_decay), "head": (head_lr, weight_decay),
                "head_no_decay": (head_lr, 0.0)}
    result = [{"params": params, "lr": lr, "weight_decay": adapter_weight_decay, "name": name}
              for name, (lr, params) in _merge_spectrum_groups(per_layer).items()]
    result += [{"params": params, "lr": settings[name][0], "weight_decay": settings[name][1], "name": name}
               for name, params in groups.items() if params]
    if adapter_lr is not None and check_lr:
        lrs = {id(p): adapter_lr for p in groups["adapter"]}
        warn_slow_spectra(model, lambda p: lrs.get(id(p)))
    logger.info("Parameter groups: %s", ", ".join(
        f"{g['name']} ({sum(p.numel() for p in g['params']):,d} params, lr={g['lr']:g})" for g in result))
    return result


def _spectrum_groups(model: nn.Module, step: float) -> dict[int, tuple[str, float, nn.Parameter]]:
    """``id(spectrum) -> (group name, lr, spectrum)`` for every trainable FourierFT spectrum."""
    return {id(p): (f"fourierft_spectrum {describe(layer, name)}", spectrum_lr(layer, name, step), p)
            for _, layer, name, p in spectra(model)}


def _merge_spectrum_groups(per_layer: dict) -> dict[str, tuple[float, list[nn.Parameter]]]:
    merged: dict[str, tuple[float, list[nn.Parameter]]] = {}
    for name, lr, param in per_layer.values():
        merged.setdefault(name, (lr, []))[1].append(param)
    return merged


def resolve_adapter_lr(model: nn.Module, adapter_lr: Optional[float], fallback: Optional[float]) -> Optional[float]:
    """``adapter_lr`` if given, else the default its method registered (``default_adapter_lr`` of
    :func:`~fourierft.contract.register_method`, kept in :data:`~fourierft.contract.DEFAULT_ADAPTER_LR`), else
    ``fallback``."""
    if adapter_lr is not None:
        return adapter_lr
    configs = getattr(model, "peft_config", None) or {}
    types = {type_string(c.peft_type) for c in configs.values()}
    defaults = [DEFAULT_ADAPTER_LR[t] for t in types if t in DEFAULT_ADAPTER_LR]
    return defaults[0] if len(defaults) == 1 and len(types) == 1 else fallback
