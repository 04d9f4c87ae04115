"""Adapter state dicts in PEFT's key format, strict loading, and the legacy-file rule.

PEFT's on-disk keys are the model's state-dict keys with the adapter name removed:
``<layer>.fourierft_spectrum.<name>`` is stored as ``<layer>.fourierft_spectrum`` and
``<mod>.modules_to_save.<name>.<k>`` as ``<mod>.<k>``. Which tensors belong to an adapter is decided
structurally, by walking the adapter layers and ``modules_to_save`` wrappers, never by substring.

Loading is strict: every adapter tensor must be present with the right shape, and every key in the file
must land somewhere, except for the legacy PEFT keys each method registers (``legacy_ignored_suffixes`` of
:func:`~fourierft.contract.register_method`) and the biases and
heads older PEFT versions did not save (:func:`is_legacy_format`). Everything is checked before anything is
written.
"""

from __future__ import annotations

import hashlib
import logging
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
from torch import nn
try:
    from torch.distributed.tensor import distribute_tensor
except ImportError:  # pragma: no cover - a torch build without distributed support has no DTensor either
    distribute_tensor = None

from ..contract import legacy_ignored_suffixes
from ..layer import AdapterLayer
from ..modules_to_save import ModulesToSaveWrapper
from ..partitioned import check_full, full_shape, gathered, is_partitioned
from ..tuner import AdapterModel
from .tensors import CheckpointError

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
FINGERPRINT_KEY = "fourierft_derived_sha256"


def is_legacy_format(config) -> bool:
    """True for files written by PEFT <= 0.20, which omitted heads and biases (the one copy of this rule).

    Such a config has no ``peft_version`` in its file (``PeftConfig.from_dict`` marks it) or an older one.
    """
    if getattr(config, "_legacy_format", False):
        return True
    version = (config.peft_version or "0").split("+")[0].split("@")[0]
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return True
    return (major, minor) < (0, 21)


