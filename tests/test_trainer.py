"""transformers.Trainer with fourierft models: the stock Trainer, AdapterTrainer and the parameter groups."""

from __future__ import annotations

import copy
import inspect
import io
import os

import pytest
import torch
import transformers
from conftest import VOCAB, build
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments
from transformers.utils.generic import find_labels

import fourierft
from fourierft import AdapterTrainer, FourierFTConfig, adapter_param_groups, get_peft_model
from fourierft.integrations.spectrum_lr import spectrum_lr

ADAPTER_CHECKPOINT = {"README.md", "adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "rng_state.pth",
                      "scheduler.pt", "trainer_state.json", "training_args.bin"}


def classification_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows with an extra string column that the model does not take (Trainer must drop only that one)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (8,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long),
                     "token_type_ids": torch.zeros(8, dtype=torch.long), "labels": int(ids[0]) % 3, "text": "x"})
    return rows


def lm_rows(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (8,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long), "labels": ids, "text": "x"})
    return rows


def training_args(out, **kwargs) -> TrainingArguments:
    defaults = dict(output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=8, max_steps=6,
                    save_steps=2, report_to="none", use_cpu=True, disable_tqdm=True, seed=0, logging_strategy="no",
                    learning_rate=1e-2)
    return TrainingArguments(**(defaults | kwargs))


def bert_peft(adapter_seed: int = 0):
    base = build("bert").train()
    torch.manual_seed(adapter_seed)
    return get_peft_model(base, FourierFTConfig(task_type="SEQ_CLS", n_frequency=20))


def tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def tied_gpt2():
    return build("gpt2")  # GPT-2 ties lm_head to wte by default


def lm_peft(make_base):
    base = make_base().train()
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    torch.manual_seed(0)
    return get_peft_model(base, FourierFTConfig(task_type="CAUSAL_LM", n_frequency=20,
                                                target_modules=["q_proj", "v_proj", "c_attn"]))


def trained_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------- introspection
def test_forward_signature_is_the_base_models():
    model = bert_peft()
    base_sig = inspect.signature(model.get_base_model().forward)
    assert inspect.signature(model.forward) == base_sig
    clone = copy.deepcopy(model)
    assert clone.forward.__self__ is clone and inspect.signature(clone.forward) == base_sig
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert inspect.signature(torch.load(buffer, weights_only=False).forward) == base_sig


def test_label_names_come_from_the_task_class():
    assert find_labels(fourierft.PeftModelForSequenceClassification) == ["labels"]
    assert find_labels(fourierft.PeftModelForCausalLM) == ["labels"]
    assert find_labels(fourierft.PeftModelForQuestionAnswering) == ["start_positions", "end_positions"]
    assert find_labels(fourierft.PeftModel) == []


def test_user_subclass_keeps_its_forward():
    class Custom(fourierft.PeftModelForSequenceClassification):
        def forward(self, input_ids, attention_mask=None):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask)

    torch.manual_seed(0)
    model = Custom(build("bert"), FourierFTConfig(task_type="SEQ_CLS", n_frequency=20))
    assert list(inspect.signature(model.forward).parameters) == ["input_ids", "attention_mask"]


@pytest.mark.parametrize("make_base", [tied_gpt2, tied_llama], ids=["gpt2", "llama"])
def test_tied_state_dict_saves_with_safetensors_and_loads_back(tmp_path, make_base):
    model = lm_peft(make_base)
    state = model.state_dict()
    save_file(state, str(tmp_path / "model.safetensors"))  # raises on shared tensors
    base = model.get_base_model()
    with torch.no_grad():
        base.get_input_embeddings().weight.zero_()
    model.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    torch.testing.assert_close(base.get_input_embeddings().weight, state[next(k for k in state if "embed" in k
                                                                                 or "wte" in k)])
    live = model.state_dict(keep_vars=True)  # keep_vars callers still get the live (shared) parameters
    assert len({id(v) for v in live.values()}) < len(live)


