"""``PeftModel`` and its task classes: the user-facing wrapper, adapter management and files.

``PeftModel.base_model`` is the method's tuner (e.g. :class:`~fourierft.FourierFTModel`), whose ``.model``
is the user's model with adapter layers swapped in; state-dict keys therefore read
``base_model.model.<module>...`` exactly as in PEFT.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from typing import Any, Optional

import torch
from torch import nn

from . import quantized
from .config import PeftConfig, PeftType, _as_peft_type
from .hotswap import hotswap_adapter as _hotswap_adapter
from .contract import tuner_class
from .methods import MODEL_CLASSES  # noqa: F401  (imported for its side effect: the methods register)
from .serialization.folders import apply_key_mapping, load_config, load_weights_file, save_adapters
from .serialization.modelcard import write_model_card
from .serialization.state_dict import (
    FINGERPRINT_KEY,
    PEFT_PREFIX,
    LoadResult,
    is_legacy_format,
    set_peft_model_state_dict,
)
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from .trainer_compat import delegating_forward, expose_forward_signature, untie_shared_tensors
from .tuner import PlansFollowMoves, check_adapter_name

logger = logging.getLogger(__name__)


class PeftModel(PlansFollowMoves, nn.Module):
    """A model with adapters (PEFT's ``PeftModel``).

    Args:
        model: The base model; adapter layers are swapped into it in place.
        peft_config: The first adapter's config.
        adapter_name: Its name (``"default"``).
        autocast_adapter_dtype: Keep adapters in fp32 when the base model is fp16/bf16.
        low_cpu_mem_usage: Create adapter tensors on the meta device (to be filled by loading).
    """

    #: Head modules trained in full by this task class (added to ``modules_to_save``).
    task_modules_to_save: tuple[str, ...] = ()
    #: Read by ``transformers.Trainer`` after loading a checkpoint; our state dict omits nothing.
    _keys_to_ignore_on_save = None
    #: Tells ``transformers.Trainer`` that adapters are attached, so it trains a quantized (e.g. GGUF) base.
    #: Private API: transformers has no public flag for "adapters attached" other than this attribute (read
    #: by ``trainer_utils`` and ``modeling_utils``); tests/test_private_api.py fails loudly if it goes away.
    _hf_peft_config_loaded = True

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        check_adapter_name(adapter_name)
        tuner_cls = tuner_class(peft_config)
        self._adapters_disabled = False
        self.base_model = tuner_cls(model, {adapter_name: self._with_task_modules(peft_config)}, adapter_name,
                                    low_cpu_mem_usage=low_cpu_mem_usage, autocast_adapter_dtype=autocast_adapter_dtype)
        flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
            "is_gradient_checkpointing"
        if getattr(model, flag, False):
            self._enable_input_grads()
        expose_forward_signature(self)  # transformers.Trainer keeps dataset columns by this signature
        self.register_state_dict_post_hook(untie_shared_tensors)  # tied embeddings: Trainer's safetensors save

    def __setstate__(self, state: dict) -> None:  # unpickling: re-expose the base forward's signature
        super().__setstate__(state)
        expose_forward_signature(self)

    def _with_task_modules(self, config: PeftConfig) -> PeftConfig:
        """``config``, or a copy of it with this task's head modules added to ``modules_to_save``."""
        if not self.task_modules_to_save:
            return config
        config = copy.deepcopy(config)
        names = list(config.modules_to_save or [])
        # PEFT appends them again on every load; once is enough (the list is a set of names)
        config.modules_to_save = names + [n for n in self.task_modules_to_save if n not in names]
        return config

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    forward = delegating_forward()

    # ------------------------------------------------------------------ introspection
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name (a list only while several are active)."""
        active = self.base_model.active_adapter
        return active[0] if isinstance(active, list) and len(active) == 1 else active

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def has_active_enabled_adapter(self) -> bool:
        """PEFT's flag: ``False`` only inside :meth:`disable_adapter` while an adapter is active (layers
        switched off with ``disable_adapter_layers()`` do not change it, as in PEFT)."""
        return not self._adapters_disabled or not self.active_adapters

    @property
    def peft_type(self) -> PeftType:
        """The adapter method, a :class:`~fourierft.PeftType` member (the plain type string for a method
        registered from outside the package, which the enum does not list)."""
        return _as_peft_type(self.base_model.peft_type)

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapters[0]]

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        names = set()
        for config in self.peft_config.values():
            names.update(config.modules_to_save or ())
        return names or None

    @property
    def base_model_torch_dtype(self) -> Optional[torch.dtype]:
        """The base model's ``dtype`` (``None`` for models without one, e.g. a plain ``nn.Module``)."""
        return getattr(self.get_base_model(), "dtype", None)

    def prepare_plans(self) -> None:
        """Build the adapters' plans on their device now (done after ``to``/``cuda``/``cpu`` by itself)."""
        self.base_model.prepare_plans()

    def get_base_model(self) -> nn.Module:
        """The user's model (with adapter layers in it)."""
        return self.base_model.model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts; ``all`` includes adapters and modules_to_save copies."""
        trainable = total = 0
        for _, param in self.named_parameters():
            count = param.ds_numel if hasattr(param, "ds_numel") else param.numel()
            count *= quantized.values_per_element(param)  # packed 4-bit weights, as PEFT counts them
            total += count
            trainable += count if param.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print PEFT's one-line summary of trainable parameters."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ adapters
    def add_adapter(
        self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a new adapter; it is inactive and frozen until :meth:`set_adapter`.

        Raises:
            ValueError: Duplicate or invalid name, another method, a second adapter with a bias, or a bad
                config; the model is then left exactly as it was.
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name {adapter_name} already exists.")
        tuner_class(peft_config)
        self.base_model.inject_adapter(self.base_model.model, adapter_name, self._with_task_modules(peft_config),
                                       autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage)

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the single active adapter (trainable unless ``inference_mode``)."""
        if not isinstance(adapter_name, str):
            raise TypeError(f"adapter_name must be one adapter's name (str), got {adapter_name!r}")
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} not found.")
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter (see :meth:`fourierft.tuner.AdapterModel.delete_adapter`)."""
        self.base_model.delete_adapter(adapter_name)

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """Each adapter layer's status (PEFT's dataclass): see :func:`fourierft.get_layer_status`."""
        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """The model's adapter status (PEFT's dataclass): see :func:`fourierft.get_model_status`."""
        return get_model_status(self)

    def hotswap_adapter(self, model_id, adapter_name: str = "default", **kwargs: Any) -> None:
        """Replace adapter ``adapter_name``'s weights in place by those of ``model_id`` (a folder, Hub id or
        state dict), without recompiling a ``torch.compile``'d model: see :func:`fourierft.hotswap_adapter`."""
        _hotswap_adapter(self, model_id, adapter_name, **kwargs)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Context manager running the base model: adapters and modules_to_save copies are bypassed.

        Unlike PEFT 0.21.2, the adapters' ``requires_grad`` flags are restored exactly on exit (PEFT makes a
        frozen adapter trainable). Nesting is safe.
        """
        was_disabled = self._adapters_disabled
        enabled = self.base_model.adapter_layers_enabled()
        if enabled == "irregular":
            warnings.warn(
                "The model contains some adapter layers that are enabled and others that are disabled. This is "
                "most likely unintentional. After exiting the disable_adapter context, all adapters will be enabled"
            )
        grads = [(p, p.requires_grad) for p in self.base_model.adapter_tensors()]
        self.base_model.disable_adapter_layers()
        self._adapters_disabled = True
        for p, _ in grads:
            p.requires_grad_(False)
        try:
            yield
        finally:
            if enabled is not False:  # layers switched off before the block stay off (PEFT's rule)
                self.base_model.enable_adapter_layers()
            self._adapters_disabled = was_disabled
            for p, flag in grads:
                p.requires_grad_(flag)

    def generate(self, *args, adapter_names: Optional[list[str]] = None, **kwargs):
        """Generate with the adapted model (arguments as the base model's ``generate``; every task class has it, as in PEFT).

        Args:
            adapter_names: Optional adapter per sample (``"__base__"`` for none), to serve many adapters in
                one batch.
        """
        with self.base_model.mixed_batch(adapter_names):
            return self.get_base_model().generate(*args, **kwargs)

    # ------------------------------------------------------------------ training helpers
    def _enable_input_grads(self) -> None:
        base = self.get_base_model()
        if hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        """Enable gradient checkpointing on the base model, with input gradients for reentrant checkpointing."""
        base = self.get_base_model()
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 deprecates the old name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        self._enable_input_grads()

    # ------------------------------------------------------------------ files
    def save_pretrained(
        self,
        save_directory: str,
        safe_serialization: bool = True,
        selected_adapters: Optional[list[str]] = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> None:
        """Save adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors`` each.

        ``default`` goes into ``save_directory``, any other adapter into ``save_directory/<name>``. Each
        file is written to a temporary folder first and moved into place, so an interrupted save never
        damages the previous adapter.

        Raises:
            ValueError: ``save_directory`` is a file, or ``selected_adapters`` names unknown adapters.
        """
        save_adapters(self, save_directory, safe_serialization, selected_adapters, is_main_process,
                      kwargs.get("state_dict"))

    def push_to_hub(self, repo_id: str, commit_message: Optional[str] = None, private: Optional[bool] = None,
                    token: Optional[str] = None, revision: Optional[str] = None, create_pr: bool = False,
                    safe_serialization: bool = True, **kwargs: Any):
        """Save the adapters to a temporary folder and upload it to the Hub repo ``repo_id``."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, safe_serialization=safe_serialization)
            return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message or
                                     "Upload adapter", revision=revision, create_pr=create_pr)

    def create_or_update_model_card(self, output_dir: str) -> None:
        """Create ``output_dir/README.md``, or update its YAML header (``library_name: peft``, base model, tags)."""
        write_model_card(output_dir, self)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, key_mapping: Optional[dict] = None,
                        strict_adapter_check: str = "warn", **kwargs: Any) -> "PeftModel":
        """Load an adapter saved by ``fourierft`` or ``peft`` (a folder or a Hub repo id) onto ``model``.

        ``strict_adapter_check`` (PEFT 0.22) is checked to be ``"warn"``, ``"error"`` or ``"ignore"``; whichever
        it is, a file whose adapter keys do not fit the model is refused (:class:`CheckpointError`), because a
        partly loaded adapter gives wrong outputs.

        Raises:
            FileNotFoundError: No adapter config or weights.
            CheckpointError: The weights do not fit the model; ``model`` is then returned to its state.
        """
        _check_strict_adapter_check(strict_adapter_check)
        config = copy.deepcopy(load_config(model_id, config, **kwargs))  # the caller's config stays as it is
        config.inference_mode = not is_trainable
        _warn_ephemeral_gpu_offload(ephemeral_gpu_offload)
        weights = _read_weights(model_id, config, key_mapping, **kwargs)  # before touching the model
        target_cls = TASK_CLASSES.get(config.task_type, PeftModel) if cls is PeftModel else cls
        flags = [(p, p.requires_grad) for p in model.parameters()]
        peft_model = target_cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                low_cpu_mem_usage=low_cpu_mem_usage)
        try:
            peft_model._load_weights(weights, adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage, **kwargs)
        except BaseException:
            peft_model.base_model.restore_base_model()
            for p, flag in flags:
                p.requires_grad_(flag)
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False,
                     torch_device: Optional[str] = None, autocast_adapter_dtype: bool = True,
                     ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False,
                     key_mapping: Optional[dict] = None, strict_adapter_check: str = "warn",
                     **kwargs: Any) -> LoadResult:
        """Load an adapter file as adapter ``adapter_name`` (not activated).

        A new name adds the adapter. An existing name reloads its weights in place, as PEFT does (for
        example to go back to a checkpoint); the file's config must then equal the adapter's, apart from
        bookkeeping fields (``inference_mode``, ``peft_version``, ``base_model_name_or_path``, ``revision``).

        ``strict_adapter_check`` is accepted as in :meth:`from_pretrained`: a file that does not fit is refused.

        Returns:
            The keys ignored as legacy and the optional keys not found.

        Raises:
            FileNotFoundError, CheckpointError: On failure the adapter is not added, or an existing one
                keeps its weights.
            ValueError: The file's config differs from the existing adapter's.
        """
        _warn_ephemeral_gpu_offload(ephemeral_gpu_offload)
        _check_strict_adapter_check(strict_adapter_check)
        config = copy.deepcopy(load_config(model_id, kwargs.pop("config", None), **kwargs))
        config.inference_mode = not is_trainable
        weights = _read_weights(model_id, config, key_mapping, **kwargs)
        if adapter_name in self.peft_config:
            result = self._reload_weights(weights, adapter_name, config, **kwargs)
        else:
            self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage,
                             autocast_adapter_dtype=autocast_adapter_dtype)
            try:
                result = self._load_weights(weights, adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage,
                                            **kwargs)
            except BaseException:
                self.base_model.delete_adapter(adapter_name)
                raise
        if torch_device is not None:
            self.to(torch_device)
        self.base_model.set_requires_grad(adapter_name, is_trainable)
        if not is_trainable:
            self.eval()
        return result

    _BOOKKEEPING = ("inference_mode", "peft_version", "base_model_name_or_path", "revision", "auto_mapping")

    def _reload_weights(self, weights: tuple[dict, dict], adapter_name: str, config, **kwargs):
        """Load ``weights`` into the existing adapter ``adapter_name``; on failure its tensors are restored."""
        existing = self.peft_config[adapter_name]
        old, new = existing.to_dict(), config.to_dict()
        differ = sorted(k for k in set(old) | set(new) if k not in self._BOOKKEEPING and old.get(k) != new.get(k))
        if differ:
            raise ValueError(
                f"Adapter {adapter_name!r} already exists with a different config ({', '.join(differ)} differ); "
                f"load the file under a new name, or delete_adapter({adapter_name!r}) first."
            )
        mine = list(self.base_model.adapter_tensors([adapter_name]))
        saved = [t.detach().clone() for t in mine]
        try:
            return self._load_weights(weights, adapter_name, config, low_cpu_mem_usage=False, **kwargs)
        except BaseException:
            with torch.no_grad():
                for t, old_value in zip(mine, saved):
                    t.copy_(old_value)
            raise

    def _load_weights(self, weights: tuple[dict, dict], adapter_name: str, config, *, low_cpu_mem_usage: bool,
                      **kwargs):
        tensors, metadata = weights
        return set_peft_model_state_dict(
            self, tensors, adapter_name, ignore_mismatched_sizes=kwargs.get("ignore_mismatched_sizes", False),
            low_cpu_mem_usage=low_cpu_mem_usage, legacy_ok=is_legacy_format(config),
            fingerprint=metadata.get(FINGERPRINT_KEY),
        )


