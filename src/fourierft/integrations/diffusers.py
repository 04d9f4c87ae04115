"""FourierFT and BOFT adapters on diffusers pipelines: add, save and load them on a UNet, transformer or text
encoder in place (no wrapper), in PEFT's folder layout.

Why not ``unet.add_adapter(config)``: diffusers' ``add_adapter`` and ``load_lora_adapter`` check
``isinstance(config, peft.PeftConfig)`` and then call ``peft.inject_adapter_in_model``, so even a config
that passed the check would build PEFT's layers, not these (and PEFT's BOFT drops to one butterfly factor
on CPU). Their ``set_adapter`` / ``disable_adapters`` / ``delete_adapters`` look for
``peft.BaseTunerLayer`` modules. There is no hook for another library, so being "accepted" would mean
faking the class or patching diffusers; the helpers here do the same jobs instead:

=============================================  ==================================================
diffusers (PEFT LoRA)                          fourierft
=============================================  ==================================================
``unet.add_adapter(cfg, name)``                ``add_adapter(unet, cfg, name)``
``unet.save_lora_adapter(dir, name)``          ``save_adapter(unet, dir, name)``
``unet.load_lora_adapter(dir, name)``          ``load_adapter(unet, dir, name)``
``unet.set_adapter(name)``                     ``fourierft.functional.set_adapter(unet, name)``
``unet.delete_adapters(name)``                 ``delete_adapter(unet, name)``
``pipe.save_lora_weights`` / ``load_lora_...``  ``save_pipeline_adapters(pipe, dir)`` / ``load_pipeline_adapters``
=============================================  ==================================================

A folder written by :func:`save_adapter` is a PEFT adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``, keys ``base_model.model.<module>.<tensor>`` exactly as
``PeftModel.save_pretrained`` writes them), so ``peft.PeftModel.from_pretrained(unet, folder)`` loads it;
:func:`load_adapter` accepts keys with or without the prefix. A pipeline folder holds one such folder per component
(``unet/``, ``text_encoder/``, ...). Nothing here imports diffusers: a pipeline is any object with
module attributes (``pipe.components`` when it has one).
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any, Optional

from torch import nn

from ..config import PeftConfig
from ..contract import tuner_class
from ..functional import delete_adapter as _delete_from_layers
from ..functional import set_requires_grad
from ..layer import AdapterLayer
from ..modules_to_save import ModulesToSaveWrapper
from ..serialization import state_dict as ckpt
from ..serialization.folders import atomic_write_dir, load_config, load_weights_file
from ..serialization.state_dict import is_legacy_format as _is_legacy
from ..serialization.tensors import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, save_tensors
from ..tuner import get_submodule_parent

logger = logging.getLogger(__name__)

__all__ = ["add_adapter", "delete_adapter", "load_adapter", "load_pipeline_adapters", "merge_and_unload",
           "pipeline_components", "save_adapter", "save_pipeline_adapters"]


def _type_name(config: PeftConfig) -> str:
    return str(getattr(config.peft_type, "value", config.peft_type))


def _configs(model: nn.Module) -> dict:
    return dict(getattr(model, "peft_config", None) or {})


def add_adapter(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> nn.Module:
    """Inject a FourierFT/BOFT adapter into ``model`` in place and make it the active, trainable one.

    The base weights are frozen; other adapters stay in the model, inactive and frozen.

    Args:
        model: A ``UNet2DConditionModel``, a diffusion transformer, a text encoder, or any ``nn.Module``.
        peft_config: A :class:`~fourierft.FourierFTConfig` or :class:`~fourierft.BOFTConfig`.
        adapter_name: A new name.

    Returns:
        ``model`` (its ``peft_config`` dict now includes ``adapter_name``).

    Raises:
        ValueError: Duplicate name, a method different from the model's other adapters, or a bad config
            or target; the model is then unchanged.
    """
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a fourierft config, got {type(peft_config).__name__}")
    existing = _configs(model)
    if adapter_name in existing:
        raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
    theirs = next(iter(existing.values())).peft_type if existing else peft_config.peft_type
    if theirs != peft_config.peft_type:
        raise ValueError(f"Cannot add a {_type_name(peft_config)} adapter to a model holding "
                         f"{getattr(theirs, 'value', theirs)} adapters")
    tuner_class(peft_config)(model, {adapter_name: peft_config}, adapter_name)  # all-or-nothing injection
    model.peft_config = {**existing, adapter_name: peft_config}
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` from ``model``; layers left without any adapter become the original modules.

    Raises:
        ValueError: Unknown adapter, or it is merged (nothing is changed).
    """
    configs = _configs(model)
    if adapter_name not in configs:
        raise ValueError(f"Adapter {adapter_name} not found; the model holds {sorted(configs)}")
    remaining = _delete_from_layers(model, adapter_name, prefix=tuner_class(configs[adapter_name]).prefix)
    for key, module in list(model.named_modules()):
        if key and isinstance(module, AdapterLayer) and not module.adapter_names():
            parent, attr = get_submodule_parent(model, key)
            setattr(parent, attr, module.base_layer)
        elif key and isinstance(module, ModulesToSaveWrapper) and not len(module.modules_to_save):
            parent, attr = get_submodule_parent(model, key)
            setattr(parent, attr, module.original_module)
    del configs[adapter_name]
    model.peft_config = configs
    logger.info("Deleted adapter %r; active now: %s", adapter_name, remaining)


