"""PEFT's public surface, behaviour (2/3): saving and loading, state-dict helpers, ``inject_adapter_in_model``,
the task classes and ``AutoPeftModel``, with peft 0.21.2 as the oracle (see ``peft_surface.py``)."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("peft")

from peft_surface import (  # noqa: E402
    CONFIGS,
    MLP,
    build,
    case_id,
    check,
    for_both_methods,
    grads,
    output,
    quiet,
    raises,
    saved,
    tiny_bert,
    tiny_llama,
    torch_type,
    two_adapters,
    type_name,
)


def _load_adapter(lib, tmp, method, **kw):
    m = build(lib, method)
    quiet(m.save_pretrained, tmp)
    result = quiet(m.load_adapter, tmp, "other", **kw)
    keys = sorted(result.missing_keys), sorted(result.unexpected_keys)
    return sorted(m.peft_config), m.active_adapter, keys, grads(m)


def _from_pretrained(lib, tmp, method, **kw):
    m = build(lib, method)
    quiet(m.save_pretrained, tmp)
    torch.manual_seed(0)
    loaded = quiet(lib.PeftModel.from_pretrained, MLP(), tmp, **kw)
    return type_name(loaded), output(loaded), output(m), grads(loaded), loaded.training, \
        loaded.peft_config["default"].inference_mode


def _half(lib, tmp, method, low_cpu):
    torch.manual_seed(0)
    m = quiet(lib.get_peft_model, MLP().half(), CONFIGS[method](lib), autocast_adapter_dtype=False)
    quiet(m.save_pretrained, tmp)
    loaded = quiet(lib.PeftModel.from_pretrained, MLP().half(), tmp, autocast_adapter_dtype=False,
                   low_cpu_mem_usage=low_cpu)
    quiet(loaded.load_adapter, tmp, "other", autocast_adapter_dtype=False, low_cpu_mem_usage=low_cpu)
    return {n: p.dtype for n, p in loaded.named_parameters() if p.requires_grad or "default" in n or "other" in n}


def _frozen_add(lib, tmp, method):
    m = build(lib, method)
    quiet(m.save_pretrained, tmp)
    torch.manual_seed(5)
    loaded = quiet(lib.PeftModel.from_pretrained, MLP(), tmp, is_trainable=True)
    quiet(loaded.load_adapter, tmp, "third")
    quiet(loaded.add_adapter, "x", CONFIGS[method](lib))
    return grads(loaded)


def _state_dict_roundtrip(lib, tmp, method):
    m = build(lib, method)
    sd = lib.get_peft_model_state_dict(m)
    other = build(lib, method, seed=3)
    result = lib.set_peft_model_state_dict(other, sd)
    return sd, sorted(result.unexpected_keys), output(other)


def _inject(lib, tmp, method):
    torch.manual_seed(0)
    model = quiet(lib.inject_adapter_in_model, CONFIGS[method](lib), MLP())
    return type_name(model), torch_type(model.lin0), sorted(model.state_dict()), output(model), grads(model)


def _save(lib, tmp, method):
    return saved(two_adapters(lib, method), tmp)


def _save_selected(lib, tmp, method):
    m = two_adapters(lib, method)
    quiet(m.save_pretrained, tmp, selected_adapters=["other"])
    return sorted(os.path.relpath(os.path.join(r, f), tmp) for r, _, fs in os.walk(tmp) for f in fs)


def _save_bin(lib, tmp, method):
    quiet(build(lib, method).save_pretrained, tmp, safe_serialization=False)
    return sorted(os.listdir(tmp))


def _model_card(lib, tmp, method):
    m = build(lib, method)
    m.create_or_update_model_card(tmp)
    text = open(os.path.join(tmp, "README.md")).read()
    return text.startswith("---"), "library_name: peft" in text


def _base_state_dict(lib, tmp, method):
    torch.manual_seed(0)
    reference = MLP().state_dict()
    m = build(lib, method)
    got = lib.get_base_model_state_dict(m)
    other = build(lib, method, seed=4)
    lib.set_base_model_state_dict(other, got)
    return reference, got, output(other) - output(m)


def _generate(lib, tmp, method):
    m = tiny_llama(lib, method)
    ids = torch.tensor([[5, 7, 9, 11]])
    return m.generate(input_ids=ids, max_new_tokens=4, do_sample=False), type_name(m)


def _causal_loss(lib, tmp, method):
    m = tiny_llama(lib, method)
    ids = torch.tensor([[5, 7, 9, 11]])
    out = m(input_ids=ids, labels=ids)
    return out.loss.detach(), out.logits.detach()


def _seq_cls(lib, tmp, method):
    m = tiny_bert(lib, method)
    ids = torch.tensor([[5, 7, 9, 11]])
    return (type_name(m), m.modules_to_save, list(m.peft_config["default"].modules_to_save),
            m(input_ids=ids).logits.detach(), sorted(lib.get_peft_model_state_dict(m)))


def _seq_cls_reload(lib, tmp, method):
    m = tiny_bert(lib, method)
    quiet(m.save_pretrained, tmp)
    from transformers import BertConfig, BertForSequenceClassification

    base = BertForSequenceClassification(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64, num_labels=3,
                                                    max_position_embeddings=64))
    loaded = quiet(lib.PeftModel.from_pretrained, base, tmp)
    ids = torch.tensor([[5, 7, 9, 11]])
    return type_name(loaded), loaded(input_ids=ids).logits.detach()


def _from_pretrained_config(lib, tmp, method):
    m = build(lib, method)
    quiet(m.save_pretrained, tmp)
    cfg = CONFIGS[method](lib)
    loaded = quiet(lib.PeftModel.from_pretrained, MLP(), tmp, config=cfg, is_trainable=False)
    # PEFT keeps and changes ``cfg`` itself; here the model holds a resolved copy (docs/migrating.md)
    return loaded.peft_config["default"].inference_mode, type(loaded.peft_config["default"]).__name__


def _bert_task(lib, method, cls_name, task_type):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, num_labels=2, max_position_embeddings=64)
    base = getattr(transformers, cls_name)(cfg).eval()
    kw = {"n_frequency": 10} if method == "fourierft" else {"boft_block_size": 4}
    config = getattr(lib, "FourierFTConfig" if method == "fourierft" else "BOFTConfig")(
        task_type=task_type, init_weights=False, **kw)
    return quiet(lib.get_peft_model, base, config)


def _task_classes(lib, tmp, method):
    out = {}
    ids = torch.tensor([[5, 7, 9, 11]])
    for cls_name, task in [("BertForTokenClassification", "TOKEN_CLS"), ("BertForQuestionAnswering", "QUESTION_ANS"),
                           ("BertModel", "FEATURE_EXTRACTION")]:
        m = _bert_task(lib, method, cls_name, task)
        res = m(input_ids=ids)
        first = res.logits if hasattr(res, "logits") else getattr(res, "start_logits", None)
        first = res.last_hidden_state if first is None else first
        out[task] = (type_name(m), m.modules_to_save, sorted(lib.get_peft_model_state_dict(m)), first.detach())
    return out


def _auto_peft(lib, tmp, method):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, num_labels=3, max_position_embeddings=64)
    base_dir = os.path.join(tmp, "base")
    transformers.BertForSequenceClassification(cfg).save_pretrained(base_dir)
    base = transformers.BertForSequenceClassification.from_pretrained(base_dir).eval()
    kw = {"n_frequency": 10} if method == "fourierft" else {"boft_block_size": 4}
    config = getattr(lib, "FourierFTConfig" if method == "fourierft" else "BOFTConfig")(
        task_type="SEQ_CLS", init_weights=False, **kw)
    m = quiet(lib.get_peft_model, base, config)
    adapter_dir = os.path.join(tmp, "adapter")
    quiet(m.save_pretrained, adapter_dir)
    saved_config = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    ids = torch.tensor([[5, 7, 9, 11]])
    loaded = quiet(lib.AutoPeftModelForSequenceClassification.from_pretrained, adapter_dir)
    return (saved_config["base_model_name_or_path"] == base_dir, type_name(loaded), type_name(loaded.get_base_model()),
            loaded(input_ids=ids).logits.detach(), m(input_ids=ids).logits.detach())


def _not_main_process(lib, tmp, method):
    quiet(build(lib, method).save_pretrained, tmp, is_main_process=False)
    return sorted(os.listdir(tmp))


def _state_dict_other(lib, tmp, method):
    m = two_adapters(lib, method)
    sd = lib.get_peft_model_state_dict(m, adapter_name="other")
    fresh = build(lib, method, seed=7)
    torch.manual_seed(3)
    quiet(fresh.add_adapter, "loaded", CONFIGS[method](lib))
    lib.set_peft_model_state_dict(fresh, sd, adapter_name="loaded")
    fresh.set_adapter("loaded")
    m.set_adapter("other")
    return sd, output(fresh), output(m)


def _inject_state_dict(lib, tmp, method):
    m = build(lib, method, target_modules=["lin1"])
    # the keys as a model without a PeftModel wrapper holds them (no "base_model.model." prefix)
    sd = {k.removeprefix("base_model.model."): v for k, v in lib.get_peft_model_state_dict(m).items()}
    torch.manual_seed(0)
    model = quiet(lib.inject_adapter_in_model, CONFIGS[method](lib, target_modules=["lin0"]), MLP(), state_dict=sd)
    return sorted(model.state_dict()), torch_type(model.lin0), torch_type(model.lin1)


def _seq2seq(lib, tmp, method):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    base = T5ForConditionalGeneration(T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                               decoder_start_token_id=0, pad_token_id=0)).eval()
    extra = {"n_frequency": 10} if method == "fourierft" else {"boft_block_size": 4}
    config = getattr(lib, "FourierFTConfig" if method == "fourierft" else "BOFTConfig")(
        task_type="SEQ_2_SEQ_LM", init_weights=False, **extra)
    m = quiet(lib.get_peft_model, base, config)
    ids = torch.tensor([[5, 7, 9, 11]])
    targets = sorted(m.peft_config["default"].target_modules)  # resolved in the model's config (a copy here)
    return type_name(m), m.generate(input_ids=ids, max_new_tokens=3, do_sample=False), targets



def _bad_selected(lib, tmp, method):
    m = build(lib, method)
    return raises(lambda: m.save_pretrained(tmp, selected_adapters=["nope"]))


def _bad_config_object(lib, tmp, method):
    m = build(lib, method)
    quiet(m.save_pretrained, tmp)
    return raises(lambda: quiet(lib.PeftModel.from_pretrained, MLP(), tmp, config={"peft_type": method.upper()}))


def _from_subfolder(lib, tmp, method):
    m = two_adapters(lib, method)
    quiet(m.save_pretrained, tmp)
    torch.manual_seed(0)
    a = quiet(lib.PeftModel.from_pretrained, MLP(), tmp, subfolder="other", adapter_name="other")
    torch.manual_seed(0)
    b = quiet(lib.PeftModel.from_pretrained, MLP(), os.path.join(tmp, "other"))
    m.set_adapter("other")
    return a.active_adapter, b.active_adapter, output(a), output(b), output(m)



def _plain_generate(lib, tmp, method):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    m = quiet(lib.get_peft_model, base.eval(), CONFIGS[method](lib, target_modules=["q_proj", "v_proj"]))
    ids = torch.tensor([[5, 7, 9, 11]])
    return type_name(m), m.generate(input_ids=ids, max_new_tokens=3, do_sample=False)


CASES = [
    *for_both_methods([
        ("save_pretrained", _save),
        ("save_pretrained(selected_adapters=)", _save_selected),
        ("save_pretrained(safe_serialization=False)", _save_bin),
        ("create_or_update_model_card", _model_card),
        ("PeftModel.from_pretrained", _from_pretrained),
        ("PeftModel.from_pretrained(is_trainable=True)",
            lambda lib, tmp, meth: _from_pretrained(lib, tmp, meth, is_trainable=True)),
        ("PeftModel.from_pretrained(low_cpu_mem_usage=True)",
            lambda lib, tmp, meth: _from_pretrained(lib, tmp, meth, low_cpu_mem_usage=True)),
        ("PeftModel.from_pretrained(config=)", _from_pretrained_config),
        ("PeftModel.load_adapter", _load_adapter),
        ("PeftModel.load_adapter(is_trainable=True)",
            lambda lib, tmp, meth: _load_adapter(lib, tmp, meth, is_trainable=True)),
        ("autocast_adapter_dtype=False fp16 load", lambda lib, tmp, meth: _half(lib, tmp, meth, False)),
        ("autocast_adapter_dtype=False fp16 load (low_cpu_mem_usage)",
            lambda lib, tmp, meth: _half(lib, tmp, meth, True)),
        ("frozen load_adapter/add_adapter keep trainable adapters", _frozen_add),
        ("get/set_peft_model_state_dict", _state_dict_roundtrip),
        ("get/set_base_model_state_dict", _base_state_dict),
        ("inject_adapter_in_model", _inject),
        ("PeftModelForCausalLM.generate", _generate),
        ("PeftModel.generate (no task type)", _plain_generate),
        ("PeftModelForCausalLM.forward(labels=)", _causal_loss),
        ("PeftModelForSequenceClassification", _seq_cls),
        ("PeftModelForSequenceClassification reload", _seq_cls_reload),
        ("PeftModelForTokenClassification/QuestionAnswering/FeatureExtraction", _task_classes),
        ("AutoPeftModelForSequenceClassification.from_pretrained", _auto_peft),
        ("save_pretrained(is_main_process=False)", _not_main_process),
        ("get/set_peft_model_state_dict(adapter_name=)", _state_dict_other),
        ("inject_adapter_in_model(state_dict=)", _inject_state_dict),
        ("PeftModelForSeq2SeqLM.generate", _seq2seq),
        ("save_pretrained(selected_adapters=unknown) raises", _bad_selected),
        ("from_pretrained(config=<not a PeftConfig>) raises", _bad_config_object),
        ("from_pretrained(subfolder=, adapter_name=)", _from_subfolder),
    ]),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_behaves_as_peft(case, tmp_path):
    check(case, tmp_path)
