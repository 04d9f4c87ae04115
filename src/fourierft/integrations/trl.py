"""TRL's trainers for fourierft models: the adapter paths TRL gives ``peft.PeftModel``, through its own trainers.

TRL (like ``transformers.Trainer``) recognises an adapter model only by ``isinstance(model, peft.PeftModel)``.
For any other model it takes the full fine-tuning paths: its fused LM head patches the model it was given and
calls that model's ``base_model`` as the transformer backbone, checkpoints hold the whole model, and DPO, KTO,
GRPO and RLOO load a second copy of the base as their reference. Each trainer of :mod:`fourierft.trl` is
TRL's class with two mixins in front, and patches nothing of TRL, transformers, accelerate or peft:

* :class:`TRLAdapterMixin` hands TRL the transformers model *inside* the fourierft model (its adapter layers
  are in that model's modules), so TRL's fused LM head patches the real causal LM and runs its backbone with
  the adapters active; once TRL is set up, ``trainer.model`` is the fourierft model again, so saving, merging
  and ``trainer.model.save_pretrained`` behave as with peft. The reference is an
  :class:`AdapterDisabledReference`, the same model under ``disable_adapter()``: no copy of the base is loaded.
  A fourierft ``peft_config`` builds the fourierft model, as TRL does with a peft config.
* :class:`~fourierft.integrations.trainer.AdapterTrainerMixin` (shared with :class:`~fourierft.AdapterTrainer`)
  writes adapter-only checkpoints in PEFT's format, resumes in place, gives adapters their learning rates and
  opens one merged-weights scope per optimizer step.

Everything else (datasets, collators, losses, generation, logging) is TRL's own code, unchanged.
"""

from __future__ import annotations

import copy
import inspect
import logging
from typing import Any

from torch import nn

from ..config import PeftConfig
from ..layer import AdapterLayer
from ..peft_model import PeftModel, get_peft_model
from .trainer import AdapterTrainerMixin

logger = logging.getLogger(__name__)

#: TRL's trainers that take the adapter paths, by name (those of the installed TRL are built).
TRAINER_NAMES = ("SFTTrainer", "DPOTrainer", "GRPOTrainer", "KTOTrainer", "RLOOTrainer", "RewardTrainer",
                 "DistillationTrainer")
#: Trainers that build their reference model themselves when ``args.beta != 0`` (no ``ref_model`` argument).
_BETA_REFERENCE = ("GRPOTrainer", "RLOOTrainer")
#: Trainers whose model is a sequence classifier (loaded with one label from a path, as TRL does).
_SEQUENCE_CLASSIFIERS = ("RewardTrainer",)
#: Trainers that read ``model.base_model`` as the backbone of the model they hold (not only through the fused
#: LM head): they keep the transformers model as ``trainer.model``.
_HOLD_TRANSFORMERS_MODEL = ("DistillationTrainer",)


class _DisabledBackbone(nn.Module):
    """The transformer backbone of a fourierft model, run with the adapters disabled.

    The model is held outside ``nn.Module``'s registry, so ``.to()``, ``.eval()``, ``requires_grad_()`` or
    dropout changes made to the reference by a trainer never reach the trained model.
    """

    def __init__(self, peft_model: PeftModel) -> None:
        super().__init__()
        object.__setattr__(self, "_peft_model", peft_model)

    def forward(self, *args, **kwargs):
        """The backbone's forward (its ``last_hidden_state`` feeds TRL's fused LM head), adapters disabled."""
        model = self._peft_model
        with model.disable_adapter():
            return model.get_base_model().base_model(*args, **kwargs)


class AdapterDisabledReference(nn.Module):
    """A fourierft model with its adapters disabled, used as TRL's reference model. It owns no tensors.

    Calling it runs the same base model as the trained policy, with every adapter (and ``modules_to_save``
    copy) bypassed, which is what ``peft.PeftModel.disable_adapter()`` gives TRL for a peft model: the base
    model, without a second copy in memory. It offers what TRL reads from a reference: ``config``,
    ``base_model`` (the backbone, for TRL's fused LM head), ``get_output_embeddings()`` and ``forward``.

    Args:
        peft_model: The fourierft model being trained.
    """

    def __init__(self, peft_model: PeftModel) -> None:
        super().__init__()
        object.__setattr__(self, "_peft_model", peft_model)
        object.__setattr__(self, "_backbone", _DisabledBackbone(peft_model))

    @property
    def config(self):
        """The base model's config."""
        return self._peft_model.get_base_model().config

    @property
    def base_model(self) -> nn.Module:
        """The backbone, run with the adapters disabled."""
        return self._backbone

    @property
    def dtype(self):
        return self._peft_model.get_base_model().dtype

    @property
    def device(self):
        return self._peft_model.get_base_model().device

    def get_output_embeddings(self) -> nn.Module:
        """The base model's LM head (never adapted: :class:`TRLAdapterMixin` refuses an adapter there)."""
        return self._peft_model.get_base_model().get_output_embeddings()

    def forward(self, *args, **kwargs):
        """The base model's forward (with TRL's fused LM head when TRL added one), adapters disabled."""
        model = self._peft_model
        with model.disable_adapter():
            return model.get_base_model()(*args, **kwargs)


def _load_base(trainer_name: str, model_id: str, args) -> nn.Module:
    """Load the base model of a path as TRL would for this trainer (TRL's own loader)."""
    from trl.trainer.utils import create_model_from_path

    kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
    if trainer_name in _SEQUENCE_CLASSIFIERS:
        from transformers import AutoModelForSequenceClassification

        kwargs.setdefault("num_labels", 1)
        return create_model_from_path(model_id, architecture=AutoModelForSequenceClassification, **kwargs)
    return create_model_from_path(model_id, **kwargs)


