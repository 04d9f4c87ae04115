"""Adapter folders in PEFT's layout (``default`` at the root, others in sub-folders), saved atomically."""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
import tempfile
from typing import Optional

from torch import nn

from ..config import PeftConfig
from ..hub import LOCATION_KWARGS, resolve_file
from .modelcard import write_model_card
from .state_dict import FINGERPRINT_KEY, derived_fingerprint, get_peft_model_state_dict
from .tensors import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, WEIGHTS_NAMES, load_tensors, save_tensors

logger = logging.getLogger(__name__)


def adapter_dir(save_directory: str, adapter_name: str) -> str:
    """``default`` lives at the root, every other adapter in a sub-folder of its name (PEFT's layout)."""
    return save_directory if adapter_name == "default" else os.path.join(save_directory, adapter_name)


def _config_to_save(peft_model: nn.Module, config: PeftConfig) -> PeftConfig:
    config = copy.deepcopy(config)
    config.inference_mode = True
    base = peft_model.get_base_model()
    if config.task_type is None and config.auto_mapping is None:
        config.auto_mapping = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
    return config


def save_adapters(peft_model: nn.Module, save_directory: str, safe_serialization: bool = True,
                  selected_adapters: Optional[list[str]] = None, is_main_process: bool = True,
                  state_dict: Optional[dict] = None) -> None:
    """Write each selected adapter's config and weights (see ``PeftModel.save_pretrained``)."""
    if os.path.isfile(save_directory):
        raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
    if isinstance(selected_adapters, str):
        selected_adapters = [selected_adapters]
    names = list(peft_model.peft_config) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in peft_model.peft_config]
    if unknown:
        raise ValueError(
            f"You passed an invalid `selected_adapters` arguments, current supported adapter names are "
            f"{list(peft_model.peft_config.keys())} - got {unknown}."
        )
    for name in names:
        out = adapter_dir(save_directory, name)
        os.makedirs(out, exist_ok=True)
        tensors = get_peft_model_state_dict(peft_model, state_dict, name)  # every rank: FSDP2 gathers
        if not is_main_process:
            continue
        metadata = {"format": "pt"}
        fingerprint = derived_fingerprint(peft_model, name)
        if fingerprint is not None:
            metadata[FINGERPRINT_KEY] = fingerprint
        config = _config_to_save(peft_model, peft_model.peft_config[name])
        weights = SAFETENSORS_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME

        def write(tmp: str, tensors=tensors, config=config, weights=weights, metadata=metadata) -> None:
            save_tensors(tensors, os.path.join(tmp, weights), safe_serialization, metadata)
            config.save_pretrained(tmp)

        atomic_write_dir(out, write)
        stale = WEIGHTS_NAME if safe_serialization else SAFETENSORS_WEIGHTS_NAME
        if os.path.exists(os.path.join(out, stale)):  # would shadow (or be shadowed by) the new file
            os.remove(os.path.join(out, stale))
        logger.info("Saved adapter %r to %s", name, out)
    if is_main_process:
        write_model_card(save_directory, peft_model)


def atomic_write_dir(target_dir: str, write) -> None:
    """Run ``write(tmp_dir)`` in a fresh temporary folder beside ``target_dir``, then move each file in.

    Each file is replaced with ``os.replace`` (atomic; a symlink is replaced, never written through). If
    a move fails, the files already moved are put back from links to the previous ones taken first, so
    the folder holds the whole new adapter or the whole previous one, never a mix.
    """
    os.makedirs(target_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".fourierft-save-", dir=target_dir)
    try:
        write(tmp)
        names = sorted(os.listdir(tmp), key=lambda n: n == "adapter_config.json")
        previous = tempfile.mkdtemp(prefix=".previous-", dir=tmp)
        for name in names:
            if os.path.lexists(os.path.join(target_dir, name)):
                _keep(os.path.join(target_dir, name), os.path.join(previous, name))
        done: list[str] = []
        try:
            for name in names:
                os.replace(os.path.join(tmp, name), os.path.join(target_dir, name))
                done.append(name)
        except BaseException:
            for name in reversed(done):
                kept = os.path.join(previous, name)
                if os.path.lexists(kept):
                    os.replace(kept, os.path.join(target_dir, name))
                else:
                    os.remove(os.path.join(target_dir, name))
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _keep(path: str, backup: str) -> None:
    """A second name for ``path`` (a hard link: no copy; a symlink stays a symlink)."""
    try:
        os.link(path, backup, follow_symlinks=False)
    except OSError:  # no hard links on this filesystem
        shutil.copy2(path, backup, follow_symlinks=False)


def load_config(model_id: str, config: Optional[PeftConfig] = None, **kwargs) -> PeftConfig:
    """The adapter's config: ``config`` if given, else read from ``model_id`` (folder or Hub id).

    The result may be the caller's object: entry points copy it before resolving it.
    """
    if not isinstance(model_id, (str, os.PathLike)):
        raise TypeError(f"model_id must be a folder path or a Hub repo id (str), got {type(model_id).__name__}")
    if config is not None:
        if not isinstance(config, PeftConfig):
            raise ValueError(f"The input config must be a PeftConfig, got {type(config).__name__}")
        return config
    return PeftConfig.from_pretrained(model_id, **{k: kwargs[k] for k in LOCATION_KWARGS if k in kwargs})


def load_weights_file(model_id: str, subfolder: Optional[str] = None, **kwargs) -> tuple[dict, dict]:
    """Read ``adapter_model.safetensors`` (preferred) or ``adapter_model.bin`` (weights only).

    Raises:
        FileNotFoundError: Neither file exists locally nor on the Hub / in its cache.
        CheckpointError: The file is unreadable.
    """
    return load_tensors(resolve_file(model_id, WEIGHTS_NAMES, subfolder, **kwargs))


def apply_key_mapping(tensors: dict, key_mapping: Optional[dict[str, str]]) -> dict:
    """PEFT's ``key_mapping``: ``{regex: replacement}`` applied to each key without its ``base_model.model.``
    (or ``base_model.``) prefix, first pattern that matches wins; ``None`` or ``{}`` changes nothing.

    Raises:
        ValueError: A key does not start with ``base_model.``.
    """
    if not key_mapping:
        return tensors
    out = {}
    for key, value in tensors.items():
        prefix = next((p for p in ("base_model.model.", "base_model.") if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"Cannot apply key_mapping to {key!r}: PEFT keys start with 'base_model.'")
        rest = key[len(prefix):]
        for pattern, replacement in key_mapping.items():
            rest, count = re.subn(pattern, replacement, rest)
            if count:
                break
        out[prefix + rest] = value
    return out