def _check_strict_adapter_check(value: object) -> None:
    if value not in ("warn", "error", "ignore"):
        raise ValueError(f"strict_adapter_check must be one of 'warn', 'error' or 'ignore', got {value!r}")


def _warn_ephemeral_gpu_offload(ephemeral_gpu_offload: bool) -> None:
    if ephemeral_gpu_offload:
        warnings.warn("ephemeral_gpu_offload=True is ignored: fourierft loads adapter weights where the model's "
                      "adapter tensors are and has no temporary GPU offload", UserWarning, stacklevel=3)


def _read_weights(model_id: str, config: PeftConfig, key_mapping: Optional[dict] = None,
                  **kwargs) -> tuple[dict, dict]:
    """Read the weights file, rename its keys by ``key_mapping`` (PEFT's ``{regex: replacement}``), and let the
    method adapt the config to it (e.g. BOFT's factor count).

    Renamed keys drop the file's position fingerprint: it hashes the layer names it was saved under."""
    tensors, metadata = load_weights_file(model_id, **kwargs)
    if key_mapping:
        tensors = apply_key_mapping(tensors, key_mapping)
        metadata = {k: v for k, v in metadata.items() if k != FINGERPRINT_KEY}
    tuner_class(config).config_from_weights(config, tensors)
    return tensors, metadata


