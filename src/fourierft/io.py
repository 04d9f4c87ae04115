"""Adapter folders: PEFT's layout on disk, local or on the Hugging Face Hub (cache and offline mode honoured)."""

from __future__ import annotations

import copy
import logging
import os
from typing import Optional

from torch import nn

from . import checkpoint as ckpt
from .config import PeftConfig
from .modelcard import write_model_card

logger = logging.getLogger(__name__)

_HUB_KEYS = ("revision", "cache_dir", "token", "force_download", "local_files_only")


def _hub_kwargs(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in _HUB_KEYS if kwargs.get(k) is not None}


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
        tensors = ckpt.get_peft_model_state_dict(peft_model, state_dict, name)  # every rank: FSDP2 gathers
        if not is_main_process:
            continue
        metadata = {"format": "pt"}
        fingerprint = ckpt.derived_fingerprint(peft_model, name)
        if fingerprint is not None:
            metadata[ckpt.FINGERPRINT_KEY] = fingerprint
        config = _config_to_save(peft_model, peft_model.peft_config[name])
        weights = ckpt.SAFETENSORS_WEIGHTS_NAME if safe_serialization else ckpt.WEIGHTS_NAME

        def write(tmp: str, tensors=tensors, config=config, weights=weights, metadata=metadata) -> None:
            ckpt.save_tensors(tensors, os.path.join(tmp, weights), safe_serialization, metadata)
            config.save_pretrained(tmp)

        ckpt.atomic_write_dir(out, write)
        stale = ckpt.WEIGHTS_NAME if safe_serialization else ckpt.SAFETENSORS_WEIGHTS_NAME
        if os.path.exists(os.path.join(out, stale)):  # would shadow (or be shadowed by) the new file
            os.remove(os.path.join(out, stale))
        logger.info("Saved adapter %r to %s", name, out)
    if is_main_process:
        write_model_card(save_directory, peft_model)


def load_config(model_id: str, config: Optional[PeftConfig] = None, **kwargs) -> PeftConfig:
    """The adapter's config: ``config`` if given, else read from ``model_id`` (folder or Hub id)."""
    if not isinstance(model_id, (str, os.PathLike)):
        raise TypeError(f"model_id must be a folder path or a Hub repo id (str), got {type(model_id).__name__}")
    if config is not None:
        if not isinstance(config, PeftConfig):
            raise ValueError(f"The input config must be a PeftConfig, got {type(config).__name__}")
        return config
    return PeftConfig.from_pretrained(model_id, subfolder=kwargs.get("subfolder"), **_hub_kwargs(kwargs))


def load_weights_file(model_id: str, subfolder: Optional[str] = None, **kwargs) -> tuple[dict, dict]:
    """Read ``adapter_model.safetensors`` (preferred) or ``adapter_model.bin`` (weights only).

    Raises:
        FileNotFoundError: Neither file exists locally nor on the Hub / in its cache.
        CheckpointError: The file is unreadable.
    """
    folder = os.path.join(model_id, subfolder or "")
    if os.path.isdir(model_id):
        for name in (ckpt.SAFETENSORS_WEIGHTS_NAME, ckpt.WEIGHTS_NAME):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return ckpt.load_tensors(path)
        raise FileNotFoundError(
            f"No {ckpt.SAFETENSORS_WEIGHTS_NAME} or {ckpt.WEIGHTS_NAME} in {folder}"
        )
    from huggingface_hub import hf_hub_download

    errors = []
    for name in (ckpt.SAFETENSORS_WEIGHTS_NAME, ckpt.WEIGHTS_NAME):
        try:
            path = hf_hub_download(model_id, name, subfolder=subfolder or None, **_hub_kwargs(kwargs))
        except Exception as err:  # not found, offline and not cached, ...: try the next name
            errors.append(f"{name}: {type(err).__name__}")
            continue
        return ckpt.load_tensors(path)
    raise FileNotFoundError(f"Can't find adapter weights for {model_id!r} (subfolder={subfolder!r}): {errors}")


def task_class(task_type: Optional[str]):
    """The ``PeftModelFor*`` class of ``task_type`` (plain ``PeftModel`` when unknown or ``None``)."""
    from .peft_model import TASK_CLASSES, PeftModel

    return TASK_CLASSES.get(task_type, PeftModel)
