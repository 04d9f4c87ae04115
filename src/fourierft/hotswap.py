r"""Hot-swapping: replace an adapter's weights in place, so a ``torch.compile``'d model never recompiles.

:func:`hotswap_adapter` copies a new adapter's tensors into the existing parameters (``copy_`` under
``no_grad``): no parameter, buffer or module is created or replaced, no Python attribute a compiled graph
guards on changes, so the compiled graph keeps running, now with the new weights. Everything is validated
before the first copy: a swap that cannot be done raises :class:`HotswapError` and leaves the model as it
was.

What can be swapped in is the method's rule, per layer (the model's adapter defines the geometry): each
adapter layer class says, in :meth:`~fourierft.layer.AdapterLayer.hotswap_values`, which values of its own
tensors make it compute the new adapter, and refuses (``ValueError``) what does not fit. This module only
finds the layers, matches file keys to them, checks what every method shares (type, bias, the adapter's
other tensors) and copies. The built-in rules:

* **FourierFT** (:meth:`~fourierft.methods.fourierft.FourierFTLayer.hotswap_values`): the same seed and band
  and at most as many coefficients (``n' <= n``): the first ``n'`` seeded positions are nested in the
  model's ``n``, so a smaller adapter is zero-padded. A different ``scaling`` is folded into the coefficients,
  because the layer's scaling is a Python float the compiled graph is specialised on.
* **BOFT** (``_BOFTLayer.hotswap_values`` in :mod:`fourierft.methods.boft`): the same blocks and at most as
  many butterfly factors (``m' <= m``); missing factors are ``R = 0``, the identity rotation.
* **Targets**: the new adapter may target a subset of the model's adapter layers (the others become the
  identity, where the method has one: FourierFT ``c = 0``, BOFT ``R = 0, s = 1``), never a layer the model's
  adapter does not have.

:func:`prepare_model_for_hotswap` makes room before compiling: it pads the model's adapter to a larger
size (FourierFT's ``n_frequency``, BOFT's ``boft_n_butterfly_factor``: the tuner's ``hotswap_padded_config``
and the layers' ``hotswap_padding``) without changing its outputs, so that every adapter up to
that size can later be swapped in.

The model's ``peft_config`` entry is not changed by a swap: it still describes the tensors (the padded
geometry and the model's scaling), so saving after a swap writes an adapter that reproduces the swapped-in
outputs.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Optional, Union

import torch
from torch import nn

from .config import PeftConfig
from .contract import legacy_ignored_suffixes, tuner_class, type_string
from .layer import AdapterLayer
from .partitioned import PartitionedError, gathered, is_partitioned
from .serialization import state_dict as ckpt
from .serialization.folders import load_config, load_weights_file

logger = logging.getLogger(__name__)

__all__ = ["HotswapError", "hotswap_adapter", "prepare_model_for_hotswap"]


class HotswapError(ValueError):
    """The new adapter cannot be swapped into the model's adapter (the model is left unchanged)."""


# ---------------------------------------------------------------------------------------------- helpers
def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # a torch.compile wrapper shares the module and its tensors


def _layers(model: nn.Module, adapter_name: str) -> list[tuple[str, str, AdapterLayer]]:
    """``(root-relative path, file-key path, layer)`` of every adapter layer holding ``adapter_name``."""
    root, prefix = ckpt.tuner_root(model)
    return [(path, prefix + path, m) for path, m in root.named_modules()
            if isinstance(m, AdapterLayer) and adapter_name in m.adapter_names()]


def _model_config(model: nn.Module, adapter_name: str) -> PeftConfig:
    configs = getattr(model, "peft_config", None) or {}
    if adapter_name not in configs:
        raise HotswapError(f"The model has no adapter {adapter_name!r} to swap into (it holds {sorted(configs)})")
    return configs[adapter_name]


def _read(path_or_state_dict, config: Optional[PeftConfig], **kwargs) -> tuple[dict, Optional[PeftConfig], dict]:
    """``(tensors, config or None, metadata)`` from a PEFT adapter folder / Hub id, or a state dict."""
    if isinstance(path_or_state_dict, Mapping):
        return dict(path_or_state_dict), config, {}
    if not isinstance(path_or_state_dict, (str, os.PathLike)):
        raise TypeError("path_or_state_dict must be an adapter folder, a Hub id or a dict of tensors, got "
                        f"{type(path_or_state_dict).__name__}")
    path = os.fspath(path_or_state_dict)
    config = load_config(path, config, **kwargs)
    tensors, metadata = load_weights_file(path, **kwargs)
    return tensors, config, metadata


