"""PEFT's public surface, behaviour (1/3): ``PeftModel`` and tuner attributes, adapter management, disabling,
merging and unloading, training, target selection, with peft 0.21.2 as the oracle (see ``peft_surface.py``)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("peft")

from peft_surface import (  # noqa: E402
    CONFIGS,
    MLP,
    X,
    build,
    case_id,
    check,
    for_both_methods,
    grads,
    layer,
    output,
    printed,
    quiet,
    raises,
    torch_type,
    two_adapters,
    type_name,
    warned,
)


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


def _print_params(lib, tmp, method):
    return printed(build(lib, method).print_trainable_parameters)


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


def _multi_active(lib, tmp, method):
    m = two_adapters(lib, method, target_modules=["lin0", "lin1"])
    m.base_model.set_adapter(["default", "other"])
    return m.active_adapters, m.base_model.active_adapters, layer(m).active_adapters, output(m), grads(m)


def _delete(lib, tmp, method):
    m = two_adapters(lib, method)
    m.set_adapter("other")
    cats = warned(lambda: m.delete_adapter("other"))[1]
    return cats, sorted(m.peft_config), m.active_adapter, layer(m).active_adapters, output(m)


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
    # the model's resolved config: the same object as ``config`` in PEFT, a copy here (docs/migrating.md)
    return cats, model.peft_config["default"].fan_in_fan_out


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


def _tuner(lib, tmp, method):
    m = build(lib, method, target_modules=["lin0", "lin1"])
    t = m.base_model
    return (t.peft_config is m.peft_config, t.active_adapter, t.active_adapters, t.prefix,
            t.targeted_module_names, t.targeted_parameter_names, type_name(t.model))


def _dtype(lib, tmp, method):
    return build(lib, method).base_model_torch_dtype


def _no_target(lib, tmp, method):
    try:
        build(lib, method, target_modules=["nope"])
    except lib.NoMatchingPeftModuleError as err:
        return type_name(err), isinstance(err, ValueError), isinstance(err, lib.PeftError)
    return None


def _peft_model_type(lib, tmp, method):
    m = build(lib, method)
    return m.peft_type, m.peft_type == method.upper()


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


def _named_adapter(lib, tmp, method):
    torch.manual_seed(0)
    m = quiet(lib.get_peft_model, MLP(), CONFIGS[method](lib), adapter_name="test-adapter")
    return sorted(n for n, _ in m.named_parameters() if "test-adapter" in n), m.active_adapter


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
    targets = m.peft_config["default"].target_modules  # resolved in the model's config (a copy here)
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


def _exclude(lib, tmp, method):
    m = build(lib, method, target_modules=r".*lin\d", exclude_modules=["lin1"])
    return m.base_model.targeted_module_names, output(m)



def _irregular_disable_warns(lib, tmp, method):
    m = build(lib, method, target_modules=["lin0", "lin1"])
    layer(m).enable_adapters(False)  # lin0 off, lin1 on: PEFT calls this state irregular
    def run():
        with m.disable_adapter():
            pass
    return warned(run)[1]


def _safe_merge_nan(lib, tmp, method):
    m = build(lib, method)
    name = "fourierft_spectrum" if method == "fourierft" else "boft_R"
    with torch.no_grad():
        getattr(layer(m), name)["default"].fill_(float("nan"))
    return raises(lambda: m.merge_adapter(safe_merge=True), message=True), layer(m).merged, \
        torch.isfinite(layer(m).get_base_layer().weight).all()


def _merge_unload_heads(lib, tmp, method):
    m = build(lib, method, modules_to_save=["lin1"])
    with torch.no_grad():
        layer(m, "lin1").modules_to_save["default"].weight.mul_(2)
    ref = output(m)
    merged = quiet(m.merge_and_unload)
    return torch_type(merged.lin1), merged.lin1.weight, output(merged) - ref


def _set_adapter_list(lib, tmp, method):
    m = two_adapters(lib, method)
    return raises(lambda: m.set_adapter(["default", "other"]))


def _inference_mode_config(lib, tmp, method):
    return grads(build(lib, method, inference_mode=True))


def _modules_to_save_not_targeted(lib, tmp, method):
    m = build(lib, method, target_modules=["lin0", "lin1"], modules_to_save=["lin1"])
    return m.base_model.targeted_module_names, torch_type(layer(m, "lin1").original_module), output(m)


def _no_default_targets(lib, tmp, method):
    return raises(lambda: build(lib, method, target_modules=None))


def _gpt2_defaults(lib, tmp, method):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    extra = {"n_frequency": 10} if method == "fourierft" else {"boft_block_size": 4}
    config = getattr(lib, "FourierFTConfig" if method == "fourierft" else "BOFTConfig")(**extra)
    try:
        m, cats = warned(lambda: lib.get_peft_model(base, config))
    except Exception as err:  # noqa: BLE001 - PEFT's BOFT cannot adapt gpt2's Conv1D default target
        return "raises", type(err).__mro__[1].__name__ if type(err).__module__ != "builtins" else type(err).__name__
    # the model's resolved config: the same object as ``config`` in PEFT, a copy here (docs/migrating.md)
    return m.base_model.targeted_module_names, m.peft_config["default"].fan_in_fan_out, cats


CASES = [
    *for_both_methods([
        ("forward", _forward),
        ("PeftModel.active_adapter/peft_config/active_peft_config", _peft_config_dict),
        ("PeftModel.get_base_model/base_model", _get_base_model),
        ("PeftModel.base_model_torch_dtype", _dtype),
        ("PeftModel.has_active_enabled_adapter", _has_active_enabled),
        ("PeftModel.get_nb_trainable_parameters", _nb_params),
        ("PeftModel.print_trainable_parameters", _print_params),
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
        ("training: 3 SGD steps", _training_steps),
        ("BaseTuner attributes", _tuner),
        ("no matching target raises NoMatchingPeftModuleError", _no_target),
        ("PeftModel.peft_type", _peft_model_type),
        ("set_adapter(unknown) raises", _bad_set_adapter),
        ("delete_adapter(unknown) raises", _bad_delete),
        ("add_adapter(existing name) raises", _duplicate_add),
        ("second adapter with bias raises", _second_bias),
        ("get_peft_model(adapter_name=)", _named_adapter),
        ("delete_adapter(merged) raises", _delete_merged),
        ("merge_adapter of a further adapter warns", _merge_additionally),
        ("bias='<method>_only'", _bias_only),
        ("bias='all'", _bias_all),
        ("target_modules=None (default mapping)", _llama_targets),
        ("target_modules='all-linear'",
            lambda lib, tmp, meth: _llama_targets(lib, tmp, meth, target_modules="all-linear")),
        ("layers_to_transform/layers_pattern", lambda lib, tmp, meth: _llama_targets(
            lib, tmp, meth, target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers")),
        ("bf16 base, autocast_adapter_dtype=True", _half_autocast),
        ("exclude_modules", _exclude),
        ("disable_adapter() in an irregular state warns", _irregular_disable_warns),
        ("merge_adapter(safe_merge=True) with NaN raises", _safe_merge_nan),
        ("merge_and_unload keeps the modules_to_save copy", _merge_unload_heads),
        ("PeftModel.set_adapter([a, b]) raises", _set_adapter_list),
        ("config inference_mode=True freezes at injection", _inference_mode_config),
        ("modules_to_save names are never targeted", _modules_to_save_not_targeted),
        ("target_modules=None without a default raises", _no_default_targets),
        ("gpt2 default targets (Conv1D)", _gpt2_defaults),
    ]),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_behaves_as_peft(case, tmp_path):
    check(case, tmp_path)