def merge_and_unload(model: nn.Module, adapter_names: Optional[list[str]] = None, safe_merge: bool = True) -> nn.Module:
    """Fold adapters into the base weights and put the plain modules back, so that diffusers'
    ``save_pretrained`` / ``from_pretrained`` handle the component as a normal model.

    Args:
        model: A component holding adapters.
        adapter_names: Which adapters to merge (default: each layer's active ones).
        safe_merge: Check every merged weight is finite (and, for BOFT, invertible) before changing any.

    Returns:
        ``model``, without adapter layers and with an empty ``peft_config``.

    Raises:
        ValueError: A merge would give NaN/Inf (with ``safe_merge``; nothing is changed).
    """
    layers = [(k, m) for k, m in model.named_modules() if isinstance(m, AdapterLayer)
              and not isinstance(model.get_submodule(k.rpartition(".")[0]) if "." in k else model, AdapterLayer)]
    if safe_merge:
        for _, layer in layers:
            layer.check_merge(adapter_names)
    for key, layer in layers:
        layer.merge(adapter_names=adapter_names)
        parent, attr = get_submodule_parent(model, key)
        setattr(parent, attr, layer.get_base_layer())
    for key, module in list(model.named_modules()):
        if key and isinstance(module, ModulesToSaveWrapper):
            parent, attr = get_submodule_parent(model, key)
            setattr(parent, attr, module.active_module())
    model.peft_config = {}
    return model


def save_adapter(model: nn.Module, save_directory: str, adapter_name: str = "default",
                 safe_serialization: bool = True) -> None:
    """Write ``adapter_name`` of ``model`` to ``save_directory`` as a PEFT adapter folder (atomically)."""
    configs = _configs(model)
    if adapter_name not in configs:
        raise ValueError(f"Adapter {adapter_name} not found; the model holds {sorted(configs)}")
    tensors = ckpt.get_peft_model_state_dict(model, adapter_name=adapter_name)
    tensors = {k if k.startswith(ckpt.PEFT_PREFIX) else ckpt.PEFT_PREFIX + k: v for k, v in tensors.items()}
    metadata = {"format": "pt"}
    fingerprint = ckpt.derived_fingerprint(model, adapter_name)
    if fingerprint is not None:
        metadata[ckpt.FINGERPRINT_KEY] = fingerprint
    config = copy.deepcopy(configs[adapter_name])
    config.inference_mode = True
    weights = SAFETENSORS_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME

    def write(tmp: str) -> None:
        save_tensors(tensors, os.path.join(tmp, weights), safe_serialization, metadata)
        config.save_pretrained(tmp)

    atomic_write_dir(save_directory, write)
    logger.info("Saved adapter %r of %s to %s", adapter_name, type(model).__name__, save_directory)