def test_quantized_base_is_accepted_for_training(tmp_path):
    """Trainer refuses a quantized base (GGUF, bitsandbytes) unless adapters are attached; ours count (checked
    when the Trainer is built, in transformers 4.x and 5)."""
    from types import SimpleNamespace

    base = build("llama")
    base.is_quantized = True  # what loading a GGUF (or bitsandbytes) checkpoint sets
    base.hf_quantizer = SimpleNamespace(is_trainable=True, is_qat_trainable=False)
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=base, args=training_args(tmp_path))
    Trainer(model=get_peft_model(base, FourierFTConfig(task_type="CAUSAL_LM", n_frequency=8)),
            args=training_args(tmp_path))


# ------------------------------------------------------------------------------------- stock Trainer
def skip_if_trainer_cannot_resume() -> None:
    """transformers < 4.47 loads a checkpoint's rng_state.pth with torch.load's default, which torch >= 2.6 makes
    weights-only: it refuses the numpy arrays inside, so no Trainer (stock or ours) can resume (transformers' bug,
    fixed in 4.47 by allow-listing them)."""
    from packaging.version import Version

    if Version(transformers.__version__) < Version("4.47") and Version(torch.__version__) >= Version("2.6"):
        pytest.skip(f"transformers {transformers.__version__} cannot resume Trainer checkpoints under torch "
                    f"{torch.__version__} (weights-only loading refuses rng_state.pth; fixed in transformers 4.47)")


@pytest.mark.parametrize("make_base", [tied_gpt2, tied_llama], ids=["gpt2", "llama"])
def test_stock_trainer_trains_checkpoints_and_resumes_tied_model(tmp_path, make_base):
    def make_trainer(model, out):  # the same schedule both times: evaluation draws from the global RNG too
        return Trainer(model=model, args=training_args(out, eval_strategy="steps", eval_steps=2),
                       train_dataset=lm_rows(24), eval_dataset=lm_rows(8, seed=1))

    model = lm_peft(make_base)
    trainer = make_trainer(model, tmp_path / "a")
    assert trainer.label_names == ["labels"]
    trainer.train()
    assert "eval_loss" in trainer.state.log_history[0]  # labels were found, so an eval loss was computed
    assert "model.safetensors" in os.listdir(tmp_path / "a" / "checkpoint-2")
    final = trained_tensors(model)

    resumed = lm_peft(make_base)
    assert not all(torch.equal(v, trained_tensors(resumed)[k]) for k, v in final.items())
    skip_if_trainer_cannot_resume()
    make_trainer(resumed, tmp_path / "b").train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert_same_tensors(trained_tensors(resumed), final)
    base = resumed.get_base_model()
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight


# ------------------------------------------------------------------------------------- AdapterTrainer
class ScriptedScore:
    """compute_metrics returning a fixed sequence, so that the best checkpoint is known in advance."""

    def __init__(self, scores):
        self.scores = list(scores)

    def __call__(self, pred):
        assert pred.label_ids is not None and len(pred.label_ids) == 8  # labels reached compute_metrics
        return {"score": self.scores.pop(0)}


def adapter_trainer(model, out, **kwargs):
    args = training_args(out, eval_strategy="steps", eval_steps=2, **kwargs)
    return AdapterTrainer(model=model, args=args, train_dataset=classification_rows(24),
                          eval_dataset=classification_rows(8, seed=1), compute_metrics=ScriptedScore([0.1, 0.9, 0.2]))