class TRLAdapterMixin:
    """Gives a TRL trainer a fourierft model the way TRL treats a ``peft.PeftModel`` (see the module docstring).

    Accepts everything the TRL trainer accepts. ``model`` may be a fourierft model, or a model (or a path) with
    a fourierft ``peft_config``; anything else (a plain model, a peft model, a peft config) goes to TRL as it is.
    """

    _trl_name: str = ""
    _trl_class: type = object

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        mixin_kwargs = {k: kwargs.pop(k) for k in ("adapter_lr", "head_lr") if k in kwargs}
        parameters = inspect.signature(self._trl_class.__init__).parameters
        call = dict(inspect.signature(self._trl_class.__init__).bind_partial(self, *args, **kwargs).arguments)
        del call["self"]
        call.update(mixin_kwargs)
        model, config, train_args = call.get("model"), call.get("peft_config"), call.get("args")
        if isinstance(model, PeftModel) and config is not None:
            raise ValueError("The model already has fourierft adapters: pass it without `peft_config`, or pass its "
                             "base model (model.unload()) with the new `peft_config`.")
        if isinstance(config, PeftConfig):
            self._check_args(train_args)
            model, call["peft_config"] = self._build(model, config, train_args), None
        if not isinstance(model, PeftModel):
            super().__init__(**call)
            return
        self._check_args(train_args)
        self._check_head(model, built=isinstance(config, PeftConfig))
        if getattr(train_args, "activation_checkpointing", None) or getattr(train_args, "gradient_checkpointing", False):
            model.get_base_model().enable_input_require_grads()  # reentrant checkpointing needs input gradients
        call["model"] = model.get_base_model()
        beta = None
        if "ref_model" in parameters:
            if call.get("ref_model") is None:
                call["ref_model"] = AdapterDisabledReference(model)
        elif self._trl_name in _BETA_REFERENCE and train_args is not None and train_args.beta != 0.0:
            beta, call["args"] = train_args.beta, copy.copy(train_args)
            call["args"].beta = 0.0  # TRL would load a copy of the base; the reference is set below instead
        super().__init__(**call)
        if beta is not None:
            self.args, self.beta = train_args, beta
            self.ref_model = AdapterDisabledReference(model)
        self._adapter_owner = model  # checkpoints hold its adapters, whichever model the trainer holds
        if self._trl_name not in _HOLD_TRANSFORMERS_MODEL:
            # TRL has patched the transformers model (fused LM head); the trainer holds the fourierft model again
            self.model = self.model_wrapped = model
            self.callback_handler.model = model

    def _build(self, model, config: PeftConfig, train_args) -> PeftModel:
        """The fourierft model of ``model`` (a model or a path) and ``config``, seeded as TRL seeds peft's."""
        from transformers import set_seed

        if isinstance(model, str):
            model = _load_base(self._trl_name, model, train_args)
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a model or a path, got {type(model).__name__}")
        set_seed(train_args.seed if train_args is not None else 42)  # adapter init is random, as in TRL
        return get_peft_model(model, config)

    @staticmethod
    def _check_args(train_args) -> None:
        """Refuse the settings that need a ``peft.PeftModel``, before anything is built."""
        if getattr(train_args, "use_vllm", False):
            raise NotImplementedError(
                "use_vllm=True is not supported with fourierft models: TRL's vLLM weight sync streams a model it "
                "recognises as a peft.PeftModel. Generate with transformers (use_vllm=False), or serve a LoRA "
                "conversion of the adapter with vLLM (fourierft.convert_to_lora).")
        if getattr(train_args, "sync_ref_model", False):
            raise NotImplementedError("sync_ref_model=True is not supported with adapters: the reference is the "
                                      "model with its adapters disabled, which is never updated.")

    @staticmethod
    def _check_head(model: PeftModel, built: bool) -> None:
        """Refuse an adapter on the LM head, as TRL does for peft models; a model built here is unloaded first,
        so the caller's base model is left as it was."""
        base = model.get_base_model()
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if isinstance(head, AdapterLayer):
            if built:
                model.unload()
            raise ValueError("An adapter on the LM head is not supported: TRL computes log-probabilities from the "
                             "head's weight directly, so the adapter would never be trained. Remove the head from "
                             "`target_modules`.")


def build_trainer_class(trl_class: type) -> type:
    """The fourierft version of a TRL trainer class: same name, same arguments, fourierft models welcome."""
    name = trl_class.__name__
    doc = (f"TRL's ``{name}`` for fourierft models (and everything it takes already): adapter-only checkpoints in "
           "PEFT's format, in-place resume, TRL's fused LM head on the adapted model, and the adapter-disabled "
           "model as the reference. Arguments as ``trl." + name + "``, plus ``adapter_lr`` and ``head_lr`` "
           "(:class:`~fourierft.integrations.trainer.AdapterTrainerMixin`). See :mod:`fourierft.integrations.trl`.")
    return type(name, (TRLAdapterMixin, AdapterTrainerMixin, trl_class),
                {"__doc__": doc, "__module__": "fourierft.trl", "_trl_name": name, "_trl_class": trl_class,
                 "__qualname__": name})


def trainer_classes() -> dict[str, type]:
    """Every trainer of :data:`TRAINER_NAMES` that the installed TRL has, as a fourierft trainer class."""
    import trl

    classes = {}
    for name in TRAINER_NAMES:
        try:
            trl_class = getattr(trl, name)
        except (AttributeError, ImportError, RuntimeError) as err:
            logger.debug("trl.%s is not available: %s", name, err)
            continue
        classes[name] = build_trainer_class(trl_class)
    return classes