class PeftModelForSequenceClassification(PeftModel):
    """Sequence classification; the head (``classifier``, ``score``, and DistilBERT's ``pre_classifier``) is
    trained and saved in full (PEFT 0.22's list)."""

    task_modules_to_save = ("classifier", "score", "pre_classifier")
    forward = delegating_forward("labels")


class PeftModelForTokenClassification(PeftModel):
    """Token classification; the head (``classifier``, ``score`` or ``pre_classifier``) is trained and saved in
    full (PEFT 0.22's list)."""

    task_modules_to_save = ("classifier", "score", "pre_classifier")
    forward = delegating_forward("labels")


class PeftModelForQuestionAnswering(PeftModel):
    """Extractive question answering; ``qa_outputs`` is trained and saved in full."""

    task_modules_to_save = ("qa_outputs",)
    forward = delegating_forward("start_positions", "end_positions")


class PeftModelForFeatureExtraction(PeftModel):
    """Feature extraction (encoders returning hidden states)."""


class PeftModelForCausalLM(PeftModel):
    """Causal language modelling, with ``generate``."""

    #: ``pipeline_tag`` of the model card written beside saved adapters.
    model_card_pipeline_tag: Optional[str] = "text-generation"

    forward = delegating_forward("labels")

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return self.get_base_model().prepare_inputs_for_generation(*args, **kwargs)


