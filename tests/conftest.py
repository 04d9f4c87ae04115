"""Tiny models built from configs (random weights, no downloads) and their inputs."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import pytest
import torch
from hypothesis import settings

# CI draws the same examples every run (a fresh clone has no example database to replay failures from)
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))
logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB = 97


@dataclasses.dataclass(frozen=True)
class MethodCase:
    """One adapter method as the shared tests see it.

    Attributes:
        config_cls: Its config class.
        kwargs: Small settings that fit every test model here (the MLP's 10 -> 20 -> 2 layers included) and
            give an adapter that is not the identity.
    """

    config_cls: type
    kwargs: dict

    def config(self, **overrides: Any):
        return self.config_cls(**{**self.kwargs, **overrides})


def _methods() -> dict[str, MethodCase]:
    from fourierft import BOFTConfig, FourierFTConfig

    return {
        "fourierft": MethodCase(FourierFTConfig, {"n_frequency": 6}),
        "boft": MethodCase(BOFTConfig, {"boft_block_size": 2, "init_weights": False}),
    }


#: The methods every shared test runs on (the one list of methods in the test suite).
METHODS: dict[str, MethodCase] = _methods()


def method_config(method: str, **overrides: Any):
    """``METHODS[method]``'s config, targeting the MLP's two layers unless ``target_modules`` is given."""
    return METHODS[method].config(**{"target_modules": ["lin0", "lin1"], **overrides})


class MLP(nn.Module):
    """PEFT's test MLP shape: lin0 10->20, relu, lin1 20->2."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2, bias=bias)

    def forward(self, X):
        return self.lin1(self.relu(self.lin0(X.float())))


def make_mlp():
    return MLP()


def make_bert_cls(num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=num_labels, max_position_embeddings=64)
    return BertForSequenceClassification(cfg)


def make_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg)


def make_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def make_llama_cls():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_labels=2,
                      pad_token_id=0)
    return LlamaForSequenceClassification(cfg)


def make_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(cfg)


MODELS = {
    "mlp": make_mlp,
    "bert": make_bert_cls,
    "gpt2": make_gpt2,
    "llama": make_llama,
    "llama_cls": make_llama_cls,
    "t5": make_t5,
}


def make_inputs(kind: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return {"X": torch.randn(9, 10, generator=g)}
    ids = torch.randint(1, VOCAB, (2, 7), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "t5":
        inputs["decoder_input_ids"] = torch.randint(1, VOCAB, (2, 5), generator=g)
    return inputs


def model_output(model, kind: str, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def per_adapter_outputs(model, inputs, names: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(mixed, single)``: one mixed batch with ``adapter_names=names``, and the reference the mixed batch
    must equal row by row, the whole batch run with each adapter alone (``"__base__"``: adapters disabled)."""
    with torch.no_grad():
        mixed = model(inputs, adapter_names=names)
        single = {}
        for name in dict.fromkeys(n for n in names if n != "__base__"):
            model.set_adapter(name)
            single[name] = model(inputs)
        with model.disable_adapter():
            single["__base__"] = model(inputs)
    return mixed, single


def assert_visible(changed: torch.Tensor, base: torch.Tensor, atol: float, rtol: float, factor: float = 10.0) -> None:
    """The adapter's effect ``changed - base`` is at least ``factor`` times the tolerance ``atol + rtol * |changed|``
    of the comparisons that must see it, so that a check which misses the adapter (a merge that does nothing, a
    sample run with the wrong adapter) cannot pass."""
    effect = (changed - base).abs().max().item()
    bound = atol + rtol * changed.abs().max().item()
    assert effect > factor * bound, f"the adapter's effect {effect:.2e} is under {factor}x the tolerance {bound:.2e}"


def build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    return MODELS[kind]().eval()


@pytest.fixture
def tmp_dir(tmp_path):
    return str(tmp_path)
