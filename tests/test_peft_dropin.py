"""PEFT code that must run unchanged: each test runs the same user code against ``peft`` (the oracle) and
``fourierft`` and compares what a user observes. Public API only, written as a PEFT user writes it."""

from __future__ import annotations

import json
import os
import warnings

import peft
import pytest
import safetensors.torch
import torch

import fourierft
from conftest import MLP, build, make_inputs, model_output

LIBS = pytest.mark.parametrize("lib", [peft, fourierft], ids=["peft", "fourierft"])


def _fft(lib, **kw):
    return lib.FourierFTConfig(target_modules=["lin0"], n_frequency=10, **kw)


def _spectrum(model, name="default"):
    return model.base_model.model.lin0.fourierft_spectrum[name]


def test_peft_type_is_an_enum_member_like_peft():
    for make in (lambda lib: _fft(lib), lambda lib: lib.BOFTConfig(target_modules=["lin0"], boft_block_size=2)):
        ours, theirs = make(fourierft), make(peft)
        assert ours.peft_type.value == theirs.peft_type.value
        assert isinstance(ours.peft_type, fourierft.PeftType) and isinstance(ours.peft_type, str)
        assert ours.peft_type == theirs.peft_type.value  # still compares equal to the plain string
    loaded = fourierft.PeftConfig.from_dict(_fft(peft).to_dict())
    assert loaded.peft_type is fourierft.PeftType.FOURIERFT
    assert json.loads(json.dumps(loaded.to_dict()))["peft_type"] == "FOURIERFT"


@pytest.mark.parametrize("autocast,low_cpu", [(False, True), (False, False), (True, True)])
def test_loaded_adapter_dtype_follows_autocast_like_peft(tmp_dir, autocast, low_cpu):
    dtypes = {}
    for lib in (peft, fourierft):
        torch.manual_seed(0)
        d = os.path.join(tmp_dir, lib.__name__)
        lib.get_peft_model(MLP().half(), _fft(lib), autocast_adapter_dtype=autocast).save_pretrained(d)
        loaded = lib.PeftModel.from_pretrained(MLP().half(), d, autocast_adapter_dtype=autocast,
                                               low_cpu_mem_usage=low_cpu)
        loaded.load_adapter(d, "other", autocast_adapter_dtype=autocast, low_cpu_mem_usage=low_cpu)
        dtypes[lib.__name__] = (_spectrum(loaded).dtype, _spectrum(loaded, "other").dtype)
        assert _spectrum(loaded).device.type == "cpu"
    assert dtypes["fourierft"] == dtypes["peft"]
    assert dtypes["fourierft"][0] == (torch.float32 if autocast else torch.float16)


@LIBS
def test_disable_adapter_block_restores_disabled_layers(lib):
    model = lib.get_peft_model(MLP(), _fft(lib))
    x = make_inputs("mlp")["X"]
    base = model.get_base_model()
    model.disable_adapter_layers()
    with model.disable_adapter():
        assert not model.has_active_enabled_adapter
    assert base.lin0.disable_adapters  # still off, as before the block
    assert model.has_active_enabled_adapter
    with torch.no_grad():
        off = model(x)
        model.enable_adapter_layers()
        on = model(x)
    assert not base.lin0.disable_adapters and not torch.allclose(on, off)


def test_disable_adapter_state_same_as_peft():
    seen = {}
    for lib in (peft, fourierft):
        model = lib.get_peft_model(MLP(), _fft(lib))
        states = [model.has_active_enabled_adapter]
        with model.disable_adapter():
            states.append(model.has_active_enabled_adapter)
        states.append(model.get_base_model().lin0.disable_adapters)
        model.disable_adapter_layers()
        states.append(model.has_active_enabled_adapter)
        seen[lib.__name__] = states
    assert seen["fourierft"] == seen["peft"] == [True, False, False, True]


def test_merged_boft_weights_are_contiguous_and_save_with_safetensors(tmp_dir):
    config = fourierft.BOFTConfig(target_modules=["lin1"], boft_block_size=0, boft_block_num=1, init_weights=False)
    model = fourierft.get_peft_model(build("mlp"), config)
    x = make_inputs("mlp")
    with torch.no_grad():
        expected = model_output(model, "mlp", x)
    merged = model.merge_and_unload()
    assert all(p.is_contiguous() for p in merged.parameters())
    path = os.path.join(tmp_dir, "merged.safetensors")
    safetensors.torch.save_file(merged.state_dict(), path)
    fresh = build("mlp", seed=1)
    fresh.load_state_dict(safetensors.torch.load_file(path))
    with torch.no_grad():
        torch.testing.assert_close(model_output(fresh, "mlp", x), expected, atol=1e-5, rtol=1e-5)