class PeftModelForSeq2SeqLM(PeftModelForCausalLM):
    """Sequence-to-sequence language modelling, with ``generate``."""

    model_card_pipeline_tag = None


TASK_CLASSES: dict[Optional[str], type[PeftModel]] = {
    "SEQ_CLS": PeftModelForSequenceClassification,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "QUESTION_ANS": PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
    "CAUSAL_LM": PeftModelForCausalLM,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
}


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: Optional[str] = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Wrap ``model`` with a new adapter and return the ``PeftModelFor<task_type>`` (or ``PeftModel``).

    Raises:
        ValueError: ``mixed=True`` (these methods cannot be mixed with others) or a bad config/target.
    """
    if mixed:
        raise ValueError(f"{peft_config.peft_type} does not support mixed adapter models (mixed=True)")
    tuner_class(peft_config)
    peft_config = copy.deepcopy(peft_config)  # the model's own copy; the caller's object is never changed
    name = getattr(model, "name_or_path", None)
    peft_config.base_model_name_or_path = name or None
    if revision is not None:
        peft_config.revision = revision
    cls = TASK_CLASSES.get(peft_config.task_type, PeftModel)
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
               low_cpu_mem_usage=low_cpu_mem_usage)


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, state_dict: Optional[dict] = None) -> nn.Module:
    """Swap adapter layers into ``model`` without a ``PeftModel`` wrapper and return it.

    Args:
        state_dict: If given, target exactly the modules that have adapter tensors in it.
    """
    tuner_cls = tuner_class(peft_config)
    if state_dict is not None:
        peft_config = copy.deepcopy(peft_config)
        marker = "." + tuner_cls.prefix
        paths = {k.split(marker)[0] for k in state_dict if marker in k}
        peft_config.target_modules = {p[len(PEFT_PREFIX):] if p.startswith(PEFT_PREFIX) else p
                                      for p in paths}
    tuner = tuner_cls(model, {adapter_name: peft_config}, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    return tuner.model