def load_adapter(model: nn.Module, model_id: str, adapter_name: str = "default", is_trainable: bool = False,
                 **kwargs: Any) -> ckpt.LoadResult:
    """Load a PEFT adapter folder (or Hub id) into ``model`` in place as the active adapter ``adapter_name``.

    Args:
        model: The module the adapter was trained on (same architecture and module names).
        model_id: Folder or Hub id; ``subfolder``, ``revision``, ``token``, ``cache_dir`` are honoured.
        adapter_name: A new name.
        is_trainable: Keep the adapter trainable; otherwise it is frozen and ``model`` is set to eval.
        **kwargs: ``config`` (use this config instead of the file's) and the Hub arguments above.

    Returns:
        The legacy keys ignored and the optional keys not found.

    Raises:
        FileNotFoundError, CheckpointError, ValueError: The model is then unchanged.
    """
    config = load_config(model_id, kwargs.pop("config", None), **kwargs)
    config.inference_mode = not is_trainable
    tensors, metadata = load_weights_file(model_id, **kwargs)
    tuner_class(config).config_from_weights(config, tensors)
    add_adapter(model, config, adapter_name)
    try:
        result = ckpt.set_peft_model_state_dict(model, tensors, adapter_name, legacy_ok=_is_legacy(config),
                                                fingerprint=metadata.get(ckpt.FINGERPRINT_KEY))
    except BaseException:
        delete_adapter(model, adapter_name)
        raise
    set_requires_grad(model, adapter_name, is_trainable)
    if not is_trainable:
        model.eval()
    return result


# ---------------------------------------------------------------------------------------------- pipelines
def pipeline_components(pipe: Any, adapter_name: Optional[str] = None) -> dict[str, nn.Module]:
    """The pipeline's ``nn.Module`` components (``unet``, ``text_encoder``, ...), those holding
    ``adapter_name`` only when it is given."""
    components = getattr(pipe, "components", None) or vars(pipe)
    modules = {k: v for k, v in components.items() if isinstance(v, nn.Module)}
    if adapter_name is None:
        return modules
    return {k: v for k, v in modules.items() if adapter_name in _configs(v)}


def save_pipeline_adapters(pipe: Any, save_directory: str, adapter_name: str = "default",
                           safe_serialization: bool = True) -> list[str]:
    """Save ``adapter_name`` of every component holding it to ``save_directory/<component>/``.

    Returns:
        The component names saved.

    Raises:
        ValueError: No component holds ``adapter_name``.
    """
    found = pipeline_components(pipe, adapter_name)
    if not found:
        raise ValueError(f"No component of {type(pipe).__name__} holds adapter {adapter_name!r}")
    for name, module in found.items():
        save_adapter(module, os.path.join(save_directory, name), adapter_name, safe_serialization)
    return sorted(found)


def load_pipeline_adapters(pipe: Any, model_id: str, adapter_name: str = "default", is_trainable: bool = False,
                           components: Optional[list[str]] = None, **kwargs: Any) -> list[str]:
    """Load the adapters of a :func:`save_pipeline_adapters` folder into the pipeline's components;
    all or nothing (a failure removes the components' adapters loaded before it).

    Args:
        pipe: The pipeline (or any object with the component attributes).
        model_id: The pipeline adapter folder, or a Hub id (then ``components`` is required).
        adapter_name: A new name, used in every component.
        is_trainable: Keep the adapters trainable.
        components: Which sub-folders to load; default, for a local folder, every sub-folder holding an
            ``adapter_config.json`` whose name is a component of ``pipe``.
        **kwargs: Hub arguments for :func:`load_adapter`.

    Returns:
        The component names loaded.
    """
    modules = pipeline_components(pipe)
    if components is None:
        if not os.path.isdir(model_id):
            raise ValueError("Pass components=[...] to load a pipeline's adapters from the Hub")
        components = sorted(k for k in modules if os.path.isfile(os.path.join(model_id, k, "adapter_config.json")))
    unknown = [c for c in components if c not in modules]
    if unknown or not components:
        raise ValueError(f"Nothing to load: components {unknown or components} are not among the pipeline's "
                         f"{sorted(modules)} (or {model_id} has no component adapter folders)")
    done: list[str] = []
    try:
        for name in components:
            load_adapter(modules[name], model_id, adapter_name, is_trainable, subfolder=name, **kwargs)
            done.append(name)
    except BaseException:
        for name in done:
            delete_adapter(modules[name], adapter_name)
        raise
    return done
