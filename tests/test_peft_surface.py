"""PEFT's public surface for FourierFT and BOFT, name by name, with peft 0.21.2 as the oracle.

Each row of the tables below is one public name a PEFT user reads or calls. Its test builds the same tiny
model with the same seed in both libraries, runs the same user code (a *probe*, given the library module
``lib`` and the model), and compares what comes back: values and dtypes of tensors, types and values of
plain objects, exception classes (their nearest built-in class) and messages, warning categories. Names that
deliberately differ have no row here; ``docs/migrating.md`` ("Public surface audit") says why.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import inspect
import io
import json
import os
import pickle
import warnings
from typing import Any, Callable, NamedTuple

import pytest
import torch
from torch import nn

import fourierft

peft = pytest.importorskip("peft")

from conftest import MLP, make_inputs  # noqa: E402

LIBS = {"peft": peft, "fourierft": fourierft}
X = make_inputs("mlp")["X"]
# PEFT's BOFT warns twice per layer on a CPU-only torch (its CUDA extension does not build); that is the
# documented difference "butterfly factors are always honoured", not part of what users' filters catch.
_PEFT_NOISE = ("CUDA extension", "boft_n_butterfly_factor to 1")


# ---------------------------------------------------------------------------------------------- building
def fft_config(lib, **kw):
    kw = {"target_modules": ["lin0"], "n_frequency": 10, **kw}
    return lib.FourierFTConfig(**kw)


def boft_config(lib, **kw):
    kw = {"target_modules": ["lin0"], "boft_block_size": 2, "init_weights": False, **kw}
    return lib.BOFTConfig(**kw)


CONFIGS = {"fourierft": fft_config, "boft": boft_config}


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def build(lib, method: str = "fourierft", seed: int = 0, **kw):
    """``get_peft_model(MLP(), <method config>)`` with a fixed seed (same tensors in both libraries)."""
    torch.manual_seed(seed)
    base = MLP()
    return quiet(lib.get_peft_model, base, CONFIGS[method](lib, **kw))


def two_adapters(lib, method: str = "fourierft", **kw):
    model = build(lib, method, **kw)
    torch.manual_seed(1)
    quiet(model.add_adapter, "other", CONFIGS[method](lib, **kw))
    return model


def tiny_llama(lib, method: str = "fourierft"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    kw = {"n_frequency": 10} if method == "fourierft" else {"boft_block_size": 4}
    config = getattr(lib, "FourierFTConfig" if method == "fourierft" else "BOFTConfig")(
        task_type="CAUSAL_LM", init_weights=False, **kw)
    return quiet(lib.get_peft_model, base.eval(), config)


def tiny_bert(lib, method: str = "fourierft"):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64, num_labels=3,
                                                    max_position_embeddings=64))
    kw = {"n_frequency": 10} if method == "fourierft" else {"boft_block_size": 4}
    config = getattr(lib, "FourierFTConfig" if method == "fourierft" else "BOFTConfig")(
        task_type="SEQ_CLS", init_weights=False, **kw)
    return quiet(lib.get_peft_model, base.eval(), config)


# ---------------------------------------------------------------------------------------------- probing
class Raised(NamedTuple):
    """An exception, compared by its nearest built-in class (and message when ``message`` is set)."""

    kind: str
    message: str | None


def builtin_base(exc_type: type) -> str:
    for cls in exc_type.__mro__:
        if cls.__module__ == "builtins":
            return cls.__name__
    return "BaseException"  # pragma: no cover - every exception derives from a built-in one


def raises(fn: Callable, message: bool = False) -> Raised | None:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the class is what is compared
        return Raised(builtin_base(type(err)), str(err) if message else None)
    return None


def warned(fn: Callable) -> tuple[Any, list[str]]:
    """``fn()``'s result and the categories of the warnings it issued, through ``warnings.warn``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    cats = sorted({w.category.__name__ for w in caught if not any(s in str(w.message) for s in _PEFT_NOISE)})
    return result, cats