def _saved_and_reloaded(lib, tmp_dir, is_trainable: bool):
    """A seeded FourierFT MLP adapter saved with ``lib`` and loaded back onto a fresh MLP: ``(model, folder)``."""
    torch.manual_seed(0)
    folder = os.path.join(tmp_dir, lib.__name__)
    lib.get_peft_model(MLP(), _fft(lib)).save_pretrained(folder)
    return lib.PeftModel.from_pretrained(MLP(), folder, is_trainable=is_trainable), folder


def _trainable(model):
    return {k: v.requires_grad for k, v in model.base_model.model.lin0.fourierft_spectrum.items()}


@pytest.mark.parametrize("first_trainable", [True, False])
def test_adding_a_frozen_adapter_keeps_trainable_ones_trainable(tmp_dir, first_trainable):
    seen = {}
    for lib in (peft, fourierft):
        model, d = _saved_and_reloaded(lib, tmp_dir, is_trainable=first_trainable)
        model.load_adapter(d, "second", is_trainable=True)
        model.load_adapter(d, "third")
        model.add_adapter("x", _fft(lib))
        seen[lib.__name__] = _trainable(model)
    assert seen["fourierft"] == seen["peft"]
    assert seen["fourierft"]["second"] and not seen["fourierft"]["third"]


@LIBS
def test_boft_layers_expose_in_and_out_features(lib):
    torch.manual_seed(0)
    model = lib.get_peft_model(MLP(), lib.BOFTConfig(target_modules=["lin0", "lin1"], boft_block_size=2))
    layer0, layer1 = model.base_model.model.lin0, model.base_model.model.lin1
    assert (layer0.in_features, layer0.out_features, layer1.in_features, layer1.out_features) == (10, 20, 20, 2)


def test_boft_conv2d_features_like_peft():
    seen = {}
    for lib in (peft, fourierft):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
        model = lib.get_peft_model(net, lib.BOFTConfig(target_modules=["0"], boft_block_size=3))
        layer = model.base_model.model[0]
        seen[lib.__name__] = (layer.in_features, layer.out_features)
    assert seen["fourierft"] == seen["peft"] == (3, 8)


@LIBS
def test_warnings_are_python_warnings(lib, tmp_dir):
    model = lib.get_peft_model(MLP(), _fft(lib, init_weights=True))
    model.merge_adapter()
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do."):
        model.merge_adapter()
    model.unmerge_adapter()
    with pytest.warns(UserWarning, match="Already unmerged. Nothing to do."):
        model.unmerge_adapter()
    data = _fft(lib).to_dict()
    data["a_key_from_the_future"] = 1
    with pytest.warns(UserWarning, match=r"Unexpected keyword arguments \['a_key_from_the_future'\]"):
        lib.PeftConfig.from_peft_type(**data)
    with pytest.warns(UserWarning, match="Careful, disabling adapter layers with bias"):
        lib.get_peft_model(MLP(), lib.BOFTConfig(target_modules=["lin0"], boft_block_size=2,
                                                 bias="boft_only")).disable_adapter_layers()


def test_set_adapter_on_merged_model_warns_like_peft():
    for lib in (peft, fourierft):
        model = lib.get_peft_model(MLP(), _fft(lib))
        model.add_adapter("b", _fft(lib))
        model.merge_adapter()
        with pytest.warns(UserWarning, match="Adapter cannot be set when the model is merged"):
            model.set_adapter("b")
        assert not model.get_base_model().lin0.merged


def test_base_model_state_dict_matches_peft():
    results = {}
    for lib in (peft, fourierft):
        torch.manual_seed(0)
        config = lib.FourierFTConfig(task_type="SEQ_CLS", target_modules=["query", "value"], n_frequency=20)
        model = lib.get_peft_model(build("bert"), config)
        results[lib.__name__] = lib.get_base_model_state_dict(model)
    ours, theirs = results["fourierft"], results["peft"]
    assert list(ours) == list(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key])
    plain = build("bert")
    assert set(ours) == set(plain.state_dict())


@LIBS
def test_set_base_model_state_dict_loads_base_weights_only(lib):
    torch.manual_seed(0)
    model = lib.get_peft_model(build("bert"), lib.FourierFTConfig(task_type="SEQ_CLS", target_modules=["query"],
                                                                  n_frequency=20))
    spectrum = {k: v.clone() for k, v in lib.get_peft_model_state_dict(model).items()}
    donor = build("bert", seed=5).state_dict()
    result = lib.set_base_model_state_dict(model, donor)
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    now = lib.get_base_model_state_dict(model)
    for key, value in donor.items():
        torch.testing.assert_close(now[key], value)
    after = lib.get_peft_model_state_dict(model)
    for key in spectrum:
        if "fourierft_spectrum" in key:
            torch.testing.assert_close(after[key], spectrum[key])


