"""PEFT's public surface, behaviour (3/3): tuner-layer and ``ModulesToSaveWrapper`` attributes, configs, their
warnings and errors, with peft 0.21.2 as the oracle (see ``peft_surface.py``)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from peft_surface import (  # noqa: E402
    CONFIGS,
    Case,
    build,
    case_id,
    check,
    for_both_methods,
    grads,
    layer,
    output,
    quiet,
    raises,
    torch_type,
    two_adapters,
    type_name,
    warned,
)


def _modules_to_save(lib, tmp, method):
    m = build(lib, method, modules_to_save=["lin1"])
    w = layer(m, "lin1")
    return (m.modules_to_save, torch_type(w.original_module), sorted(w.modules_to_save), w.active_adapter,
            w.weight, grads(m), output(m))


def _mts_active_adapters(lib, tmp, method):
    m = build(lib, method, modules_to_save=["lin1"])
    return layer(m, "lin1").active_adapters


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


def _too_many_frequencies(lib, tmp, method):
    return raises(lambda: build(lib, "fourierft", n_frequency=201))


def _bad_block(lib, tmp, method):
    return raises(lambda: build(lib, "boft", boft_block_size=3))


def _n_frequency_pattern(lib, tmp, method):
    m = build(lib, "fourierft", target_modules=["lin0", "lin1"], n_frequency_pattern={"lin1": 5})
    return layer(m).fourierft_n_frequency, layer(m, "lin1").fourierft_n_frequency, output(m)


def _config_subfolder(lib, tmp, method):
    CONFIGS[method](lib).save_pretrained(os.path.join(tmp, "sub"))
    loaded = lib.PeftConfig.from_pretrained(tmp, subfolder="sub")
    return type_name(loaded), loaded.target_modules



def _layer_repr(lib, tmp, method):
    return repr(layer(build(lib, method))).split(".")[0]


def _config_sets(lib, tmp, method):
    c = CONFIGS[method](lib, target_modules=["lin0", "lin1"], exclude_modules=["lin1"])
    return c.target_modules, c.exclude_modules


def _str_targets_with_layers(lib, tmp, method):
    return raises(lambda: CONFIGS["fourierft"](lib, target_modules="lin0", layers_to_transform=[0],
                                              layers_pattern="layers"))



def _check_kwargs(lib, tmp, method):
    cls = getattr(lib, "FourierFTConfig" if method == "fourierft" else "BOFTConfig")
    return cls.check_kwargs(target_modules=["lin0"], foo=1)


CASES = [
    *for_both_methods([
        ("PeftModel.modules_to_save/ModulesToSaveWrapper", _modules_to_save),
        ("ModulesToSaveWrapper.active_adapters", _mts_active_adapters),
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
        ("tuner layer set_requires_grad", _layer_requires_grad),
        ("ModulesToSaveWrapper.disable_adapters", _mts_disabled),
        ("from_json_file drops runtime_config with a warning", _runtime_config_warns),
        ("PeftConfig.from_pretrained(subfolder=)", _config_subfolder),
        ("tuner layer repr prefix", _layer_repr),
        ("Config.check_kwargs", _check_kwargs),
        ("config target_modules/exclude_modules lists become sets", _config_sets),
    ]),
    Case("FourierFTLinear attributes", lambda lib, tmp: _fft_layer(lib, tmp, "fourierft")),
    Case("FourierFTConfig n_frequency_pattern", lambda lib, tmp: _n_frequency_pattern(lib, tmp, "fourierft")),
    Case("FourierFTConfig str target_modules with layers_to_transform raises",
         lambda lib, tmp: _str_targets_with_layers(lib, tmp, "fourierft")),
    Case("FourierFTConfig n_frequency > out*in raises", lambda lib, tmp: _too_many_frequencies(lib, tmp, "fourierft")),
    Case("BOFTLinear attributes", lambda lib, tmp: _boft_layer(lib, tmp, "boft")),
    Case("BOFTLinear in_features/out_features", lambda lib, tmp: _boft_features(lib, tmp, "boft")),
    Case("BOFTConv2d attributes", lambda lib, tmp: _boft_conv(lib, tmp, "boft")),
    Case("BOFTConfig block size not dividing raises", lambda lib, tmp: _bad_block(lib, tmp, "boft")),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_behaves_as_peft(case, tmp_path):
    check(case, tmp_path)
