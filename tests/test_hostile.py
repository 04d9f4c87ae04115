"""Hostile input: every public entry point given wrong types, impossible values and impossible requests.

Each row names the call, the exception and a fragment of its message; every check also asserts that the
model is exactly as before: state dict (bitwise, NaN-aware), module structure, ``peft_config``,
``requires_grad`` flags, active and merged adapters. The tables run for both methods where a call exists
for both. ``docs/guarantees.md`` lists the promises these tests hold.
"""

from __future__ import annotations

import copy
import logging
import os
import re

import peft
import pytest
import torch
from torch import nn

from fourierft import (
    AdapterLayer,
    BOFTConfig,
    BOFTModel,
    CheckpointError,
    FourierFTConfig,
    FourierFTModel,
    PeftModel,
    get_peft_config,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from conftest import MLP, METHODS as METHOD_TABLE, build

# ---------------------------------------------------------------------------------------------- helpers
CONFIGS = {name: case.config for name, case in METHOD_TABLE.items()}
METHODS = list(CONFIGS)


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave untouched."""
    configs = getattr(model, "peft_config", None)
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "structure": [(n, type(m).__name__) for n, m in model.named_modules()],
        "config": {k: copy.deepcopy(c.to_dict()) for k, c in configs.items()} if isinstance(configs, dict) else None,
        "grads": {n: p.requires_grad for n, p in model.named_parameters()},
        "active": [(n, m.active_adapters, list(m.merged_adapters), m.disable_adapters)
                   for n, m in model.named_modules() if isinstance(m, AdapterLayer)],
        "training": [m.training for m in model.modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["structure"] == before["structure"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        torch.testing.assert_close(after["state"][key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    for name in ("config", "grads", "active", "training"):
        assert after[name] == before[name], name


def adapted(method: str, **kw) -> PeftModel:
    """MLP with ``default`` on lin0 and ``other`` on lin0 and lin1 (inactive), in eval mode."""
    torch.manual_seed(0)
    model = get_peft_model(MLP(), CONFIGS[method](target_modules=["lin0"], **kw))
    model.add_adapter("other", CONFIGS[method](target_modules=["lin0", "lin1"]))
    return model.eval()


def adapter_tensor(model: PeftModel, method: str, layer: str = "lin0", name: str = "default") -> torch.Tensor:
    module = getattr(model.base_model.model, layer)
    return (module.fourierft_spectrum if method == "fourierft" else module.boft_R)[name]


class ConvNet(nn.Module):
    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, groups=groups)

    def forward(self, x):
        return self.conv(x)


BAD_NAMES = ["", "a/b", "a\\b", "..", "../evil", "a.b", " x", "x y", "tab\t", 5, None, ("a",)]


# ---------------------------------------------------------------------------------------------- configs
CONFIG_CASES = [
    # FourierFT values not covered by test_config.py
    ("fourierft", dict(scaling=float("nan")), "scaling must be a number and finite"),
    ("fourierft", dict(scaling=float("inf")), "scaling must be a number and finite"),
    ("fourierft", dict(scaling=-float("inf")), "scaling must be a number and finite"),
    ("fourierft", dict(scaling=None), "scaling must be a number"),
    ("fourierft", dict(random_loc_seed=2**64), r"random_loc_seed must be in \[-2\*\*63, 2\*\*64\)"),
    ("fourierft", dict(random_loc_seed=-(2**63) - 1), "random_loc_seed must be in"),
    ("fourierft", dict(random_loc_seed=1.5), "random_loc_seed must be an int"),
    ("fourierft", dict(n_frequency=None), "n_frequency must be a positive int"),
    ("fourierft", dict(n_frequency="100"), "n_frequency must be a positive int"),
    ("fourierft", dict(n_frequency_pattern={1: 3}), "n_frequency_pattern keys must be"),
    ("fourierft", dict(n_frequency_pattern={"q": -1}), r"n_frequency_pattern\['q'\] must be a positive int"),
    ("fourierft", dict(frequency_band=[0.1, float("nan")]), "frequency_band"),
    ("fourierft", dict(frequency_band=[float("nan"), 0.1]), "frequency_band"),
    ("fourierft", dict(frequency_band=[0.1, 0.1, 0.1]), "frequency_band must be"),
    ("fourierft", dict(inference_mode="yes"), "inference_mode must be a bool"),
    ("fourierft", dict(layers_to_transform=[0], target_modules=["q"], layers_pattern=5), "layers_pattern must be"),
    ("fourierft", dict(layers_to_transform=[0], target_modules=["q"], layers_pattern="("), "layers_pattern"),
    ("fourierft", dict(layers_to_transform=[0, -3], target_modules=["q"]), "layers_to_transform must be"),
    ("fourierft", dict(layers_to_transform=True, target_modules=["q"]), "layers_to_transform must be"),
    ("fourierft", dict(modules_to_save=["("]), "not a valid regular expression"),
    ("fourierft", dict(modules_to_save=[""]), "modules_to_save must hold non-empty strings"),
    ("fourierft", dict(exclude_modules=5), "exclude_modules must be"),
    ("fourierft", dict(target_modules=[""]), "target_modules must hold non-empty strings"),
    ("fourierft", dict(task_type=5), "Invalid task type"),
    # BOFT
    ("boft", dict(boft_block_size=-1), "boft_block_size must be a non-negative int"),
    ("boft", dict(boft_block_size="4"), "boft_block_size must be a non-negative int"),
    ("boft", dict(boft_block_size=2.5), "boft_block_size must be a non-negative int"),
    ("boft", dict(boft_block_size=True), "boft_block_size must be a non-negative int"),
    ("boft", dict(boft_block_size=0, boft_block_num=-2), "boft_block_num must be a non-negative int"),
    ("boft", dict(boft_block_size=8, boft_block_num=2), "Set either boft_block_size or boft_block_num"),
    ("boft", dict(boft_block_size=0, boft_block_num=0), "Set boft_block_size or boft_block_num"),
    ("boft", dict(boft_n_butterfly_factor=0), "boft_n_butterfly_factor must be an int >= 1"),
    ("boft", dict(boft_n_butterfly_factor=-1), "boft_n_butterfly_factor must be an int >= 1"),
    ("boft", dict(boft_n_butterfly_factor=1.5), "boft_n_butterfly_factor must be an int >= 1"),
    ("boft", dict(boft_n_butterfly_factor=True), "boft_n_butterfly_factor must be an int >= 1"),
    ("boft", dict(boft_dropout=-0.1), r"boft_dropout must be in \[0, 1\)"),
    ("boft", dict(boft_dropout=1.0), r"boft_dropout must be in \[0, 1\)"),
    ("boft", dict(boft_dropout=float("nan")), r"boft_dropout must be in \[0, 1\)"),
    ("boft", dict(boft_dropout=float("inf")), r"boft_dropout must be in \[0, 1\)"),
    ("boft", dict(boft_dropout="0.1"), r"boft_dropout must be in \[0, 1\)"),
    ("boft", dict(bias="lora"), "bias='lora' is not supported"),
    ("boft", dict(bias=""), "bias='' is not supported"),
    ("boft", dict(target_modules="(unclosed"), "not a valid regular expression"),
    ("boft", dict(exclude_modules="[bad"), "not a valid regular expression"),
    ("boft", dict(target_modules=["q"], layers_to_transform=[-1]), "layers_to_transform must be"),
    ("boft", dict(modules_to_save="head"), "modules_to_save must be a list"),
    ("boft", dict(init_weights="yes"), "init_weights must be a bool"),
    ("boft", dict(fan_in_fan_out=None), "fan_in_fan_out must be a bool"),
]


@pytest.mark.parametrize("method,kwargs,match", CONFIG_CASES,
                         ids=[f"{m}-{sorted(k.items())}" for m, k, _ in CONFIG_CASES])
def test_bad_config_values_rejected(method, kwargs, match):
    with pytest.raises(ValueError, match=match):
        CONFIGS[method](**kwargs)


DICT_CASES = [
    ("not-a-dict-str", "FOURIERFT", TypeError, "must be a dict"),
    ("not-a-dict-list", [("peft_type", "FOURIERFT")], TypeError, "must be a dict"),
    ("no-peft-type", {"n_frequency": 3}, TypeError, "missing required keys"),
    ("lora", {"peft_type": "LORA"}, ValueError, "'LORA' is not supported"),
    ("peft-type-list", {"peft_type": ["BOFT"]}, ValueError, "is not supported"),
    ("peft-type-null", {"peft_type": None}, ValueError, "None is not supported"),
    ("bad-field", {"peft_type": "BOFT", "boft_block_size": "x"}, ValueError, "boft_block_size must be"),
]


@pytest.mark.parametrize("data,error,match", [c[1:] for c in DICT_CASES], ids=[c[0] for c in DICT_CASES])
def test_bad_config_dicts_rejected(data, error, match):
    with pytest.raises(error, match=match):
        get_peft_config(data)


# ---------------------------------------------------------------------------------------------- injection
def _llama():
    return build("llama")


INJECT_CASES = [
    # (id, model factory, method, config kwargs, adapter name, error, match)
    ("fft-n-above-d_out*d_in", MLP, "fourierft", dict(target_modules=["lin0", "lin1"], n_frequency=41),
     "default", ValueError, r"value passed is 41 and the product is 40 \(layer lin1, 2x20\)"),
    ("fft-pattern-above-d_out*d_in", MLP, "fourierft",
     dict(target_modules=["lin0", "lin1"], n_frequency=5, n_frequency_pattern={"lin1": 41}),
     "default", ValueError, "value passed is 41 and the product is 40"),
    ("fft-no-match", MLP, "fourierft", dict(target_modules=["nope"]), "default", ValueError,
     r"Target modules \{'nope'\} not found"),
    ("fft-regex-no-match", MLP, "fourierft", dict(target_modules=r"x\d"), "default", ValueError, "not found"),
    ("fft-all-excluded", MLP, "fourierft", dict(target_modules=["lin0"], exclude_modules=["lin0"]), "default",
     ValueError, "not found"),
    ("fft-target-is-head", MLP, "fourierft", dict(target_modules=["lin0"], modules_to_save=["lin0"]), "default",
     ValueError, "not found"),
    ("fft-unsupported-type", MLP, "fourierft", dict(target_modules=["relu"]), "default", TypeError,
     r"relu \(ReLU\) is not supported by FourierFTModel"),
    ("fft-conv2d-groups", lambda: ConvNet(groups=2), "fourierft", dict(target_modules=["conv"]), "default",
     ValueError, r"FourierFT does not support grouped convolutions: conv has groups=2"),
    ("fft-conv1d", lambda: nn.Sequential(nn.Conv1d(4, 4, 3)), "fourierft", dict(target_modules=["0"]), "default",
     TypeError, r"0 \(Conv1d\) is not supported by FourierFTModel"),
    ("fft-no-default-targets", MLP, "fourierft", dict(), "default", ValueError, "Please specify target_modules"),
    ("fft-layer-out-of-range", _llama, "fourierft", dict(target_modules=["q_proj"], layers_to_transform=[5]),
     "default", ValueError,
     r"layers_to_transform=\[5\] \(modules of that name exist in layers \[0, 1\]; no layer \[5\]\)"),
    ("fft-layer-out-of-range-pattern", _llama, "fourierft",
     dict(target_modules=["q_proj"], layers_to_transform=9, layers_pattern="layers"), "default", ValueError,
     "no layer \\[9\\]"),
    ("fft-layer-pattern-wrong", _llama, "fourierft",
     dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="blocks"), "default", ValueError,
     "not found"),
    ("boft-block-not-dividing", MLP, "boft", dict(target_modules=["lin0"], boft_block_size=3), "default",
     ValueError, r"Layer lin0: boft_block_size=3 must divide n=10; valid boft_block_size values .*\[1, 2, 5, 10\]"),
    ("boft-block-num-not-dividing", MLP, "boft", dict(target_modules=["lin0"], boft_block_size=0, boft_block_num=3),
     "default", ValueError, "Layer lin0: boft_block_num=3 must divide n=10"),
    ("boft-block-above-n", MLP, "boft", dict(target_modules=["lin0"], boft_block_size=32), "default", ValueError,
     "Layer lin0: boft_block_size=32 must divide n=10"),
    ("boft-too-many-factors", MLP, "boft", dict(target_modules=["lin0"], boft_n_butterfly_factor=3), "default",
     ValueError, r"Layer lin0: .*must be a multiple of 2\*\*\(m-1\)=4"),
    ("boft-second-layer-fails", lambda: nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 3)), "boft",
     dict(target_modules=["0", "1"], boft_block_size=4), "default", ValueError,
     r"Layer 1: boft_block_size=4 must divide n=6"),
    ("boft-grouped-conv", lambda: ConvNet(groups=2), "boft", dict(target_modules=["conv"]), "default",
     NotImplementedError, re.escape("BOFT does not support Conv2d layers with groups > 1 (got groups=2).")),
    ("boft-no-match", MLP, "boft", dict(target_modules=["nope"]), "default", ValueError, "not found"),
    ("boft-layer-out-of-range", _llama, "boft", dict(target_modules=["q_proj"], layers_to_transform=[2, 3]),
     "default", ValueError, r"no layer \[2, 3\]"),
] + [
    (f"{method}-bad-name-{name!r}", MLP, method, dict(target_modules=["lin0"]), name, ValueError,
     "Invalid adapter name") for method in METHODS for name in BAD_NAMES
]


@pytest.mark.parametrize("factory,method,kwargs,name,error,match", [c[1:] for c in INJECT_CASES],
                         ids=[c[0] for c in INJECT_CASES])
@pytest.mark.parametrize("entry", ["get_peft_model", "inject_adapter_in_model", "tuner"])
def test_bad_injection_leaves_base_model_untouched(entry, factory, method, kwargs, name, error, match):
    torch.manual_seed(0)
    model = factory()
    before = snapshot(model)
    config = CONFIGS[method](**kwargs)
    fields = copy.deepcopy(config.__dict__)
    with pytest.raises(error, match=match):
        if entry == "get_peft_model":
            get_peft_model(model, config, adapter_name=name)
        elif entry == "inject_adapter_in_model":
            inject_adapter_in_model(config, model, adapter_name=name)
        else:
            (FourierFTModel if method == "fourierft" else BOFTModel)(model, {name: config}, name)
    assert_unchanged(model, before)
    assert not hasattr(model, "peft_config")
    assert config.__dict__ == fields, "the caller's config was changed"


def test_task_class_failure_leaves_config_and_model_untouched():
    model = build("bert")
    before = snapshot(model)
    config = FourierFTConfig(task_type="SEQ_CLS", target_modules=["nope"])
    with pytest.raises(ValueError, match="not found"):
        get_peft_model(model, config)
    assert config.modules_to_save is None and config.base_model_name_or_path is None
    assert_unchanged(model, before)


def test_second_config_failing_rolls_back_the_first():
    model = MLP()
    before = snapshot(model)
    configs = {"a": FourierFTConfig(target_modules=["lin0"], n_frequency=4, modules_to_save=["lin1"]),
               "b": FourierFTConfig(target_modules=["nope"])}
    with pytest.raises(ValueError, match="not found"):
        FourierFTModel(model, configs, "a")
    assert_unchanged(model, before)
    assert not hasattr(model, "peft_config")


BAD_MODELS = [("str", "model"), ("none", None), ("tensor", torch.zeros(3)), ("dict", {"lin0": nn.Linear(2, 2)})]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [b[1] for b in BAD_MODELS], ids=[b[0] for b in BAD_MODELS])
def test_model_that_is_not_a_module(method, bad):
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        get_peft_model(bad, CONFIGS[method](target_modules=["lin0"]))
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        inject_adapter_in_model(CONFIGS[method](target_modules=["lin0"]), bad)


BAD_CONFIGS = [
    ("dict", {"peft_type": "FOURIERFT"}), ("none", None), ("str", "FOURIERFT"),
    ("peft-fourierft", peft.FourierFTConfig(target_modules=["lin0"])), ("peft-lora", peft.LoraConfig()),
]


@pytest.mark.parametrize("bad", [b[1] for b in BAD_CONFIGS], ids=[b[0] for b in BAD_CONFIGS])
@pytest.mark.parametrize("entry", ["get_peft_model", "inject_adapter_in_model", "add_adapter", "PeftModel"])
def test_config_of_the_wrong_type(entry, bad):
    model = MLP() if entry != "add_adapter" else adapted("fourierft")
    before = snapshot(model)
    with pytest.raises(TypeError, match="Expected a fourierft PeftConfig"):
        if entry == "get_peft_model":
            get_peft_model(model, bad)
        elif entry == "inject_adapter_in_model":
            inject_adapter_in_model(bad, model)
        elif entry == "add_adapter":
            model.add_adapter("new", bad)
        else:
            PeftModel(model, bad)
    assert_unchanged(model, before)


@pytest.mark.parametrize("method", METHODS)
def test_mixed_true_rejected(method):
    model = MLP()
    before = snapshot(model)
    with pytest.raises(ValueError, match="does not support mixed adapter models"):
        get_peft_model(model, CONFIGS[method](target_modules=["lin0"]), mixed=True)
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------------- already adapted
@pytest.mark.parametrize("first", METHODS)
@pytest.mark.parametrize("second", METHODS)
def test_get_peft_model_twice_on_one_model(first, second):
    """Re-wrapping an adapted model must not overwrite its adapter (same name) or mix methods."""
    base = MLP()
    model = get_peft_model(base, CONFIGS[first](target_modules=["lin0"]))
    before = snapshot(model)
    error, match = ((ValueError, "lin0 already holds an adapter named 'default'") if first == second
                    else (TypeError, "lin0 is already adapted by"))
    with pytest.raises(error, match=match):
        get_peft_model(base, CONFIGS[second](target_modules=["lin0"]))
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------------- operations
def _poison(value: float, which: str):
    def apply(model, method, tmp=None):
        with torch.no_grad():
            layer = model.base_model.model.lin1
            if method == "fourierft":
                layer.fourierft_spectrum["other"][0] = value
            elif which == "R":
                layer.boft_R["other"][0, 0, 0, 1] = value
            else:
                layer.boft_s["other"][0] = value
        model.set_adapter("other")
    return apply


def _merge(names):
    def apply(model, method, tmp):
        model.merge_adapter(names)
    return apply


def _save(model, method, tmp):
    model.save_pretrained(tmp)


OP_CASES = [
    # (id, setup(model, method, tmp) or None, call(model, method, tmp), error or {method: error}, match or
    # {method: match})
    ("add-duplicate", None, lambda m, k, t: m.add_adapter("default", CONFIGS[k](target_modules=["lin1"])),
     ValueError, "Adapter with name default already exists"),
    ("add-other-method", None,
     lambda m, k, t: m.add_adapter("x", CONFIGS["boft" if k == "fourierft" else "fourierft"](target_modules=["lin0"])),
     ValueError, "Cannot combine adapters of type"),
    ("add-no-match", None, lambda m, k, t: m.add_adapter("x", CONFIGS[k](target_modules=["nope"])),
     ValueError, "not found"),
    ("add-bad-layer-value", None,
     lambda m, k, t: m.add_adapter("x", FourierFTConfig(target_modules=["lin0", "lin1"], n_frequency=41)
                                   if k == "fourierft" else BOFTConfig(target_modules=["lin0", "lin1"],
                                                                       boft_block_size=4)),
     ValueError, {"fourierft": r"product is 40 \(layer lin1", "boft": "Layer lin0: boft_block_size=4 must divide"}),
    ("add-second-bias", lambda m, k, t: m.add_adapter("b", CONFIGS[k](target_modules=["lin1"], bias="all")),
     lambda m, k, t: m.add_adapter("x", CONFIGS[k](target_modules=["lin0"], bias=f"{k}_only")),
     ValueError, "supports only 1 adapter with bias"),
    ("add-while-head-clash", None,
     lambda m, k, t: m.add_adapter("x", CONFIGS[k](target_modules=["lin0"], modules_to_save=["lin0"])),
     ValueError, "not found"),
    ("set-unknown", None, lambda m, k, t: m.set_adapter("nope"), ValueError, "Adapter nope not found"),
    ("set-none", None, lambda m, k, t: m.set_adapter(None), TypeError, "adapter_name must be one adapter's name"),
    ("set-list", None, lambda m, k, t: m.set_adapter(["default"]), TypeError, "adapter_name must be one"),
    ("tuner-set-none", None, lambda m, k, t: m.base_model.set_adapter(None), TypeError,
     "Expected an adapter name or a list of adapter names"),
    ("tuner-set-unknown-in-list", None, lambda m, k, t: m.base_model.set_adapter(["default", "nope"]),
     ValueError, "Adapter nope not found"),
    ("delete-unknown", None, lambda m, k, t: m.delete_adapter("nope"), ValueError, "Adapter nope does not exist"),
    ("delete-none", None, lambda m, k, t: m.delete_adapter(None), ValueError, "does not exist"),
    ("delete-merged", _merge(["default"]), lambda m, k, t: m.delete_adapter("default"), ValueError,
     re.escape("Cannot delete adapter(s) ['default'] while they are merged. Please unmerge them first.")),
    ("delete-merged-inactive", _merge(["other"]), lambda m, k, t: m.delete_adapter("other"), ValueError,
     r"Cannot delete adapter\(s\) \['other'\] while they are merged"),
    ("merge-unknown", None, lambda m, k, t: m.merge_adapter(["nope"]), ValueError, "Adapter nope not found"),
    ("merge-bad-type", None, lambda m, k, t: m.merge_adapter(5), TypeError, "Expected an adapter name"),
    ("merge-and-unload-unknown", None, lambda m, k, t: m.merge_and_unload(adapter_names=["nope"]), ValueError,
     "Adapter nope not found"),
    ("safe-merge-nan", _poison(float("nan"), "R"), lambda m, k, t: m.merge_adapter(safe_merge=True), ValueError,
     "NaNs detected in the merged weights. The adapter other seems to be broken"),
    ("safe-merge-inf", _poison(-float("inf"), "s"), lambda m, k, t: m.merge_adapter(safe_merge=True), ValueError,
     "The adapter other seems to be broken"),
    ("safe-merge-nan-named", _poison(float("nan"), "R"),
     lambda m, k, t: m.merge_adapter(["default", "other"], safe_merge=True), ValueError, "adapter other"),
    ("safe-merge-and-unload-nan", _poison(float("nan"), "R"),
     lambda m, k, t: m.merge_and_unload(safe_merge=True), ValueError, "adapter other seems to be broken"),
    ("safe-merge-inf-scale", _poison(float("inf"), "s"), lambda m, k, t: m.merge_adapter(safe_merge=True),
     ValueError, "adapter other"),
    ("save-unknown", None, lambda m, k, t: m.save_pretrained(t, selected_adapters=["nope"]), ValueError,
     r"invalid `selected_adapters`.*\['nope'\]"),
    ("save-traversal-name", None, lambda m, k, t: m.save_pretrained(t, selected_adapters=["../x"]), ValueError,
     "invalid `selected_adapters`"),
    ("save-onto-file", None,
     lambda m, k, t: (open(os.path.join(t, "f"), "w").close(), m.save_pretrained(os.path.join(t, "f"))),
     ValueError, "should be a directory, not a file"),
    ("load-missing-dir", None, lambda m, k, t: m.load_adapter(os.path.join(t, "missing"), adapter_name="x"),
     FileNotFoundError, "adapter_config.json"),
    ("load-empty-dir", None, lambda m, k, t: m.load_adapter(t, adapter_name="x"), FileNotFoundError,
     "No adapter_config.json"),
    ("load-model-id-int", None, lambda m, k, t: m.load_adapter(5, adapter_name="x"), TypeError,
     "model_id must be a folder path"),
    ("load-config-not-config", None, lambda m, k, t: m.load_adapter(t, adapter_name="x", config={"a": 1}),
     ValueError, "must be a PeftConfig"),
    ("set-state-not-dict", None, lambda m, k, t: set_peft_model_state_dict(m, [1, 2]), TypeError,
     "must be a dict of tensors"),
    ("set-state-unknown-adapter", None, lambda m, k, t: set_peft_model_state_dict(m, {}, adapter_name="nope"),
     ValueError, "Adapter nope not found"),
    ("set-state-junk-key", None, lambda m, k, t: set_peft_model_state_dict(m, {"junk": torch.zeros(1)}),
     CheckpointError, "unexpected key 'base_model.model.junk'"),
    ("set-state-empty", None, lambda m, k, t: set_peft_model_state_dict(m, {}), CheckpointError, "missing key"),
    ("set-state-wrong-shape", None,
     lambda m, k, t: set_peft_model_state_dict(
         m, {k2: v[..., :1] for k2, v in get_peft_model_state_dict(m).items()}),
     CheckpointError, "has shape"),
    ("set-state-non-tensor", None,
     lambda m, k, t: set_peft_model_state_dict(m, {k2: 1.0 for k2 in get_peft_model_state_dict(m)}),
     CheckpointError, "is not a tensor"),
    ("get-state-unknown", None, lambda m, k, t: get_peft_model_state_dict(m, adapter_name="nope"), ValueError,
     "Adapter nope not found"),
    ("mixed-wrong-length", None, lambda m, k, t: m(torch.randn(3, 10), adapter_names=["default"] * 2),
     ValueError, "adapter_names has 2 entries but the batch has 3 samples"),
    ("mixed-unknown", None, lambda m, k, t: m(torch.randn(2, 10), adapter_names=["default", "nope"]),
     ValueError, r"Unknown adapter names \['nope'\]"),
    ("mixed-str", None, lambda m, k, t: m(torch.randn(2, 10), adapter_names="default"), ValueError,
     "must be a list of adapter names"),
    ("mixed-while-merged", _merge(["default"]),
     lambda m, k, t: m(torch.randn(2, 10), adapter_names=["default", "other"]), ValueError,
     "Cannot pass `adapter_names` when there are merged adapters"),
    ("forward-wrong-width", None, lambda m, k, t: m(torch.randn(2, 11)),
     {"fourierft": RuntimeError, "boft": ValueError},
     {"fourierft": "shapes cannot be multiplied", "boft": "x has 11 features but Q describes n = N \\* b = 10"}),
] + [
    (f"add-bad-name-{name!r}", None,
     lambda m, k, t, name=name: m.add_adapter(name, CONFIGS[k](target_modules=["lin0"])),
     ValueError, "Invalid adapter name") for name in BAD_NAMES
] + [
    (f"load-bad-name-{name!r}", _save,
     lambda m, k, t, name=name: m.load_adapter(t, adapter_name=name), ValueError, "Invalid adapter name")
    for name in ("a/b", "..", "../../escape", "x.y")
] + [
    ("load-duplicate-name", _save,
     lambda m, k, t: m.load_adapter(t, adapter_name="other"), ValueError,
     "Adapter 'other' already exists with a different config"),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("setup,call,error,match", [c[1:] for c in OP_CASES], ids=[c[0] for c in OP_CASES])
def test_bad_operation_leaves_model_untouched(method, setup, call, error, match, tmp_path):
    error = error[method] if isinstance(error, dict) else error
    match = match[method] if isinstance(match, dict) else match
    model = adapted(method)
    if setup is not None:
        setup(model, method, str(tmp_path))
    listing = sorted(os.listdir(tmp_path))
    before = snapshot(model)
    with pytest.raises(error, match=match):
        call(model, method, str(tmp_path))
    assert_unchanged(model, before)
    assert sorted(os.listdir(tmp_path)) in (listing, sorted(listing + ["f"]))


def test_zero_boft_scale_is_refused_by_safe_merge_and_unmerge():
    """boft_s with a zero merges to a finite weight from which W cannot be recovered (division by s): safe_merge
    refuses it; an unchecked merge_adapter() keeps the replaced weight, so unmerging still restores it exactly."""
    model = adapted("boft")
    _poison(0.0, "s")(model, "boft")
    before = snapshot(model)
    with pytest.raises(ValueError, match="boft_s of adapter other has zero entries: its merge cannot be undone"):
        model.merge_adapter(safe_merge=True)
    assert_unchanged(model, before)
    model.merge_adapter()  # unchecked: allowed, the weight stays finite
    merged = snapshot(model)
    assert all(torch.isfinite(v).all() for v in merged["state"].values())
    model.unmerge_adapter()  # the merge kept the weight it replaced: undone bit for bit, no division by s
    assert_unchanged(model, before)


@pytest.mark.parametrize("method", METHODS)
def test_deleting_the_active_adapter_switches_to_a_remaining_one(method):
    model = adapted(method)
    x = torch.randn(4, 10)
    model.set_adapter("other")
    with torch.no_grad():
        expected_other = model(x)
    model.set_adapter("default")
    other_tensors = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".other")}
    model.delete_adapter("default")
    assert model.active_adapters == ["other"] and list(model.peft_config) == ["other"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in other_tensors.items())
    assert not any(k.endswith(".default") for k in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected_other)
    model.delete_adapter("other")
    assert model.active_adapters == [] and not model.peft_config
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.get_base_model()(x))


@pytest.mark.parametrize("method", METHODS)
def test_exception_inside_disable_adapter_restores_state(method):
    model = adapted(method)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="inside"):
        with model.disable_adapter():
            raise RuntimeError("inside")
    assert_unchanged(model, before)
    assert not model._adapters_disabled


@pytest.mark.parametrize("method", METHODS)
def test_layers_to_transform_partial_match_warns_and_adapts_the_rest(method, caplog):
    """Decision: some indices match -> adapt those (PEFT does, so its files load) and warn naming the rest."""
    with caplog.at_level(logging.WARNING, logger="fourierft"):
        model = get_peft_model(build("llama"), CONFIGS[method](target_modules=["q_proj"], layers_to_transform=[1, 7]))
    assert [n for n, _ in model.base_model.adapter_layers()] == ["model.layers.1.self_attn.q_proj"]
    assert "no target module lies in layer(s) [7]" in caplog.text and "[0, 1]" in caplog.text


@pytest.mark.parametrize("method", METHODS)
def test_single_name_string_is_one_adapter(method):
    model = adapted(method)
    model.merge_adapter("other")
    assert model.base_model.model.lin1.merged_adapters == ["other"]
    model.unmerge_adapter()