def output(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def printed(fn: Callable) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn()
    return buf.getvalue()


def grads(model) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def layer(model, name: str = "lin0"):
    return model.base_model.model.get_submodule(name)


def type_name(obj) -> str:
    return type(obj).__name__


def torch_type(obj) -> str:
    """The class of a torch module, or ``"adapter layer"`` for either library's wrapper of it."""
    return type(obj).__name__ if type(obj).__module__.startswith("torch.") else "adapter layer"


def saved(model, tmp: str, **kw) -> dict:
    """What ``save_pretrained`` wrote: files, config keys, tensor names, shapes and dtypes."""
    from safetensors.torch import load_file

    quiet(model.save_pretrained, tmp, **kw)
    files = sorted(os.path.relpath(os.path.join(r, f), tmp) for r, _, fs in os.walk(tmp) for f in fs)
    config = json.load(open(os.path.join(tmp, "adapter_config.json")))
    tensors = load_file(os.path.join(tmp, "adapter_model.safetensors"))
    return {"files": files, "config keys": sorted(config),
            "tensors": {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}}


def same(a, b, path: str = "") -> None:
    """Assert ``a`` (peft) and ``b`` (fourierft) agree; tensors to float tolerance, enums by class name."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: expected a tensor, got {type(b).__name__}"
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.allclose(a.double(), b.double(), atol=1e-5, rtol=1e-4), f"{path}: values differ"
    elif isinstance(a, enum.Enum):
        assert isinstance(b, enum.Enum), f"{path}: expected an enum member, got {b!r}"
        assert (type(a).__name__, a.value) == (type(b).__name__, b.value), f"{path}: {a!r} vs {b!r}"
    elif isinstance(a, nn.Module):
        assert torch_type(a) == torch_type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    elif isinstance(a, dict):
        assert isinstance(b, dict), f"{path}: expected a dict, got {type(b).__name__}"
        assert sorted(a, key=str) == sorted(b, key=str), f"{path}: keys {sorted(a, key=str)} vs {sorted(b, key=str)}"
        for k in a:
            same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)) and not isinstance(a, Raised):
        assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} ({type(a).__name__}) vs {b!r} ({type(b).__name__})"


class Case(NamedTuple):
    name: str  # the public name checked (what a PEFT user writes)
    probe: Callable  # probe(lib, tmp_dir) -> value compared between the libraries


def case_id(case: Case) -> str:
    return case.name


# ---------------------------------------------------------------------------------------------- tables
TOP_LEVEL = [
    "FourierFTConfig", "BOFTConfig", "PeftConfig", "PeftModel", "PeftModelForSequenceClassification",
    "PeftModelForCausalLM", "PeftModelForSeq2SeqLM", "PeftModelForTokenClassification",
    "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction", "AutoPeftModel",
    "AutoPeftModelForCausalLM", "AutoPeftModelForSequenceClassification", "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForTokenClassification", "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForFeatureExtraction", "FourierFTModel", "BOFTModel", "get_peft_model", "inject_adapter_in_model",
    "get_peft_model_state_dict", "set_peft_model_state_dict", "get_peft_config", "PeftType", "TaskType",
    "get_base_model_state_dict", "set_base_model_state_dict", "NoMatchingPeftModuleError", "PeftError",
]

# names users import from ``peft.utils``; here from ``fourierft.utils``
UTILS = ["get_peft_model_state_dict", "set_peft_model_state_dict", "PeftType", "TaskType", "ModulesToSaveWrapper",
         "CONFIG_NAME", "WEIGHTS_NAME", "SAFETENSORS_WEIGHTS_NAME", "NoMatchingPeftModuleError",
         "TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING", "TRANSFORMERS_MODELS_TO_BOFT_TARGET_MODULES_MAPPING",
         "get_base_model_state_dict", "set_base_model_state_dict"]


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_top_level_name(name):
    ref, mine = getattr(peft, name), getattr(fourierft, name)
    assert inspect.isclass(ref) == inspect.isclass(mine)
    assert callable(ref) == callable(mine)


@pytest.mark.parametrize("name", UTILS)
def test_utils_name(name):
    import fourierft.utils
    import peft.utils

    ref, mine = getattr(peft.utils, name), getattr(fourierft.utils, name)
    assert inspect.isclass(ref) == inspect.isclass(mine)
    if isinstance(ref, (str, dict)):
        assert ref == mine


# (label, getter(lib) -> callable): every named parameter of peft's signature exists here with its default
def _mlp_attr(path: str, method: str = "fourierft"):
    def get(lib):
        obj = build(lib, method)
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj
    return get


SIGNATURES = [
    ("get_peft_model", lambda lib: lib.get_peft_model),
    ("inject_adapter_in_model", lambda lib: lib.inject_adapter_in_model),
    ("get_peft_model_state_dict", lambda lib: lib.get_peft_model_state_dict),
    ("set_peft_model_state_dict", lambda lib: lib.set_peft_model_state_dict),
    ("get_peft_config", lambda lib: lib.get_peft_config),
    ("PeftModel.__init__", lambda lib: lib.PeftModel.__init__),
    ("PeftModel.from_pretrained", lambda lib: lib.PeftModel.from_pretrained),
    ("PeftModel.load_adapter", lambda lib: lib.PeftModel.load_adapter),
    ("PeftModel.add_adapter", lambda lib: lib.PeftModel.add_adapter),
    ("PeftModel.set_adapter", lambda lib: lib.PeftModel.set_adapter),
    ("PeftModel.delete_adapter", lambda lib: lib.PeftModel.delete_adapter),
    ("PeftModel.disable_adapter", lambda lib: lib.PeftModel.disable_adapter),
    ("PeftModel.get_nb_trainable_parameters", lambda lib: lib.PeftModel.get_nb_trainable_parameters),
    ("PeftModel.print_trainable_parameters", lambda lib: lib.PeftModel.print_trainable_parameters),
    ("PeftModel.create_or_update_model_card", lambda lib: lib.PeftModel.create_or_update_model_card),
    ("PeftModel.set_requires_grad", _mlp_attr("set_requires_grad")),
    ("PeftModel.merge_and_unload", _mlp_attr("merge_and_unload")),
    ("PeftModel.merge_adapter", _mlp_attr("merge_adapter")),
    ("PeftModel.unmerge_adapter", _mlp_attr("unmerge_adapter")),
    ("PeftModel.unload", _mlp_attr("unload")),
    ("PeftModel.enable_adapter_layers", _mlp_attr("enable_adapter_layers")),
    ("PeftModel.disable_adapter_layers", _mlp_attr("disable_adapter_layers")),
    ("PeftModelForCausalLM.generate", lambda lib: lib.PeftModelForCausalLM.generate),
    ("FourierFTModel.set_adapter", lambda lib: lib.FourierFTModel.set_adapter),
    ("FourierFTModel.delete_adapter", lambda lib: lib.FourierFTModel.delete_adapter),
    ("FourierFTModel.merge_and_unload", lambda lib: lib.FourierFTModel.merge_and_unload),
    ("BOFTModel.merge_and_unload", lambda lib: lib.BOFTModel.merge_and_unload),
    ("BOFTModel.set_adapter", lambda lib: lib.BOFTModel.set_adapter),
    ("FourierFTLinear.merge", _mlp_attr("base_model.model.lin0.merge")),
    ("FourierFTLinear.unmerge", _mlp_attr("base_model.model.lin0.unmerge")),
    ("FourierFTLinear.get_delta_weight", _mlp_attr("base_model.model.lin0.get_delta_weight")),
    ("FourierFTLinear.set_adapter", _mlp_attr("base_model.model.lin0.set_adapter")),
    ("FourierFTLinear.delete_adapter", _mlp_attr("base_model.model.lin0.delete_adapter")),
    ("FourierFTLinear.enable_adapters", _mlp_attr("base_model.model.lin0.enable_adapters")),
    ("BOFTLinear.merge", _mlp_attr("base_model.model.lin0.merge", "boft")),
    ("BOFTLinear.unmerge", _mlp_attr("base_model.model.lin0.unmerge", "boft")),
    ("BOFTLinear.get_delta_weight", _mlp_attr("base_model.model.lin0.get_delta_weight", "boft")),
    ("BOFTLinear.set_adapter", _mlp_attr("base_model.model.lin0.set_adapter", "boft")),
    ("FourierFTLinear.set_requires_grad", _mlp_attr("base_model.model.lin0.set_requires_grad")),
    ("BOFTLinear.set_requires_grad", _mlp_attr("base_model.model.lin0.set_requires_grad", "boft")),
    ("FourierFTConfig", lambda lib: lib.FourierFTConfig),
    ("BOFTConfig", lambda lib: lib.BOFTConfig),
    ("PeftConfig.from_pretrained", lambda lib: lib.PeftConfig.from_pretrained),
    ("PeftConfig.save_pretrained", lambda lib: lib.PeftConfig.save_pretrained),
    ("PeftConfig.from_json_file", lambda lib: lib.PeftConfig.from_json_file),
    ("PeftConfig.from_peft_type", lambda lib: lib.PeftConfig.from_peft_type),
    ("PeftConfig.to_dict", lambda lib: lib.PeftConfig.to_dict),
]


@pytest.mark.parametrize("label,getter", SIGNATURES, ids=[s[0] for s in SIGNATURES])
def test_signature(label, getter):
    ref, mine = inspect.signature(getter(peft)), inspect.signature(getter(fourierft))
    named = [p for p in ref.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for p in named:
        assert p.name in mine.parameters, f"{label}: no parameter {p.name!r}"
        assert mine.parameters[p.name].default == p.default, f"{label}: default of {p.name!r}"
    if label.endswith("Config"):
        return  # config fields are passed by keyword; their positional order is not part of the surface
    positional = [p.name for p in named if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    mine_positional = [n for n, p in mine.parameters.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert mine_positional[:len(positional)] == positional, f"{label}: positional order"


# ---------------------------------------------------------------------------------------------- behaviour
def _merge_twice(lib, tmp, method):
    m = build(lib, method)
    quiet(m.merge_adapter)
    return warned(m.merge_adapter)[1], output(m)


def _disable_nested(lib, tmp, method):
    m = build(lib, method)
    m.disable_adapter_layers()
    with m.disable_adapter():
        pass
    return layer(m).disable_adapters, output(m)


def _disable_inside(lib, tmp, method):
    m = build(lib, method)
    with m.disable_adapter():
        inside = output(m)
        flags = (layer(m).disable_adapters, grads(m))
    return inside, flags, output(m), layer(m).disable_adapters, grads(m)


def _load_adapter(lib, tmp, method, **kw):
    m = build(lib, method)
    quiet(m.save_pretrained, tmp)
    result = quiet(m.load_adapter, tmp, "other", **kw)
    return sorted(m.peft_config), m.active_adapter, sorted(result.missing_keys), sorted(result.unexpected_keys), grads(m)


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


def _print_params(lib, tmp, method):
    return printed(build(lib, method).print_trainable_parameters)


def _modules_to_save(lib, tmp, method):
    m = build(lib, method, modules_to_save=["lin1"])
    w = layer(m, "lin1")
    return (m.modules_to_save, torch_type(w.original_module), sorted(w.modules_to_save), w.active_adapter,
            w.weight, grads(m), output(m))


def _mts_active_adapters(lib, tmp, method):
    m = build(lib, method, modules_to_save=["lin1"])
    return layer(m, "lin1").active_adapters


def _merge_unload(lib, tmp, method, **kw):
    m = build(lib, method)
    ref = output(m)
    merged = quiet(m.merge_and_unload, **kw)
    return type_name(merged), torch_type(merged.lin0), output(merged) - ref, hasattr(merged, "peft_config")


def _merged_contiguous(lib, tmp, method):
    import safetensors.torch

    m = build(lib, "boft", target_modules=["lin1"], boft_block_size=0, boft_block_num=1) if method == "boft" \
        else build(lib, method)
    merged = quiet(m.merge_and_unload)
    path = os.path.join(tmp, "merged.safetensors")
    safetensors.torch.save_file(merged.state_dict(), path)
    return safetensors.torch.load_file(path)


def _layer_merge(lib, tmp, method):
    m = build(lib, method)
    lin0 = layer(m)
    before = (lin0.merged, list(lin0.merged_adapters))
    lin0.merge()
    during = (lin0.merged, list(lin0.merged_adapters), lin0.get_base_layer().weight.clone(), output(m))
    lin0.unmerge()
    return before, during, (lin0.merged, list(lin0.merged_adapters), lin0.get_base_layer().weight)


def _layer_state(lib, tmp, method):
    lin0 = layer(build(lib, method))
    return (lin0.active_adapter, lin0.active_adapters, lin0.merged, lin0.merged_adapters, lin0.disable_adapters,
            torch_type(lin0.base_layer), torch_type(lin0.get_base_layer()), lin0.weight, lin0.bias,
            list(lin0.adapter_layer_names))


def _multi_active(lib, tmp, method):
    m = two_adapters(lib, method, target_modules=["lin0", "lin1"])
    m.base_model.set_adapter(["default", "other"])
    return m.active_adapters, m.base_model.active_adapters, layer(m).active_adapters, output(m), grads(m)


def _delete(lib, tmp, method):
    m = two_adapters(lib, method)
    m.set_adapter("other")
    m.delete_adapter("other")
    return sorted(m.peft_config), m.active_adapter, layer(m).active_adapters, output(m)


def _delete_last(lib, tmp, method):
    m = build(lib, method)
    m.delete_adapter("default")
    return m.active_adapters, output(m.base_model)


def _set_adapter(lib, tmp, method):
    m = two_adapters(lib, method)
    before = (m.active_adapter, grads(m))
    m.set_adapter("other")
    return before, m.active_adapter, m.active_adapters, layer(m).active_adapter, grads(m), output(m)


def _set_adapter_inference(lib, tmp, method):
    m = two_adapters(lib, method)
    m.set_adapter("other", inference_mode=True)
    return grads(m)


def _set_adapter_merged(lib, tmp, method):
    m = two_adapters(lib, method)
    quiet(m.merge_adapter)
    cats = warned(lambda: m.set_adapter("other"))[1]
    return cats, layer(m).merged, output(m)


def _requires_grad(lib, tmp, method):
    m = build(lib, method)
    m.set_requires_grad("default", requires_grad=False)
    return grads(m)


def _disable_layers(lib, tmp, method):
    m = build(lib, method)
    m.disable_adapter_layers()
    disabled = (output(m), layer(m).disable_adapters)
    m.enable_adapter_layers()
    return disabled, output(m), layer(m).disable_adapters


def _disable_bias_warns(lib, tmp, method):
    m = build(lib, method, bias="all")
    return warned(m.disable_adapter_layers)[1]


def _fan_in_fan_out_warns(lib, tmp, method):
    torch.manual_seed(0)
    config = CONFIGS[method](lib, fan_in_fan_out=True)
    model, cats = warned(lambda: lib.get_peft_model(MLP(), config))
    return cats, config.fan_in_fan_out


def _prefix_name_warns(lib, tmp, method):
    m = build(lib, method)
    name = "fourier" if method == "fourierft" else "boft"
    return warned(lambda: m.add_adapter(name, CONFIGS[method](lib)))[1]


def _has_active_enabled(lib, tmp, method):
    m = build(lib, method)
    before = m.has_active_enabled_adapter
    with m.disable_adapter():
        inside = m.has_active_enabled_adapter
    return before, inside, m.has_active_enabled_adapter


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


def _training_steps(lib, tmp, method):
    m = build(lib, method, modules_to_save=["lin1"])
    m.train()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        m(X).sum().backward()
        opt.step()
    return lib.get_peft_model_state_dict(m)


def _get_base_model(lib, tmp, method):
    m = build(lib, method)
    return m.get_base_model() is m.base_model.model, type_name(m.get_base_model()), type_name(m.base_model)


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


def _tuner(lib, tmp, method):
    m = build(lib, method, target_modules=["lin0", "lin1"])
    t = m.base_model
    return (t.peft_config is m.peft_config, t.active_adapter, t.active_adapters, t.prefix,
            t.targeted_module_names, t.targeted_parameter_names, type_name(t.model))


def _fft_layer(lib, tmp, method):
    lin0 = layer(build(lib, "fourierft"))
    return (dict(lin0.fourierft_spectrum), lin0.fourierft_n_frequency, lin0.fourierft_scaling,
            lin0.fourierft_random_loc_seed, dict(lin0.indices), lin0.get_delta_weight("default"),
            lin0.in_features, lin0.out_features, lin0.fan_in_fan_out)


def _boft_layer(lib, tmp, method):
    lin0 = layer(build(lib, "boft"))
    rotation, scale = lin0.get_delta_weight("default")
    return (dict(lin0.boft_R), dict(lin0.boft_s), lin0.boft_block_size, lin0.boft_block_num,
            sorted(lin0.boft_dropout), rotation, scale, lin0.fan_in_fan_out)


def _boft_features(lib, tmp, method):
    lin0 = layer(build(lib, "boft"))
    return lin0.in_features, lin0.out_features


def _boft_conv(lib, tmp, method):
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv2d = nn.Conv2d(5, 10, 3)

        def forward(self, X):
            return self.conv2d(X.reshape(-1, 5, 3, 3))

    torch.manual_seed(0)
    m = quiet(lib.get_peft_model, Conv(), lib.BOFTConfig(target_modules=["conv2d"], boft_block_size=45,
                                                           init_weights=False))
    conv = m.base_model.model.conv2d
    with torch.no_grad():
        out = m(torch.randn(2, 45, generator=torch.Generator().manual_seed(0)))
    return dict(conv.boft_R), dict(conv.boft_s), out


def _layer_enable(lib, tmp, method):
    lin0 = layer(build(lib, method))
    lin0.enable_adapters(False)
    return lin0.disable_adapters


def _layer_delete(lib, tmp, method):
    m = two_adapters(lib, method)
    lin0 = layer(m)
    lin0.delete_adapter("other")
    return [sorted(getattr(lin0, a)) for a in lin0.adapter_layer_names]


def _dtype(lib, tmp, method):
    return build(lib, method).base_model_torch_dtype


def _peft_type(lib, tmp, method):
    c = CONFIGS[method](lib)
    return c.peft_type, c.peft_type.value, isinstance(c.peft_type, str)


def _config_values(lib, tmp, method):
    c = CONFIGS[method](lib, task_type=lib.TaskType.SEQ_CLS)
    return c.task_type == "SEQ_CLS", c.is_prompt_learning, c.is_adaption_prompt, c.inference_mode, \
        c.base_model_name_or_path, c.revision, c.auto_mapping


def _config_fields(lib, tmp, method):
    cls = getattr(lib, "FourierFTConfig" if method == "fourierft" else "BOFTConfig")
    # fourierft's extra fields (e.g. frequency_band) are extensions; PEFT's fields must all be there
    ref = {f.name for f in dataclasses.fields(getattr(peft, cls.__name__))}
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(cls) if f.name in ref and f.name != "peft_version"}


def _config_roundtrip(lib, tmp, method):
    c = CONFIGS[method](lib, target_modules=["lin0", "lin1"])
    c.save_pretrained(tmp)
    raw = lib.PeftConfig.from_json_file(os.path.join(tmp, "adapter_config.json"))
    loaded = lib.PeftConfig.from_pretrained(tmp)
    return type(raw).__name__, sorted(raw), type_name(loaded), loaded.target_modules, loaded.peft_type


def _config_to_dict(lib, tmp, method):
    d = CONFIGS[method](lib, target_modules={"lin0"}).to_dict()
    d.pop("peft_version")
    d["target_modules"] = sorted(d["target_modules"])  # PEFT keeps a set, fourierft a sorted list (documented)
    d["peft_type"] = getattr(d["peft_type"], "value", d["peft_type"])  # PEFT keeps the enum (documented)
    return d


def _config_copy(lib, tmp, method):
    c = CONFIGS[method](lib)
    return [x.to_dict() == c.to_dict() for x in (copy.copy(c), copy.deepcopy(c), pickle.loads(pickle.dumps(c)))]


def _from_peft_type(lib, tmp, method):
    c = lib.PeftConfig.from_peft_type(peft_type=method.upper())
    d = lib.get_peft_config({"peft_type": method.upper()})
    return type_name(c), type_name(d)


def _unknown_keys_warn(lib, tmp, method):
    c = CONFIGS[method](lib)
    c.save_pretrained(tmp)
    path = os.path.join(tmp, "adapter_config.json")
    data = json.load(open(path))
    data.update(foobar=1, spam=2)
    json.dump(data, open(path, "w"))
    loaded, cats = warned(lambda: lib.PeftConfig.from_pretrained(tmp))
    return cats, type_name(loaded)


def _missing_peft_type(lib, tmp, method):
    with open(os.path.join(tmp, "adapter_config.json"), "w") as fh:
        json.dump({"foo": 1}, fh)
    return raises(lambda: lib.PeftConfig.from_pretrained(tmp), message=True)


def _bad_task_type(lib, tmp, method):
    return raises(lambda: CONFIGS[method](lib, task_type="nope"), message=True)


def _no_target(lib, tmp, method):
    try:
        build(lib, method, target_modules=["nope"])
    except lib.NoMatchingPeftModuleError as err:
        return type_name(err), isinstance(err, ValueError), isinstance(err, lib.PeftError)
    return None


def _peft_model_type(lib, tmp, method):
    m = build(lib, method)
    return m.peft_type, m.peft_type == method.upper()


def _layer_requires_grad(lib, tmp, method):
    m = two_adapters(lib, method)
    layer(m).set_requires_grad(["default", "other"], requires_grad=True)
    on = grads(m)
    layer(m).set_requires_grad("default", False)
    return on, grads(m)


def _mts_disabled(lib, tmp, method):
    m = build(lib, method, modules_to_save=["lin1"])
    with m.disable_adapter():
        inside = layer(m, "lin1").disable_adapters
    return inside, layer(m, "lin1").disable_adapters


def _runtime_config_warns(lib, tmp, method):
    CONFIGS[method](lib).save_pretrained(tmp)
    path = os.path.join(tmp, "adapter_config.json")
    data = json.load(open(path))
    data["runtime_config"] = {"ephemeral_gpu_offload": False}
    json.dump(data, open(path, "w"))
    raw, cats = warned(lambda: lib.PeftConfig.from_json_file(path))
    return cats, "runtime_config" in raw


def _bad_set_adapter(lib, tmp, method):
    m = build(lib, method)
    return raises(lambda: m.set_adapter("nope"), message=True)


def _bad_delete(lib, tmp, method):
    m = build(lib, method)
    return raises(lambda: m.delete_adapter("unknown-adapter"), message=True)


def _duplicate_add(lib, tmp, method):
    m = build(lib, method)
    return raises(lambda: quiet(m.add_adapter, "default", CONFIGS[method](lib)))


def _second_bias(lib, tmp, method):
    m = build(lib, method, bias="all")
    return raises(lambda: quiet(m.add_adapter, "other", CONFIGS[method](lib, bias="all"))), sorted(m.peft_config)


def _too_many_frequencies(lib, tmp, method):
    return raises(lambda: build(lib, "fourierft", n_frequency=201))


def _bad_block(lib, tmp, method):
    return raises(lambda: build(lib, "boft", boft_block_size=3))


def _from_pretrained_config(lib, tmp, method):
    m = build(lib, method)
    quiet(m.save_pretrained, tmp)
    cfg = CONFIGS[method](lib)
    loaded = quiet(lib.PeftModel.from_pretrained, MLP(), tmp, config=cfg, is_trainable=False)
    return loaded.peft_config["default"] is cfg, cfg.inference_mode


def _nb_params(lib, tmp, method):
    return build(lib, method, modules_to_save=["lin1"]).get_nb_trainable_parameters()


def _state_dict_keys(lib, tmp, method):
    return sorted(build(lib, method, modules_to_save=["lin1"]).state_dict())


def _unmerge_unmerged(lib, tmp, method):
    m = build(lib, method, target_modules=["lin0", "lin1"])
    model_level = warned(m.unmerge_adapter)[1]
    return model_level, warned(layer(m).unmerge)[1], output(m)


def _unload(lib, tmp, method):
    m = build(lib, method)
    torch.manual_seed(0)
    base = output(MLP())
    unloaded = m.unload()
    return type_name(unloaded), torch_type(unloaded.lin0), output(unloaded) - base


def _peft_config_dict(lib, tmp, method):
    m = two_adapters(lib, method)
    return {k: type_name(v) for k, v in m.peft_config.items()}, type_name(m.active_peft_config)


def _train_eval(lib, tmp, method):
    m = build(lib, method)
    m.train()
    on = (m.training, layer(m).training)
    m.eval()
    return on, (m.training, layer(m).training)


def _forward(lib, tmp, method):
    return output(build(lib, method))


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


def _named_adapter(lib, tmp, method):
    torch.manual_seed(0)
    m = quiet(lib.get_peft_model, MLP(), CONFIGS[method](lib), adapter_name="test-adapter")
    return sorted(n for n, _ in m.named_parameters() if "test-adapter" in n), m.active_adapter


def _not_main_process(lib, tmp, method):
    quiet(build(lib, method).save_pretrained, tmp, is_main_process=False)
    return sorted(os.listdir(tmp))


def _delete_merged(lib, tmp, method):
    m = two_adapters(lib, method)
    quiet(m.merge_adapter)
    err = raises(lambda: m.delete_adapter("default"))
    return err, sorted(m.peft_config), layer(m).merged_adapters


def _merge_additionally(lib, tmp, method):
    m = two_adapters(lib, method)
    quiet(m.merge_adapter, ["default"])
    cats = warned(lambda: m.merge_adapter(["other"]))[1]
    return cats, layer(m).merged_adapters, output(m)


def _bias_only(lib, tmp, method):
    bias = "fourier_only" if method == "fourierft" else "boft_only"
    m = build(lib, method, bias=bias)
    return grads(m), sorted(lib.get_peft_model_state_dict(m))


def _bias_all(lib, tmp, method):
    m = build(lib, method, bias="all")
    return grads(m), sorted(lib.get_peft_model_state_dict(m))


def _llama_targets(lib, tmp, method, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    extra = {"n_frequency": 10} if method == "fourierft" else {"boft_block_size": 4}
    config = getattr(lib, "FourierFTConfig" if method == "fourierft" else "BOFTConfig")(**extra, **kw)
    m = quiet(lib.get_peft_model, base, config)
    targets = config.target_modules
    if kw.get("target_modules") == "all-linear":  # resolved to other (equivalent) names; see docs/migrating.md
        return type(targets).__name__, m.base_model.targeted_module_names
    return (sorted(targets) if isinstance(targets, (set, list)) else targets, type(targets).__name__,
            m.base_model.targeted_module_names)


def _half_autocast(lib, tmp, method):
    torch.manual_seed(0)
    m = quiet(lib.get_peft_model, MLP().to(torch.bfloat16), CONFIGS[method](lib))
    adapter = {n: p.dtype for n, p in m.named_parameters() if p.requires_grad}
    with torch.no_grad():
        return adapter, layer(m)(X.to(torch.bfloat16)).dtype


def _n_frequency_pattern(lib, tmp, method):
    m = build(lib, "fourierft", target_modules=["lin0", "lin1"], n_frequency_pattern={"lin1": 5})
    return layer(m).fourierft_n_frequency, layer(m, "lin1").fourierft_n_frequency, output(m)


def _exclude(lib, tmp, method):
    m = build(lib, method, target_modules=r".*lin\d", exclude_modules=["lin1"])
    return m.base_model.targeted_module_names, output(m)


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
    return type_name(m), m.generate(input_ids=ids, max_new_tokens=3, do_sample=False), sorted(config.target_modules)


def _config_subfolder(lib, tmp, method):
    CONFIGS[method](lib).save_pretrained(os.path.join(tmp, "sub"))
    loaded = lib.PeftConfig.from_pretrained(tmp, subfolder="sub")
    return type_name(loaded), loaded.target_modules


M = ("fourierft", "boft")
BEHAVIOUR = [
    *[Case(f"{k} [{meth}]", (lambda f, meth: lambda lib, tmp: f(lib, tmp, meth))(f, meth)) for meth in M for k, f in [
        ("forward", _forward),
        ("PeftModel.active_adapter/peft_config/active_peft_config", _peft_config_dict),
        ("PeftModel.get_base_model/base_model", _get_base_model),
        ("PeftModel.base_model_torch_dtype", _dtype),
        ("PeftModel.has_active_enabled_adapter", _has_active_enabled),
        ("PeftModel.get_nb_trainable_parameters", _nb_params),
        ("PeftModel.print_trainable_parameters", _print_params),
        ("PeftModel.modules_to_save/ModulesToSaveWrapper", _modules_to_save),
        ("ModulesToSaveWrapper.active_adapters", _mts_active_adapters),
        ("PeftModel.state_dict keys", _state_dict_keys),
        ("PeftModel.add_adapter/set_adapter", _set_adapter),
        ("PeftModel.set_adapter(inference_mode=True)", _set_adapter_inference),
        ("set_adapter while merged warns", _set_adapter_merged),
        ("BaseTuner.set_adapter([a, b])", _multi_active),
        ("PeftModel.delete_adapter", _delete),
        ("PeftModel.delete_adapter(last)", _delete_last),
        ("PeftModel.set_requires_grad", _requires_grad),
        ("PeftModel.disable_adapter()", _disable_inside),
        ("PeftModel.disable_adapter() restores the prior state", _disable_nested),
        ("disable/enable_adapter_layers", _disable_layers),
        ("disable_adapter_layers with bias warns", _disable_bias_warns),
        ("fan_in_fan_out on Linear warns", _fan_in_fan_out_warns),
        ("adapter name inside the prefix warns", _prefix_name_warns),
        ("merge_adapter twice warns", _merge_twice),
        ("merge_and_unload", _merge_unload),
        ("merge_and_unload(safe_merge=True)", lambda lib, tmp, meth: _merge_unload(lib, tmp, meth, safe_merge=True)),
        ("merge_and_unload(adapter_names=)",
         lambda lib, tmp, meth: _merge_unload(lib, tmp, meth, adapter_names=["default"])),
        ("merged state dict saves with safetensors", _merged_contiguous),
        ("unload", _unload),
        ("unmerge_adapter/unmerge with nothing merged warns", _unmerge_unmerged),
        ("train/eval", _train_eval),
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
        ("autocast_adapter_dtype=False fp16 load (low_cpu_mem_usage)", lambda lib, tmp, meth: _half(lib, tmp, meth, True)),
        ("frozen load_adapter/add_adapter keep trainable adapters", _frozen_add),
        ("get/set_peft_model_state_dict", _state_dict_roundtrip),
        ("get/set_base_model_state_dict", _base_state_dict),
        ("inject_adapter_in_model", _inject),
        ("training: 3 SGD steps", _training_steps),
        ("PeftModelForCausalLM.generate", _generate),
        ("PeftModelForCausalLM.forward(labels=)", _causal_loss),
        ("PeftModelForSequenceClassification", _seq_cls),
        ("PeftModelForSequenceClassification reload", _seq_cls_reload),
        ("BaseTuner attributes", _tuner),
        ("tuner layer state", _layer_state),
        ("tuner layer merge/unmerge", _layer_merge),
        ("tuner layer enable_adapters", _layer_enable),
        ("tuner layer delete_adapter", _layer_delete),
        ("config.peft_type", _peft_type),
        ("config attributes", _config_values),
        ("config fields and defaults", _config_fields),
        ("config.save_pretrained/from_json_file/from_pretrained", _config_roundtrip),
        ("config.to_dict", _config_to_dict),
        ("config copy/deepcopy/pickle", _config_copy),
        ("PeftConfig.from_peft_type/get_peft_config", _from_peft_type),
        ("unknown config keys warn", _unknown_keys_warn),
        ("config without peft_type raises", _missing_peft_type),
        ("invalid task_type raises", _bad_task_type),
        ("no matching target raises NoMatchingPeftModuleError", _no_target),
        ("PeftModel.peft_type", _peft_model_type),
        ("tuner layer set_requires_grad", _layer_requires_grad),
        ("ModulesToSaveWrapper.disable_adapters", _mts_disabled),
        ("from_json_file drops runtime_config with a warning", _runtime_config_warns),
        ("set_adapter(unknown) raises", _bad_set_adapter),
        ("delete_adapter(unknown) raises", _bad_delete),
        ("add_adapter(existing name) raises", _duplicate_add),
        ("second adapter with bias raises", _second_bias),
        ("PeftModelForTokenClassification/QuestionAnswering/FeatureExtraction", _task_classes),
        ("AutoPeftModelForSequenceClassification.from_pretrained", _auto_peft),
        ("get_peft_model(adapter_name=)", _named_adapter),
        ("save_pretrained(is_main_process=False)", _not_main_process),
        ("delete_adapter(merged) raises", _delete_merged),
        ("merge_adapter of a further adapter warns", _merge_additionally),
        ("bias='<method>_only'", _bias_only),
        ("bias='all'", _bias_all),
        ("target_modules=None (default mapping)", _llama_targets),
        ("target_modules='all-linear'", lambda lib, tmp, meth: _llama_targets(lib, tmp, meth, target_modules="all-linear")),
        ("layers_to_transform/layers_pattern", lambda lib, tmp, meth: _llama_targets(
            lib, tmp, meth, target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers")),
        ("bf16 base, autocast_adapter_dtype=True", _half_autocast),
        ("exclude_modules", _exclude),
        ("get/set_peft_model_state_dict(adapter_name=)", _state_dict_other),
        ("inject_adapter_in_model(state_dict=)", _inject_state_dict),
        ("PeftModelForSeq2SeqLM.generate", _seq2seq),
        ("PeftConfig.from_pretrained(subfolder=)", _config_subfolder),
    ]],
    Case("FourierFTLinear attributes", lambda lib, tmp: _fft_layer(lib, tmp, "fourierft")),
    Case("FourierFTConfig n_frequency_pattern", lambda lib, tmp: _n_frequency_pattern(lib, tmp, "fourierft")),
    Case("FourierFTConfig n_frequency > out*in raises", lambda lib, tmp: _too_many_frequencies(lib, tmp, "fourierft")),
    Case("BOFTLinear attributes", lambda lib, tmp: _boft_layer(lib, tmp, "boft")),
    Case("BOFTLinear in_features/out_features", lambda lib, tmp: _boft_features(lib, tmp, "boft")),
    Case("BOFTConv2d attributes", lambda lib, tmp: _boft_conv(lib, tmp, "boft")),
    Case("BOFTConfig block size not dividing raises", lambda lib, tmp: _bad_block(lib, tmp, "boft")),
]


@pytest.mark.parametrize("case", BEHAVIOUR, ids=case_id)
def test_behaves_as_peft(case, tmp_path):
    results = {}
    for name, lib in LIBS.items():
        tmp = tmp_path / name
        tmp.mkdir()
        results[name] = case.probe(lib, str(tmp))
    same(results["peft"], results["fourierft"], case.name)