def test_adapter_trainer_saves_adapter_only_and_loads_best(tmp_path):
    import peft

    model = bert_peft()
    trainer = adapter_trainer(model, tmp_path, load_best_model_at_end=True, metric_for_best_model="score")
    trainer.train()
    for step in (2, 4, 6):
        assert set(os.listdir(tmp_path / f"checkpoint-{step}")) == ADAPTER_CHECKPOINT
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-4")
    best = fourierft.get_peft_model_state_dict(model)
    assert_same_tensors(best, load_file(str(tmp_path / "checkpoint-4" / "adapter_model.safetensors")))
    last = load_file(str(tmp_path / "checkpoint-6" / "adapter_model.safetensors"))
    assert not all(torch.equal(best[k], last[k]) for k in best)
    assert all(p.requires_grad for n, p in model.named_parameters() if "fourierft_spectrum" in n)

    trainer.save_model(str(tmp_path / "final"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "final"))
    assert "model.safetensors" not in os.listdir(tmp_path / "final")
    theirs = peft.PeftModel.from_pretrained(build("bert"), str(tmp_path / "final"))  # PEFT reads it as its own
    batch = {k: torch.stack([r[k] for r in classification_rows(4, seed=2)]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, model.eval()(**batch).logits, atol=1e-5, rtol=1e-4)


def test_adapter_trainer_resumes_from_adapter_checkpoint(tmp_path):
    skip_if_trainer_cannot_resume()
    model = bert_peft()
    adapter_trainer(model, tmp_path / "a").train()
    final = trained_tensors(model)

    resumed = bert_peft(adapter_seed=5)  # another initial spectrum: it must come from the checkpoint
    adapter_trainer(resumed, tmp_path / "b").train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    assert_same_tensors(trained_tensors(resumed), final)


def test_adapter_trainer_learning_rates(tmp_path):
    model = bert_peft()
    trainer = AdapterTrainer(model=model, args=training_args(tmp_path, learning_rate=3e-4, weight_decay=0.1))
    groups = {g["name"]: g for g in trainer.create_optimizer().param_groups}
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    # no adapter_lr: spectra at their layer's rate (tests/test_adapter_lr.py checks the rule)
    assert groups["fourierft_spectrum 32x32 n=20 scaling=150"]["lr"] == spectrum_lr(layer, "default")
    assert groups["head"]["lr"] == groups["head_no_decay"]["lr"] == 3e-4
    assert (groups["head"]["weight_decay"], groups["head_no_decay"]["weight_decay"]) == (0.1, 0.0)

    explicit = AdapterTrainer(model=model, args=training_args(tmp_path), adapter_lr=0.2, head_lr=0.003)
    assert [g["lr"] for g in explicit.create_optimizer().param_groups] == [0.2, 0.003, 0.003]


# ------------------------------------------------------------------------------------- parameter groups
def test_param_groups_split_trainable_tensors():
    model = get_peft_model(build("bert"), FourierFTConfig(task_type="SEQ_CLS", n_frequency=20, bias="all"))
    groups = {g["name"]: g for g in adapter_param_groups(model, adapter_lr=0.05, head_lr=1e-3, weight_decay=0.01)}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {name: {names[id(p)] for p in g["params"]} for name, g in groups.items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set().union(*members.values()) == trainable
    assert sum(len(m) for m in members.values()) == len(trainable)  # no tensor twice
    assert members["adapter"] == {n for n in trainable if "fourierft_spectrum" in n}
    assert members["head"] == {"base_model.model.classifier.modules_to_save.default.weight"}
    assert all(n.endswith("bias") or "LayerNorm" in n for n in members["head_no_decay"])
    assert [(g["lr"], g["weight_decay"]) for g in groups.values()] == [(0.05, 0.0), (1e-3, 0.01), (1e-3, 0.0)]
    torch.optim.AdamW(list(groups.values())).step()  # a plain optimizer accepts them


def test_param_groups_on_injected_model_and_errors():
    model = fourierft.inject_adapter_in_model(FourierFTConfig(target_modules=["lin0"], n_frequency=10), build("mlp"))
    (group,) = adapter_param_groups(model, adapter_lr=0.1, head_lr=1e-3)
    assert group["name"] == "adapter" and len(group["params"]) == 1
    with pytest.raises(ValueError, match="adapter_lr"):
        adapter_param_groups(model, adapter_lr=0.0, head_lr=1e-3)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        adapter_param_groups(model, adapter_lr=0.1, head_lr=1e-3)