def _type_name(config: PeftConfig) -> str:
    return str(type_string(config.peft_type))


def _check_configs(mine: PeftConfig, new: Optional[PeftConfig]) -> None:
    if new is None:
        return
    if new.peft_type != mine.peft_type:
        raise HotswapError(f"Cannot swap a {_type_name(new)} adapter into a {_type_name(mine)} adapter")
    if new.bias != mine.bias:
        raise HotswapError(f"bias differs: the model's adapter has bias={mine.bias!r}, the new one {new.bias!r}")


# ---------------------------------------------------------------------------------------------- per layer
def _layer_values(layer: AdapterLayer, name: str, path: str, new: Optional[dict], config, mine) -> dict:
    """The method's values for one layer (:meth:`~fourierft.layer.AdapterLayer.hotswap_values`)."""
    try:
        return layer.hotswap_values(name, path, new, config, mine)
    except ValueError as err:
        raise HotswapError(f"{path}: {err}") from err


# ---------------------------------------------------------------------------------------------- planning
def _plan(model: nn.Module, tensors: dict, adapter_name: str, config: Optional[PeftConfig],
          metadata: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every ``(existing tensor, new value)`` copy of the swap, after checking all of them."""
    mine = _model_config(model, adapter_name)
    _check_configs(mine, config)
    layers = _layers(model, adapter_name)
    merged = [p for p, _, layer in layers if adapter_name in layer.merged_adapters]
    if merged:
        raise HotswapError(f"Adapter {adapter_name!r} is merged into {merged[0]}; unmerge it before hot-swapping")
    _, prefix = ckpt.tuner_root(model)
    sd = ckpt.normalise_prefix(tensors, prefix)
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise HotswapError(f"These entries are not tensors: {bad[:5]}")
    used: set[str] = set()
    layer_keys: set[str] = set()
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    identity: list[str] = []
    for path, full, layer in layers:
        attrs = [attr for attr, _ in layer.named_adapter_tensors(adapter_name)]
        keys = {attr: f"{full}.{attr}" for attr in attrs}
        present = {attr: sd[k] for attr, k in keys.items() if k in sd}
        integer = [keys[a] for a, v in present.items() if not v.is_floating_point()]
        if integer:
            raise HotswapError(f"These adapter tensors are not floating-point: {integer}")
        if present and len(present) != len(attrs):
            missing = sorted(set(attrs) - set(present))
            raise HotswapError(f"{path}: the new adapter has {sorted(present)} but not {missing}")
        used.update(keys[a] for a in present)
        layer_keys.update(keys.values())
        if not present:
            identity.append(path)
        values = _layer_values(layer, adapter_name, path, present or None, config, mine)
        params = dict(layer.named_adapter_tensors(adapter_name))
        plan.extend((params[attr], values[attr]) for attr in attrs)
    plan.extend(_other_tensors(model, adapter_name, sd, layer_keys, used))
    unexpected = sorted(k for k in sd if k not in used and not k.endswith(legacy_ignored_suffixes()))
    if unexpected:
        raise HotswapError(
            f"The new adapter has tensors the model's adapter {adapter_name!r} has no place for (different "
            f"targets or another model): {unexpected[:10]}" + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else "")
        )
    if len(identity) == len(layers):
        raise HotswapError(f"The new adapter targets none of adapter {adapter_name!r}'s layers")
    if identity:
        logger.info("Hot-swap: the new adapter does not target %d layer(s) (%s, ...); they become the identity",
                    len(identity), identity[0])
    _check_fingerprint(model, adapter_name, metadata, sd, identity)
    return plan


def _other_tensors(model: nn.Module, adapter_name: str, sd: dict, layer_keys: set[str], used: set[str]) -> list:
    """Copies for the adapter's ``modules_to_save`` and trained biases; each must be in the new adapter."""
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    out, missing = [], []
    for file_key, (model_key, _) in ckpt.adapter_key_map(model, adapter_name).items():
        if file_key in layer_keys:
            continue
        if file_key not in sd:
            missing.append(file_key)
            continue
        current = targets[model_key]
        if sd[file_key].is_floating_point() != current.is_floating_point():
            raise HotswapError(f"{file_key}: dtype {sd[file_key].dtype}, the model expects {current.dtype}")
        if tuple(sd[file_key].shape) != tuple(current.shape):
            raise HotswapError(f"{file_key}: shape {tuple(sd[file_key].shape)}, the model expects {tuple(current.shape)}")
        used.add(file_key)
        out.append((current, sd[file_key]))
    if missing:
        raise HotswapError(f"The new adapter lacks the adapter's modules_to_save / bias tensors {missing[:10]}")
    return out


def _check_fingerprint(model: nn.Module, adapter_name: str, metadata: dict, sd: dict, identity: list) -> None:
    """A file's derived-tensor fingerprint is comparable only when it has the model's exact geometry."""
    expected = metadata.get(ckpt.FINGERPRINT_KEY)
    if expected is None or identity:
        return
    params = dict(model.named_parameters())
    mapping = ckpt.adapter_key_map(model, adapter_name)
    same = all(tuple(sd[k].shape) == tuple(params[mk].shape) for k, (mk, _) in mapping.items() if k in sd and mk in params)
    if same and expected != ckpt.derived_fingerprint(model, adapter_name):
        raise HotswapError("The adapter file's frequency/permutation fingerprint differs from the positions the "
                           "model uses: it was saved with other positions (seed, torch version)")


def _adapter_tensors(model: nn.Module, adapter_name: str) -> list[torch.Tensor]:
    """The parameters a swap of ``adapter_name`` reads and writes (empty for an unknown adapter)."""
    if adapter_name not in (getattr(model, "peft_config", None) or {}):
        return []
    params = dict(model.named_parameters())
    return [params[k] for k, _ in ckpt.adapter_key_map(model, adapter_name).values() if k in params]


# ---------------------------------------------------------------------------------------------- public
def hotswap_adapter(model: nn.Module, path_or_state_dict: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
                    adapter_name: str = "default", *, config: Optional[PeftConfig] = None, **kwargs) -> None:
    """Replace adapter ``adapter_name``'s weights by another adapter's, in place and without recompiling.

    The new values are copied into the existing parameters under ``torch.no_grad()``; no parameter, buffer
    or attribute a compiled graph depends on is replaced, so a ``torch.compile``'d model keeps its graphs.
    See the module docstring (:mod:`fourierft.hotswap`) for what geometries can be swapped and why.

    Args:
        model: A :class:`~fourierft.PeftModel`, a model from :func:`~fourierft.inject_adapter_in_model`, or
            a ``torch.compile`` wrapper of either.
        path_or_state_dict: A PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors`` or
            ``.bin``), a Hub id, or a state dict in PEFT's key format (with or without ``base_model.model.``).
        adapter_name: The model's adapter to overwrite.
        config: The new adapter's config. Read from the folder when a path is given; for a state dict
            without it, the new adapter is taken to share the model adapter's seed, band and scaling.
        **kwargs: ``subfolder`` and Hub arguments (``revision``, ``token``, ``cache_dir``, ...).

    Raises:
        HotswapError: The new adapter does not fit (other targets, method, bias, blocks, more frequencies or
            factors than the model's adapter, other frequency positions), or the adapter is merged. Nothing
            was changed.
        CheckpointError, FileNotFoundError: The adapter file cannot be read.
    """
    model = _unwrap(model)
    tensors, new_config, metadata = _read(path_or_state_dict, config, **kwargs)
    # ZeRO-3: the adapter tensors are gathered on every rank (each checks and copies; rank 0's copy is kept)
    with gathered(_adapter_tensors(model, adapter_name), modify=True):
        plan = _plan(model, tensors, adapter_name, new_config, metadata)
        broken = [i for i, (_, v) in enumerate(plan) if not bool(torch.isfinite(v).all())]
        if broken:
            logger.warning("The new adapter holds NaN or Inf values; outputs will not be finite")
        with torch.no_grad():
            for current, value in plan:
                current.copy_(value.to(device=current.device, dtype=current.dtype))
    logger.info("Hot-swapped adapter %r (%d tensors)", adapter_name, len(plan))


def prepare_model_for_hotswap(model: nn.Module, adapter_name: str = "default", **targets) -> None:
    """Pad adapter ``adapter_name`` so that larger adapters can be hot-swapped in later; call before compiling.

    The outputs do not change: FourierFT gets zero coefficients at the next positions of its seeded
    permutation (the first ``n`` positions stay where they are), BOFT gets identity factors (``R = 0``)
    after its own. The adapter's ``peft_config`` entry is replaced by a copy with the padded size, so the
    model still saves and reloads consistently. Tensors that grow are new ``Parameter`` objects (hence
    "before compiling", and before building an optimizer); the others are kept. Each method says what its
    targets mean (its tuner's ``hotswap_padded_config`` and its layers' ``hotswap_padding``).

    Args:
        model: A :class:`~fourierft.PeftModel` or injected model (not a ``torch.compile`` wrapper).
        adapter_name: The adapter to pad.
        **targets: The method's sizes to pad to. FourierFT: ``target_n_frequency``, every layer's
            ``n_frequency`` becomes this (``>=`` its current one). BOFT: ``target_n_butterfly_factor``, every
            layer's number of butterfly factors becomes this (``>=`` its current one; the block geometry must
            allow it: ``b`` even, ``N`` divisible by ``2**(m-1)``). ``None`` values are left out.

    Raises:
        HotswapError: Compiled model, merged adapter, a target smaller than a layer's current size, or a
            target the layer geometry does not allow. Nothing was changed.
        PartitionedError: The model's parameters are partitioned by DeepSpeed ZeRO-3 (pad before it).
    """
    if hasattr(model, "_orig_mod"):
        raise HotswapError("Call prepare_model_for_hotswap before torch.compile (it replaces parameters)")
    if any(map(is_partitioned, model.parameters())):
        raise PartitionedError("prepare_model_for_hotswap replaces parameters, which DeepSpeed ZeRO-3 has partitioned: "
                               "call it before deepspeed.initialize / Trainer / accelerator.prepare")
    config = _model_config(model, adapter_name)
    targets = {k: v for k, v in targets.items() if v is not None}
    try:
        new_config = tuner_class(config).hotswap_padded_config(config, **targets)
    except (TypeError, ValueError) as err:
        raise HotswapError(f"Adapter {adapter_name!r} ({_type_name(config)}): {err}") from err
    layers = _layers(model, adapter_name)
    rebuild = [_check_padding(layer, adapter_name, path, new_config) for path, _, layer in layers]  # all first
    for (path, _, layer), layer_config in zip(layers, rebuild):
        _pad_layer(layer, adapter_name, path, layer_config)
    model.peft_config[adapter_name] = new_config
    logger.info("Padded adapter %r for hot-swapping (%d layers)", adapter_name, len(layers))


def _check_padding(layer: AdapterLayer, name: str, path: str, config) -> PeftConfig:
    """The config to rebuild the layer with (:meth:`~fourierft.layer.AdapterLayer.hotswap_padding`)."""
    if name in layer.merged_adapters:
        raise HotswapError(f"Adapter {name!r} is merged into {path}; unmerge it first")
    try:
        return layer.hotswap_padding(name, path, config)
    except ValueError as err:
        raise HotswapError(f"{path}: {err}") from err


def _pad_layer(layer: AdapterLayer, name: str, path: str, config) -> None:
    """Rebuild the adapter at the padded size through the method's own ``update_layer`` (so every derived
    field follows), then put the old values back in the leading slice of each tensor."""
    old = dict(layer.named_adapter_tensors(name))
    with torch.random.fork_rng(devices=[]):  # update_layer draws initial values: keep the user's RNG stream
        layer.update_layer(name, config, key=path)
    for attr, current in old.items():
        store, fresh = getattr(layer, attr), getattr(layer, attr)[name]
        if fresh.shape == current.shape:
            store[name] = current
            continue
        padded = torch.zeros(fresh.shape, dtype=current.dtype, device=current.device)
        padded[tuple(slice(0, k) for k in current.shape)] = current.detach()
        store[name] = nn.Parameter(padded, requires_grad=current.requires_grad)
    layer.prepare_plans()  # the new geometry's plans now, not in a compiled trace