@dataclass
class LoadResult:
    """What a load did besides loading: keys it ignored (legacy) and optional keys it did not find."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)

    def __iter__(self):
        return iter((self.missing_keys, self.unexpected_keys))


def tuner_root(model: nn.Module) -> tuple[nn.Module, str]:
    """The module to walk and the key prefix of its names (``base_model.model.`` inside a PeftModel, else
    ``""``), for a :class:`~fourierft.PeftModel`, a tuner or a model with injected adapters."""
    base = getattr(model, "base_model", None)
    if isinstance(base, AdapterModel) and base is not model:
        return base.model, PEFT_PREFIX
    if isinstance(model, AdapterModel):
        return model.model, ""
    return model, ""


def _adapter_config(model: nn.Module, adapter_name: str):
    configs = getattr(model, "peft_config", None) or {}
    if adapter_name not in configs:
        raise ValueError(f"Adapter {adapter_name} not found; the model holds {sorted(configs)}")
    return configs[adapter_name]


def adapter_key_map(model: nn.Module, adapter_name: str) -> dict[str, tuple[str, bool]]:
    """``file key -> (model state-dict key, required)`` for one adapter, in PEFT's naming.

    Required keys are the method's tensors and the ``modules_to_save`` copies; trainable biases are
    optional, because PEFT <= 0.20 did not save them.
    """
    root, prefix = tuner_root(model)
    config = _adapter_config(model, adapter_name)
    mapping: dict[str, tuple[str, bool]] = {}
    for path, module in _named_modules(root):
        full = prefix + path
        if isinstance(module, AdapterLayer):
            for attr, _ in module.named_adapter_tensors(adapter_name):
                mapping[f"{full}.{attr}"] = (f"{full}.{attr}.{adapter_name}", True)
            if config.bias.endswith("_only") and adapter_name in module.adapter_names() and module.bias is not None:
                inner = "base_layer." * _depth(module)
                mapping[f"{full}.{inner}bias"] = (f"{full}.{inner}bias", False)
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for k in _state_keys(module.modules_to_save[adapter_name]):
                mapping[f"{full}.{k}"] = (f"{full}.modules_to_save.{adapter_name}.{k}", True)
    if config.bias == "all":  # PEFT saves every bias key, wrapper copies included, adapter name stripped
        own = f".modules_to_save.{adapter_name}."
        for key in _state_keys(root):
            if not (key == "bias" or key.endswith(".bias")):
                continue
            if ".modules_to_save." in key and own not in key:
                continue
            mapping.setdefault(prefix + key.replace(own, ".modules_to_save."), (prefix + key, False))
    return mapping


#: Path components torch's wrappers (FSDP1, activation checkpointing) add to module paths and leave out of
#: state dicts.
_WRAPPER_NAMES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def _state_dict_name(path: str) -> str:
    """A module or tensor path under the name state dicts use (the wrappers' components removed)."""
    return ".".join(part for part in path.split(".") if part not in _WRAPPER_NAMES)


def _named_modules(root: nn.Module):
    """``root.named_modules()`` under the names the modules' state dicts use (wrapper infixes removed)."""
    for path, module in root.named_modules():
        yield _state_dict_name(path), module


def _named_tensors(model: nn.Module, buffers: bool = False) -> dict[str, tuple[str, torch.Tensor]]:
    """``state-dict name -> (attribute path, tensor)`` of the model's parameters (and buffers): the two names
    differ inside torch's wrappers (``checkpoint_wrapper``, FSDP1), whose state dicts drop their infix."""
    named = list(model.named_parameters()) + (list(model.named_buffers()) if buffers else [])
    return {_state_dict_name(path): (path, tensor) for path, tensor in named}


def _state_keys(module: nn.Module) -> list[str]:
    """The keys of ``module.state_dict()`` without calling it: on a module nested inside an FSDP1 model, that
    call would initialise FSDP's state as if the module were the root, breaking the model's own state dict."""
    keys = []
    for path, sub in module.named_modules(remove_duplicate=False):  # a shared module is in the state dict twice
        path = _state_dict_name(path)
        skip = getattr(sub, "_non_persistent_buffers_set", ())  # torch's record of persistent=False buffers
        names = [n for n, p in sub.named_parameters(recurse=False, remove_duplicate=False)]
        names += [n for n, b in sub.named_buffers(recurse=False, remove_duplicate=False) if n not in skip]
        keys += [f"{path}.{n}" if path else n for n in names]
    return list(dict.fromkeys(keys))


def _depth(layer: AdapterLayer) -> int:
    depth, base = 1, layer.base_layer
    while isinstance(base, AdapterLayer):
        depth, base = depth + 1, base.base_layer
    return depth


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: Optional[dict] = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: str | bool = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors of one adapter under PEFT's file keys.

    Args:
        model: A :class:`~fourierft.PeftModel` or a model injected with :func:`inject_adapter_in_model`.
        state_dict: Take values from this dict (as Trainer passes) instead of ``model.state_dict()``.
        adapter_name: Which adapter.
        unwrap_compiled: Look through a ``torch.compile`` wrapper.
        save_embedding_layers: Accepted for PEFT compatibility and ignored: the file holds adapter tensors only,
            never a copy of the base model's embedding weights (an adapted ``nn.Embedding`` is saved as its
            ``fourierft_spectrum``, like any other adapted layer).
    """
    if unwrap_compiled:  # torch.compile's wrapper keeps the module as ``_orig_mod``, its only handle to it
        model = getattr(model, "_orig_mod", model)
    mapping = adapter_key_map(model, adapter_name)
    own = {key: tensor for key, (_, tensor) in _named_tensors(model).items()}
    if state_dict is not None:
        return _collect(state_dict, mapping, own, clone=False)
    with gathered(own.get(model_key) for model_key, _ in mapping.values()):  # ZeRO-3: every rank takes part
        return _collect(model.state_dict(), mapping, own, clone=any(map(is_partitioned, own.values())))


def _collect(full: Mapping, mapping: dict, own: dict, clone: bool) -> dict[str, torch.Tensor]:
    """The adapter's file keys and values from ``full``; refuses missing keys, shards and placeholders."""
    out = {}
    for file_key, (model_key, required) in mapping.items():
        if model_key not in full:
            if is_partitioned(own.get(model_key)):
                raise KeyError(f"Adapter tensor {model_key} is missing from the state dict of a ZeRO-3 model: "
                               "call without state_dict= on every rank (fourierft gathers the adapter)")
            if required:
                raise KeyError(f"Adapter tensor {model_key} is missing from the state dict")
            continue
        value = full[model_key]
        if hasattr(value, "full_tensor"):  # a DTensor shard (FSDP2): gather it, a collective on every rank
            value = value.full_tensor()
        if model_key in own and is_partitioned(own[model_key]):
            check_full(value, full_shape(own[model_key]), f"Adapter tensor {model_key}")
        out[file_key] = value.detach().clone() if clone else value
    return out


