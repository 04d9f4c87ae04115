"""A config passed in is an input: no entry point changes it, on success or on failure.

Every entry point resolves the user's config (default targets, ``"all-linear"``, task heads in
``modules_to_save``, ``fan_in_fan_out``, ``base_model_name_or_path``, ``inference_mode``, BOFT's factor count
from the file) into the model's own copy, which ``model.peft_config[name]`` shows.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import METHODS, build, method_config
from fourierft import (
    CheckpointError,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
)


def frozen(config) -> tuple[dict, dict]:
    """Everything a config holds: its JSON form and every attribute (private ones included)."""
    return copy.deepcopy(config.to_dict()), copy.deepcopy(vars(config))


def assert_untouched(config, before) -> None:
    assert frozen(config) == before


@pytest.mark.parametrize("method", METHODS)
def test_get_peft_model_resolves_a_copy(method):
    config = method_config(method, target_modules=None, task_type="SEQ_CLS")  # bert default targets + head
    before = frozen(config)
    model = get_peft_model(build("bert"), config)
    assert_untouched(config, before)
    own = model.peft_config["default"]
    assert own is not config
    assert own.target_modules == {"query", "value"}
    assert "classifier" in own.modules_to_save and config.modules_to_save is None


def test_all_linear_and_fan_in_fan_out_resolved_in_the_copy():
    config = method_config("fourierft", target_modules="all-linear")  # GPT-2's Conv1D: FourierFT only
    before = frozen(config)
    model = get_peft_model(build("gpt2"), config)
    assert_untouched(config, before)
    own = model.peft_config["default"]
    assert isinstance(own.target_modules, set) and "c_attn" in own.target_modules
    assert own.fan_in_fan_out is True and config.fan_in_fan_out is False


@pytest.mark.parametrize("method", METHODS)
def test_get_peft_model_failure(method):
    for config in (method_config(method, target_modules=["no_such_module"]),
                   method_config(method, target_modules=None)):  # the MLP has no default targets
        before = frozen(config)
        with pytest.raises(ValueError):
            get_peft_model(build("mlp"), config)
        assert_untouched(config, before)


@pytest.mark.parametrize("method", METHODS)
def test_add_adapter(method):
    model = get_peft_model(build("bert"), method_config(method, target_modules=None, task_type="SEQ_CLS"))
    config = method_config(method, target_modules=None, task_type="SEQ_CLS")
    before = frozen(config)
    model.add_adapter("other", config)
    assert_untouched(config, before)
    assert model.peft_config["other"].target_modules == {"query", "value"}
    bad = method_config(method, target_modules=["no_such_module"], task_type="SEQ_CLS")
    before = frozen(bad)
    with pytest.raises(ValueError):
        model.add_adapter("bad", bad)
    assert_untouched(bad, before)
    assert "bad" not in model.peft_config


def _saved(method, tmp_dir, **kwargs) -> str:
    torch.manual_seed(0)
    model = get_peft_model(build("mlp"), method_config(method, **kwargs))
    model.save_pretrained(tmp_dir)
    return tmp_dir


@pytest.mark.parametrize("method", METHODS)
def test_from_pretrained_and_load_adapter(method, tmp_dir):
    path = _saved(method, tmp_dir)
    config = PeftModel.from_pretrained(build("mlp"), path).peft_config["default"]
    config = copy.deepcopy(config)
    config.inference_mode = False
    before = frozen(config)
    model = PeftModel.from_pretrained(build("mlp"), path, config=config)  # is_trainable=False
    assert_untouched(config, before)
    assert model.peft_config["default"].inference_mode is True and config.inference_mode is False
    model.load_adapter(path, "again", config=config)
    assert_untouched(config, before)
    assert model.peft_config["again"].inference_mode is True


@pytest.mark.parametrize("method", METHODS)
def test_from_pretrained_and_load_adapter_failure(method, tmp_dir):
    path = _saved(method, tmp_dir)
    wrong = method_config(method, target_modules=["lin0"])  # the file also holds lin1: does not fit
    before = frozen(wrong)
    with pytest.raises(CheckpointError):
        PeftModel.from_pretrained(build("mlp"), path, config=wrong)
    assert_untouched(wrong, before)
    model = get_peft_model(build("mlp"), method_config(method))
    with pytest.raises(CheckpointError):
        model.load_adapter(path, "other", config=wrong)
    assert_untouched(wrong, before)
    assert "other" not in model.peft_config


def test_boft_factor_count_from_the_file_goes_into_the_copy(tmp_dir):
    path = _saved("boft", tmp_dir, target_modules=["lin1"], boft_n_butterfly_factor=2)  # n = 20: N = 10, m = 2
    config = method_config("boft", target_modules=["lin1"], boft_n_butterfly_factor=1)
    before = frozen(config)
    model = PeftModel.from_pretrained(build("mlp"), path, config=config)
    assert_untouched(config, before)
    assert model.peft_config["default"].boft_n_butterfly_factor == 2


@pytest.mark.parametrize("method", METHODS)
def test_inject_adapter_in_model(method):
    config = method_config(method, target_modules=["lin0"])
    before = frozen(config)
    model = inject_adapter_in_model(config, build("mlp"))
    assert_untouched(config, before)
    state = get_peft_model_state_dict(model)
    config = method_config(method, target_modules=["lin0", "lin1"])
    before = frozen(config)
    model = inject_adapter_in_model(config, build("mlp"), state_dict=state)  # targets taken from the keys
    assert_untouched(config, before)
    assert model.peft_config["default"].target_modules == {"lin0"}
    bad = method_config(method, target_modules=["no_such_module"])
    before = frozen(bad)
    with pytest.raises(ValueError):
        inject_adapter_in_model(bad, build("mlp"))
    assert_untouched(bad, before)