def test_set_base_model_state_dict_strict_errors_like_peft():
    for lib in (peft, fourierft):
        model = lib.get_peft_model(MLP(), _fft(lib))
        sd = {k: v.clone() for k, v in lib.get_base_model_state_dict(model).items()}
        sd.pop("lin1.bias")
        sd["nonsense"] = torch.zeros(1)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \['lin1.bias'\]"):
            lib.set_base_model_state_dict(model, sd)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, before[key])
        result = lib.set_base_model_state_dict(model, sd, strict=False)
        assert list(result.missing_keys) == ["lin1.bias"] and list(result.unexpected_keys) == ["nonsense"]


def test_set_base_model_state_dict_wrong_shape_changes_nothing():
    model = fourierft.get_peft_model(MLP(), _fft(fourierft))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = fourierft.get_base_model_state_dict(model)
    sd = {k: torch.full_like(v, 3.0) for k, v in sd.items()}
    sd["lin1.weight"] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match="size mismatch for lin1.weight"):
        fourierft.set_base_model_state_dict(model, sd)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])


@LIBS
def test_modules_to_save_wrapper_active_adapters(lib):
    model = lib.get_peft_model(MLP(), _fft(lib, modules_to_save=["lin1"]))
    wrapper = model.base_model.model.lin1
    assert wrapper.active_adapters == ["default"]


def test_modules_to_save_written_once_each_and_peft_still_loads(tmp_dir):
    config = fourierft.FourierFTConfig(task_type="SEQ_CLS", target_modules=["query"], n_frequency=20,
                                       modules_to_save=["classifier"])
    torch.manual_seed(0)
    fourierft.get_peft_model(build("bert"), config).save_pretrained(tmp_dir)
    for _ in range(3):  # load and save again: the list must not grow
        model = fourierft.PeftModel.from_pretrained(build("bert"), tmp_dir)
        model.save_pretrained(tmp_dir)
    with open(os.path.join(tmp_dir, "adapter_config.json")) as fh:
        assert json.load(fh)["modules_to_save"] == ["classifier", "score", "pre_classifier"]  # peft 0.22's head names
    x = make_inputs("bert")
    theirs = peft.PeftModel.from_pretrained(build("bert"), tmp_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(model_output(theirs, "bert", x), model_output(model.eval(), "bert", x))


def test_boft_dropout_drops_blocks_when_p_times_blocks_is_below_one():
    """0.1 over 5 blocks: PEFT never drops a block; here each block goes with probability 0.1."""
    torch.manual_seed(0)
    model = fourierft.get_peft_model(MLP(), fourierft.BOFTConfig(target_modules=["lin1"], boft_block_size=4,
                                                                 boft_dropout=0.1, init_weights=False)).train()
    x = make_inputs("mlp")["X"]
    with torch.no_grad():
        model.eval()
        full = model(x)
        model.train()
        outputs = [model(x) for _ in range(200)]
    differ = sum(not torch.allclose(o, full, atol=1e-5) for o in outputs)
    assert 60 <= differ <= 140, differ  # one block in half the passes (p N = 0.5), none otherwise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(MLP(), peft.BOFTConfig(target_modules=["lin1"], boft_block_size=4,
                                                            boft_dropout=0.1, init_weights=False)).train()
    with torch.no_grad():
        ref = theirs.eval()(x)
        theirs.train()
        assert all(torch.allclose(theirs(x), ref, atol=1e-5) for _ in range(20))  # PEFT's bug: nothing dropped


def test_disable_adapter_layers_freezes_adapters_like_peft_and_enable_restores(tmp_dir):
    seen = {}
    for lib in (peft, fourierft):
        model, d = _saved_and_reloaded(lib, tmp_dir, is_trainable=True)
        model.load_adapter(d, "frozen")
        model.base_model.set_adapter(["default", "frozen"])
        model.set_requires_grad("frozen", requires_grad=False)
        before = _trainable(model)
        model.disable_adapter_layers()
        disabled = _trainable(model)
        model.enable_adapter_layers()
        seen[lib.__name__] = (before, disabled, _trainable(model))
    assert seen["fourierft"][1] == seen["peft"][1] == {"default": False, "frozen": False}
    assert seen["fourierft"][2]["default"] and seen["peft"][2]["default"]
    assert seen["fourierft"][2] == seen["fourierft"][0] == {"default": True, "frozen": False}  # as it was
    assert seen["peft"][2] == {"default": True, "frozen": True}  # PEFT makes the frozen adapter trainable
