"""``AutoPeftModelFor*``: load the base model named in an adapter's config, then the adapter."""

from __future__ import annotations

from typing import Optional

import transformers

from .config import PeftConfig
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from .serialization.folders import load_config
from .hub import LOCATION_KWARGS


class _AutoPeftModel:
    """Reads ``adapter_config.json``, loads ``base_model_name_or_path`` with the matching transformers Auto
    class, then applies the adapter with the matching ``PeftModelFor*`` class."""

    auto_class_name: str = ""
    peft_class: type[PeftModel] = PeftModel
    task_type: Optional[str] = None

    def __init__(self, *args, **kwargs) -> None:
        raise EnvironmentError(f"{type(self).__name__} is built with from_pretrained(), not instantiated")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        revision: Optional[str] = None, import_allowlist: Optional[list[str]] = None,
                        **kwargs) -> PeftModel:
        """Load base model and adapter.

        Args:
            pretrained_model_name_or_path: The adapter's folder or Hub repo id.
            adapter_name: Name of the loaded adapter.
            is_trainable: Load the adapter for training.
            config: Use this config instead of the file's.
            revision: Revision of the base model (default: the adapter config's ``revision``).
            import_allowlist: PEFT's limit on the modules ``auto_mapping`` may import a base-model class from.
                Accepted for compatibility; nothing is imported from ``auto_mapping`` here, whatever it holds: the
                base model is always built by the transformers Auto class.
            **kwargs: Hub options, then arguments for the base model's ``from_pretrained``.

        Raises:
            ValueError: The adapter's ``task_type`` does not match this class, or it names no base model.
        """
        hub = {k: kwargs.pop(k) for k in LOCATION_KWARGS if k in kwargs}
        config = load_config(pretrained_model_name_or_path, config, **hub)
        if cls.task_type is not None and config.task_type != cls.task_type:
            raise ValueError(
                f"Expected adapter task type {cls.task_type}, got {config.task_type}; use the matching AutoPeftModel class"
            )
        if not config.base_model_name_or_path:
            raise ValueError(f"The adapter at {pretrained_model_name_or_path} does not name its base model")
        auto_class = getattr(transformers, cls.auto_class_name)
        base_revision = config.revision if revision is None else revision
        base = auto_class.from_pretrained(config.base_model_name_or_path, revision=base_revision, **kwargs)
        return cls.peft_class.from_pretrained(base, pretrained_model_name_or_path, adapter_name=adapter_name,
                                              is_trainable=is_trainable, config=config, **hub)


def _auto(name: str, auto_class_name: str, peft_class: type[PeftModel], task_type: Optional[str]):
    doc = f"Load an adapter and its base model with ``transformers.{auto_class_name}``."
    return type(name, (_AutoPeftModel,), {"auto_class_name": auto_class_name, "peft_class": peft_class,
                                          "task_type": task_type, "__doc__": doc})


AutoPeftModel = _auto("AutoPeftModel", "AutoModel", PeftModel, None)
AutoPeftModelForCausalLM = _auto("AutoPeftModelForCausalLM", "AutoModelForCausalLM", PeftModelForCausalLM,
                                 "CAUSAL_LM")
AutoPeftModelForSeq2SeqLM = _auto("AutoPeftModelForSeq2SeqLM", "AutoModelForSeq2SeqLM", PeftModelForSeq2SeqLM,
                                  "SEQ_2_SEQ_LM")
AutoPeftModelForSequenceClassification = _auto("AutoPeftModelForSequenceClassification",
                                               "AutoModelForSequenceClassification",
                                               PeftModelForSequenceClassification, "SEQ_CLS")
AutoPeftModelForTokenClassification = _auto("AutoPeftModelForTokenClassification", "AutoModelForTokenClassification",
                                            PeftModelForTokenClassification, "TOKEN_CLS")
AutoPeftModelForQuestionAnswering = _auto("AutoPeftModelForQuestionAnswering", "AutoModelForQuestionAnswering",
                                          PeftModelForQuestionAnswering, "QUESTION_ANS")
AutoPeftModelForFeatureExtraction = _auto("AutoPeftModelForFeatureExtraction", "AutoModel",
                                          PeftModelForFeatureExtraction, "FEATURE_EXTRACTION")
