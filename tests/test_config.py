"""Configs: PEFT's fields and defaults, JSON round trips, and every bad value rejected with a clear message."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import peft
import pytest

from fourierft import FourierFTConfig, PeftConfig, TaskType, get_peft_config


def _fields(cls):
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(cls)}


def test_fields_and_defaults_match_peft():
    ours, theirs = _fields(FourierFTConfig), _fields(peft.FourierFTConfig)
    ours.pop("frequency_band")  # our extension, off by default
    assert ours.keys() == theirs.keys()
    for name in ours:
        if name != "peft_version":
            assert ours[name] == theirs[name], name


def test_json_keys_match_peft(tmp_dir):
    kwargs = dict(task_type="SEQ_CLS", n_frequency=100, modules_to_save=["classifier"])
    FourierFTConfig(**kwargs).save_pretrained(tmp_dir + "/ours")
    peft.FourierFTConfig(**kwargs).save_pretrained(tmp_dir + "/theirs")
    ours = json.load(open(tmp_dir + "/ours/adapter_config.json"))
    theirs = json.load(open(tmp_dir + "/theirs/adapter_config.json"))
    assert ours.keys() == theirs.keys() and len(ours) == 19
    for key in ours:
        if key != "peft_version":
            assert ours[key] == theirs[key], key


def test_round_trip_and_copies(tmp_dir):
    config = FourierFTConfig(target_modules=["a", "list"], n_frequency=7, scaling=10.0,
                             n_frequency_pattern={"q": 3}, frequency_band=[0.1, 0.05])
    config.save_pretrained(tmp_dir)
    loaded = PeftConfig.from_pretrained(tmp_dir)
    assert isinstance(loaded, FourierFTConfig)
    assert loaded.target_modules == {"a", "list"}
    assert loaded.to_dict() == config.to_dict()
    assert copy.deepcopy(config) == config and pickle.loads(pickle.dumps(config)) == config
    assert FourierFTConfig.from_pretrained(tmp_dir).frequency_band == [0.1, 0.05]
    assert get_peft_config(config.to_dict()) == config


def test_extension_field_absent_by_default():
    assert "frequency_band" not in FourierFTConfig().to_dict()


def test_peft_reads_our_config_and_we_read_peft(tmp_dir):
    FourierFTConfig(n_frequency=33, target_modules=["x"]).save_pretrained(tmp_dir + "/a")
    assert peft.PeftConfig.from_pretrained(tmp_dir + "/a").n_frequency == 33
    peft.FourierFTConfig(n_frequency=44, target_modules=["y"]).save_pretrained(tmp_dir + "/b")
    config = PeftConfig.from_pretrained(tmp_dir + "/b")
    assert isinstance(config, FourierFTConfig) and config.n_frequency == 44


def test_unknown_keys_warn_once(tmp_dir):
    data = FourierFTConfig().to_dict() | {"foobar": 1, "spam": 2}
    with open(tmp_dir + "/adapter_config.json", "w") as fh:
        json.dump(data, fh)
    with pytest.warns(UserWarning) as record:  # a Python warning, as in PEFT (filters and pytest.warns see it)
        config = FourierFTConfig.from_pretrained(tmp_dir)
    warnings = [str(r.message) for r in record if "Unexpected keyword arguments" in str(r.message)]
    assert len(warnings) == 1
    assert "['foobar', 'spam'] for class FourierFTConfig, these are ignored." in warnings[0]
    assert not hasattr(config, "foobar")


def test_missing_peft_type_and_bad_files(tmp_dir):
    with open(tmp_dir + "/adapter_config.json", "w") as fh:
        json.dump({"n_frequency": 3}, fh)
    with pytest.raises(TypeError, match="missing required keys: {'peft_type'}"):
        PeftConfig.from_pretrained(tmp_dir)
    with open(tmp_dir + "/adapter_config.json", "w") as fh:
        json.dump({"peft_type": "LORA"}, fh)
    with pytest.raises(ValueError, match="LORA"):
        PeftConfig.from_pretrained(tmp_dir)
    with open(tmp_dir + "/adapter_config.json", "w") as fh:
        fh.write("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        PeftConfig.from_pretrained(tmp_dir)
    with pytest.raises(FileNotFoundError):
        PeftConfig.from_pretrained(tmp_dir + "/nowhere")


@pytest.mark.parametrize("task_type", [t.value for t in TaskType] + [None, TaskType.CAUSAL_LM])
def test_task_types_accepted(task_type):
    assert FourierFTConfig(task_type=task_type).task_type in {t.value for t in TaskType} | {None}


BAD = [
    (dict(task_type="test"), "Invalid task type"),
    (dict(n_frequency=0), "n_frequency must be a positive int"),
    (dict(n_frequency=-5), "n_frequency must be a positive int"),
    (dict(n_frequency=2.5), "n_frequency must be a positive int"),
    (dict(n_frequency=True), "n_frequency must be a positive int"),
    (dict(scaling="big"), "scaling must be a number"),
    (dict(random_loc_seed=None), "random_loc_seed must be an int"),
    (dict(bias="some"), "bias='some' is not supported"),
    (dict(bias=None), "is not supported"),
    (dict(target_modules="(unclosed"), "not a valid regular expression"),
    (dict(exclude_modules="[bad"), "not a valid regular expression"),
    (dict(target_modules=[1, 2]), "must hold non-empty strings"),
    (dict(target_modules=5), "target_modules must be"),
    (dict(target_modules="q", layers_to_transform=[0]), "cannot be used when `target_modules` is a str"),
    (dict(target_modules="q", layers_pattern="layers"), "cannot be used when `target_modules` is a str"),
    (dict(target_modules=["q"], layers_pattern="layers"), "`layers_to_transform` must also be specified"),
    (dict(target_modules=["q"], layers_to_transform=[-1]), "layers_to_transform must be a non-negative"),
    (dict(target_modules=["q"], layers_to_transform="0"), "layers_to_transform must be a non-negative"),
    (dict(modules_to_save="classifier"), "modules_to_save must be a list"),
    (dict(n_frequency_pattern={"q": 0}), r"n_frequency_pattern\['q'\] must be a positive int"),
    (dict(n_frequency_pattern=[1]), "n_frequency_pattern must be a dict"),
    (dict(n_frequency_pattern={"(": 3}), "not a valid regex"),
    (dict(fan_in_fan_out="yes"), "fan_in_fan_out must be a bool"),
    (dict(init_weights=1), "init_weights must be a bool"),
    (dict(frequency_band=[0.9, 0.1]), "frequency_band"),
    (dict(frequency_band=[0.1, 0.0]), "frequency_band"),
    (dict(frequency_band=0.1), "frequency_band must be"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[str(k) for k, _ in BAD])
def test_bad_values_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FourierFTConfig(**kwargs)


def test_layers_to_transform_zero_with_pattern_accepted():
    assert FourierFTConfig(target_modules=["q"], layers_to_transform=0, layers_pattern="layers").layers_to_transform == 0