def normalise_prefix(sd: dict, prefix: str) -> dict:
    """``sd`` with its keys under ``prefix`` (from :func:`tuner_root`): ``base_model.model.`` added to a dict
    that has none of it, or removed from one that has it throughout; mixed keys are left as they are."""
    has = [k.startswith(PEFT_PREFIX) for k in sd]
    if prefix and sd and not any(has):
        return {prefix + k: v for k, v in sd.items()}
    if not prefix and sd and all(has):
        return {k[len(PEFT_PREFIX):]: v for k, v in sd.items()}
    return sd


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
    legacy_ok: bool = False,
    fingerprint: Optional[str] = None,
) -> LoadResult:
    """Load one adapter's tensors (PEFT keys, with or without ``base_model.model.``) into the model.

    Everything is checked before anything is written, so a failed call leaves the model unchanged.

    Args:
        model: The model holding adapter ``adapter_name``.
        peft_model_state_dict: File keys to tensors.
        adapter_name: The adapter to fill; the file's adapter name does not matter.
        ignore_mismatched_sizes: Skip (with a warning) tensors whose shape differs instead of raising.
        low_cpu_mem_usage: Replace (meta) parameters by the loaded tensors instead of copying into them.
        legacy_ok: The file comes from PEFT <= 0.20, which omitted heads and biases: tolerate them missing.
        fingerprint: Expected :func:`derived_fingerprint` of the adapter; checked when given.

    Returns:
        A :class:`LoadResult` with the legacy keys that were ignored and the optional keys not found.

    Raises:
        CheckpointError: Missing, unexpected or mis-shaped tensors, or a fingerprint mismatch.
    """
    if not isinstance(peft_model_state_dict, Mapping):
        raise TypeError(f"peft_model_state_dict must be a dict of tensors, got {type(peft_model_state_dict).__name__}")
    _, prefix = tuner_root(model)
    sd = normalise_prefix(dict(peft_model_state_dict), prefix)
    mapping = adapter_key_map(model, adapter_name)
    named = _named_tensors(model, buffers=True)
    targets = {key: tensor for key, (_, tensor) in named.items()}
    result, writes, problems = LoadResult(), [], []
    for key, value in sd.items():
        model_key = mapping[key][0] if key in mapping else (key if key in targets else None)
        if model_key is None or model_key not in targets:
            if key.endswith(legacy_ignored_suffixes()):
                result.unexpected_keys.append(key)
            else:
                problems.append(f"unexpected key {key!r}")
            continue
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key!r} is not a tensor ({type(value).__name__})")
            continue
        if tuple(value.shape) != full_shape(targets[model_key]):
            message = f"{key!r} has shape {tuple(value.shape)}, the model expects {full_shape(targets[model_key])}"
            if ignore_mismatched_sizes:
                logger.warning("Skipping %s", message)
                continue
            problems.append(message)
            continue
        if value.dtype.is_floating_point != targets[model_key].dtype.is_floating_point:
            problems.append(f"{key!r} has dtype {value.dtype}, the model expects {targets[model_key].dtype}")
            continue
        writes.append((model_key, value))
    for key, (model_key, required) in mapping.items():
        if key not in sd:
            if required and not (legacy_ok and ".modules_to_save." in model_key):
                problems.append(f"missing key {key!r}")
            else:
                result.missing_keys.append(key)
    if problems:
        raise CheckpointError(
            f"The checkpoint does not fit adapter {adapter_name!r}: " + "; ".join(problems[:20])
            + (f" (and {len(problems) - 20} more)" if len(problems) > 20 else "")
        )
    if fingerprint is not None and fingerprint != derived_fingerprint(model, adapter_name):
        raise CheckpointError(
            f"The adapter file's frequency/permutation fingerprint does not match the positions rebuilt here "
            f"for adapter {adapter_name!r}: the file was saved with a different config or a torch version "
            f"whose random permutation differs. Loading it would put the weights on the wrong positions."
        )
    broken = [key for key, value in writes if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if broken:
        logger.warning("The adapter file holds NaN or Inf values in %s; outputs will not be finite", broken)
    with gathered((targets[k] for k, _ in writes), modify=True):  # ZeRO-3: every rank loads, rank 0's values kept
        _write(model, [(named[key][0], value) for key, value in writes], low_cpu_mem_usage)
    if result.missing_keys:
        logger.warning("Found missing optional adapter keys while loading the checkpoint: %s", result.missing_keys)
    return result


def _write(model: nn.Module, writes: list[tuple[str, torch.Tensor]], assign: bool) -> None:
    with torch.no_grad():
        for model_key, value in writes:
            owner_name, _, attr = model_key.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            current = getattr(owner, attr)
            if hasattr(current, "device_mesh") and not hasattr(value, "device_mesh"):  # an FSDP2 shard (DTensor)
                value = distribute_tensor(value.to(current.device), current.device_mesh, current.placements)
            if assign or current.device.type == "meta":
                new = value.to(dtype=current.dtype)
                if isinstance(current, nn.Parameter):
                    new = nn.Parameter(new, requires_grad=current.requires_grad)
                setattr(owner, attr, new) if not isinstance(owner, nn.ParameterDict) else owner.__setitem__(attr, new)
            else:
                current.copy_(value.to(device=current.device, dtype=current.dtype))


def derived_fingerprint(model: nn.Module, adapter_name: str) -> Optional[str]:
    """SHA-256 over every derived (rebuilt, unsaved) tensor of the adapter, e.g. FourierFT frequencies.

    ``None`` when the method has no derived tensors.
    """
    root, _ = tuner_root(model)
    digest, seen = hashlib.sha256(), False
    for path, module in _named_modules(root):
        if isinstance(module, AdapterLayer) and adapter_name in module.adapter_names():
            for tensor in module.derived_tensors(adapter_name):
                seen = True
                digest.update(path.encode())
                digest.update(tensor.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest() if seen else None


# ---------------------------------------------------------------------------------------------- base model
def _original_key(root: nn.Module, key: str) -> Optional[str]:
    """The base model's own name for state-dict key ``key`` of ``root``, or ``None`` for an adapter tensor.

    Walks the key one module at a time, so the wrapper infixes (``base_layer`` inside an adapter layer,
    ``original_module`` inside a ``modules_to_save`` wrapper) are recognised by the module's type, never by
    the text alone (a user's module may be called ``base_layer``).
    """
    parts, kept, module = key.split("."), [], root
    for i, part in enumerate(parts):
        if isinstance(module, AdapterLayer):
            if part in module.adapter_layer_names:
                return None
            if part == "base_layer":
                module = module.base_layer
                continue
        if isinstance(module, ModulesToSaveWrapper):
            if part == "modules_to_save":
                return None
            if part == "original_module":
                module = module.original_module
                continue
        child = module._modules.get(part) if module is not None else None
        kept.append(part)
        module = child  # None once past the modules: the rest names a tensor
    return ".".join(kept)


def _base_key_map(model: nn.Module) -> dict[str, str]:
    """``original key -> key in the adapted model's state dict`` for every base-model tensor."""
    root, _ = tuner_root(model)
    mapping = {}
    for key in root.state_dict(keep_vars=True):
        original = _original_key(root, key)
        if original is not None:
            mapping.setdefault(original, key)
    return mapping


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors under the base model's own keys (PEFT's ``get_base_model_state_dict``).

    Adapter tensors and ``modules_to_save`` copies are left out, and the ``base_layer`` /
    ``original_module`` infixes are removed, so the result loads into the unadapted model.

    Args:
        model: A :class:`~fourierft.PeftModel`, a tuner, or a model injected with :func:`inject_adapter_in_model`.
    """
    root, _ = tuner_root(model)
    full = root.state_dict()
    return {original: full[key] for original, key in _base_key_map(model).items()}


def set_base_model_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
    """Load base-model weights given under the base model's own keys (PEFT's ``set_base_model_state_dict``).

    Adapter tensors are not touched. Everything is checked before anything is written: with ``strict``,
    missing or unexpected keys raise; a shape mismatch always raises.

    Returns:
        A named tuple ``(missing_keys, unexpected_keys)`` in the base model's key names.

    Raises:
        RuntimeError: ``strict`` and keys do not match, or a tensor has the wrong shape (nothing loaded).
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    root, _ = tuner_root(model)
    mapping = _base_key_map(model)
    current = root.state_dict(keep_vars=True)
    unexpected = [k for k in state_dict if k not in mapping]
    missing = [k for k in mapping if k not in state_dict]
    errors = []
    if strict and missing:
        errors.append(f"Missing key(s) in state_dict: {missing}")
    if strict and unexpected:
        errors.append(f"Unexpected key(s) in state_dict: {unexpected}")
    for original, key in mapping.items():
        value = state_dict.get(original)
        if isinstance(value, torch.Tensor) and value.shape != current[key].shape:
            errors.append(f"size mismatch for {original}: copying a param with shape {tuple(value.shape)}, the "
                          f"shape in the current model is {tuple(current[key].shape)}")
    if errors:
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(errors))
    translated = {mapping[k]: v for k, v in state_dict.items() if k in mapping}
    root.load_state_dict(translated, strict=False)
    return _IncompatibleKeys(missing, unexpected)


_IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])
