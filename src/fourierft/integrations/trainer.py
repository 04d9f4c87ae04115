"""``AdapterTrainer``: ``transformers.Trainer`` with what a PEFT user gets, for fourierft models.

The stock Trainer (and TRL's trainers, which derive from it) recognise only ``peft.PeftModel`` as an adapter
model; for anything else they checkpoint the full ``state_dict`` into ``model.safetensors`` (it works with
fourierft models, see :mod:`fourierft.trainer_compat`, but every checkpoint holds the whole base model).
:class:`AdapterTrainerMixin` holds what makes a trainer adapter-aware for fourierft models, once, for
:class:`AdapterTrainer` and for the TRL trainers of :mod:`fourierft.trl`. It overrides six of Trainer's hooks:

* ``_save`` and ``save_model``: checkpoints and ``save_model`` write the adapters in PEFT's format
  (``adapter_config.json`` + ``adapter_model.safetensors`` per adapter), the tokenizer and
  ``training_args.bin``; Trainer adds its own state (optimizer, scheduler, RNG, ``trainer_state.json``)
  beside them. Under DeepSpeed, ``save_model`` gathers the adapter on every rank and rank 0 writes it.
* ``_load_from_checkpoint`` (``train(resume_from_checkpoint=...)``) and ``_load_best_model``
  (``load_best_model_at_end=True``): the adapter files are loaded into the existing adapters, in place, so
  the optimizer keeps pointing at the same tensors.
* ``create_optimizer``: separate learning rates for the adapter tensors (by default one per FourierFT layer
  width) and for the rest (head, ``modules_to_save``, trainable biases); see
  :func:`~fourierft.integrations.optim.adapter_param_groups`.
* ``training_step``: one :func:`~fourierft.cached_merged_weights` scope per optimizer step.

Three of them are private Trainer methods: Trainer has no public hook for how a checkpoint is written or read
back (its callbacks run after the files exist). Any other model, and loading under DeepSpeed/FSDP, go to
Trainer's own implementation (DeepSpeed resumes from its own ``global_step*`` state in the checkpoint);
tests/test_private_api.py fails loudly if the three names or their arguments change.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from torch import nn
from transformers import Trainer

from ..ops.scope import cached_merged_weights
from ..peft_model import PeftModel
from ..serialization.folders import adapter_dir, load_weights_file
from ..serialization.state_dict import FINGERPRINT_KEY, set_peft_model_state_dict
from ..serialization.tensors import WEIGHTS_NAMES
from .callbacks import SpectrumLRCallback
from .optim import adapter_param_groups, adapter_tensor_ids

logger = logging.getLogger(__name__)

TRAINING_ARGS_NAME = "training_args.bin"
_WEIGHT_FILES = WEIGHTS_NAMES


def has_adapter_files(folder: Optional[str]) -> bool:
    """Whether ``folder`` holds adapter weights at its root or in an adapter sub-folder."""
    if not folder or not os.path.isdir(folder):
        return False
    candidates = [folder] + [os.path.join(folder, d) for d in os.listdir(folder)]
    return any(os.path.isfile(os.path.join(c, f)) for c in candidates for f in _WEIGHT_FILES)


def load_adapter_weights(model: PeftModel, folder: str) -> list[str]:
    """Load the weights of every adapter of ``model`` that has files in ``folder`` (PEFT's layout).

    The tensors are copied into the existing parameters, so optimizers and requires_grad flags are kept.

    Returns:
        The names of the adapters loaded.

    Raises:
        FileNotFoundError: An active adapter has no weights in ``folder``.
        fourierft.CheckpointError: The weights do not fit the adapter (nothing is changed for it).
    """
    loaded = []
    for name in model.peft_config:
        path = adapter_dir(folder, name)
        if not any(os.path.isfile(os.path.join(path, f)) for f in _WEIGHT_FILES):
            continue
        tensors, metadata = load_weights_file(path)
        set_peft_model_state_dict(model, tensors, name, fingerprint=metadata.get(FINGERPRINT_KEY))
        loaded.append(name)
    missing = [n for n in model.active_adapters if n not in loaded]
    if missing:
        raise FileNotFoundError(f"No weights for adapter(s) {missing} in {folder}")
    logger.info("Loaded adapter(s) %s from %s", loaded, folder)
    return loaded


class AdapterTrainerMixin:
    """What makes a ``transformers.Trainer`` subclass adapter-aware for fourierft models (see the module's
    docstring): adapter-only checkpoints, in-place resume, adapter learning rates, the merged-weights scope.

    Put it before the trainer class in the bases: ``class MyTrainer(AdapterTrainerMixin, Trainer)``.
    :class:`AdapterTrainer` and every trainer of :mod:`fourierft.trl` are built this way.

    Args:
        *args: As the trainer class it is mixed into.
        adapter_lr: One learning rate for all adapter tensors. Default: each FourierFT layer gets the rate
            its width needs (:func:`~fourierft.integrations.spectrum_lr.spectrum_lr`); other methods their
            entry in :data:`~fourierft.contract.DEFAULT_ADAPTER_LR`, else ``head_lr``.
        head_lr: Learning rate of the other trainable tensors (head, ``modules_to_save``, biases).
            Default: ``args.learning_rate``.
        **kwargs: As the trainer class it is mixed into.

    It installs a :class:`~fourierft.integrations.callbacks.SpectrumLRCallback`, which warns once if a
    FourierFT spectrum's learning rate is far too small for its layer.
    """

    #: The fourierft model whose transformers model the trainer holds as ``self.model``, where a trainer must
    #: hold that one (:mod:`fourierft.integrations.trl`); checkpoints are then still the adapters of this model.
    _adapter_owner: Optional[PeftModel] = None

    def __init__(self, *args, adapter_lr: Optional[float] = None, head_lr: Optional[float] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.adapter_lr = adapter_lr
        self.head_lr = head_lr
        self._merged_scope = None  # open across the micro-batches of one optimizer step (training_step)
        if not any(isinstance(c, SpectrumLRCallback) for c in self.callback_handler.callbacks):
            self.add_callback(SpectrumLRCallback())

    def _adapter_model(self, model: Optional[nn.Module] = None) -> Optional[PeftModel]:
        model = self.model if model is None else model
        try:
            model = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        except TypeError:  # accelerate < 1.2 has no keep_torch_compile
            model = getattr(self.accelerator.unwrap_model(model), "_orig_mod", model)
        if isinstance(model, PeftModel):
            return model
        owner = self._adapter_owner  # a trainer that trains the transformers model inside a fourierft model
        return owner if owner is not None and model is owner.get_base_model() else None

    def training_step(self, model: nn.Module, inputs, *args, **kwargs):
        """Trainer's step, inside one :func:`~fourierft.cached_merged_weights` scope per optimizer step: with
        gradient accumulation each FourierFT layer on the ``W + dW`` route builds it once for all micro-batches,
        and each BOFT layer computes ``Q = cayley(R)`` once.
        The scope closes (freeing those weights) after the micro-batch that precedes the optimizer step."""
        if self._merged_scope is None:
            self._merged_scope = cached_merged_weights()
            self._merged_scope.__enter__()
        last = True
        try:
            result = super().training_step(model, inputs, *args, **kwargs)
            last = self.accelerator.sync_gradients
            return result
        finally:
            if last:  # also on an error: never leave the scope open
                scope, self._merged_scope = self._merged_scope, None
                scope.__exit__(None, None, None)

    def _distributed_state(self) -> bool:
        return bool(getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False))

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model: Optional[nn.Module] = None):
        """Build the optimizer with :func:`adapter_param_groups` (adapter lr vs. head lr)."""
        opt_model = self.model if model is None else model
        if self.optimizer is not None or not adapter_tensor_ids(opt_model):
            return super().create_optimizer() if model is None else super().create_optimizer(model)
        user_choice = getattr(self, "optimizer_cls_and_kwargs", None)
        optimizer_cls, optimizer_kwargs = user_choice or self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        special = {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)
        if special or not isinstance(optimizer_cls, type) or not issubclass(optimizer_cls, torch.optim.Optimizer):
            logger.warning("Optimizer %s builds its own parameter groups; adapter_lr/head_lr are not applied",
                           getattr(optimizer_cls, "__name__", optimizer_cls))
            return super().create_optimizer() if model is None else super().create_optimizer(model)
        head_lr = self.head_lr if self.head_lr is not None else self.args.learning_rate
        groups = adapter_param_groups(opt_model, adapter_lr=self.adapter_lr, head_lr=head_lr,
                                      weight_decay=self.args.weight_decay, check_lr=False)  # the callback checks
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # ------------------------------------------------------------------ saving and loading
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """As ``Trainer.save_model``; under DeepSpeed every rank gathers the adapter tensors and rank 0 writes them.

        Trainer would gather the whole model, or with ZeRO-3 and ``stage3_gather_16bit_weights_on_model_save``
        false hand over an empty state dict; adapters are small, so they are always gathered, and the base
        model never is. Call it on every rank, as Trainer does.
        """
        model = self._adapter_model()
        if model is None or not getattr(self, "is_deepspeed_enabled", False):
            return super().save_model(output_dir, _internal_call)
        self._write_adapters(model, output_dir if output_dir is not None else self.args.output_dir, None,
                             is_main_process=self.args.should_save)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save")

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        model = self._adapter_model()
        if model is None:
            return super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            self._write_adapters(model, output_dir if output_dir is not None else self.args.output_dir, state_dict)

    def _write_adapters(self, model: PeftModel, output_dir: str, state_dict: Optional[dict],
                        is_main_process: bool = True) -> None:
        if is_main_process:
            os.makedirs(output_dir, exist_ok=True)
            logger.info("Saving adapter checkpoint to %s", output_dir)
        model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=is_main_process)
        if not is_main_process:
            return
        processor = getattr(self, "processing_class", None) or getattr(self.data_collator, "tokenizer", None)
        if processor is not None:
            processor.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        peft_model = self._adapter_model(model)
        if peft_model is None or self._distributed_state() or not has_adapter_files(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter_weights(peft_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        peft_model = self._adapter_model()
        if peft_model is None or self._distributed_state() or not has_adapter_files(best):
            return super()._load_best_model()
        logger.info("Loading best adapter from %s (score: %s).", best, self.state.best_metric)
        load_adapter_weights(peft_model, best)


class AdapterTrainer(AdapterTrainerMixin, Trainer):
    """A ``transformers.Trainer`` that checkpoints adapters only and trains them at their own learning rate.

    Use it exactly like ``Trainer``; ``TrainingArguments.learning_rate`` is the learning rate of the head
    and every other non-adapter tensor, as it would be with full fine-tuning. Extra keyword arguments
    ``adapter_lr`` and ``head_lr``: see :class:`AdapterTrainerMixin`.

    Example::

        trainer = AdapterTrainer(model=peft_model, args=TrainingArguments("out", learning_rate=1e-3),
                                 train_dataset=train)   # spectra: a learning rate per layer width
        trainer.train()                      # checkpoint-N/ hold adapter_model.safetensors + trainer state
        trainer.train(resume_from_checkpoint=True)
    """
