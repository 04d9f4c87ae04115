"""PEFT's public names for FourierFT and BOFT, with peft 0.21.2 as the oracle: every top-level and ``peft.utils``
name a PEFT user imports exists here with the same kind, and every signature users call keeps PEFT's parameter
names, defaults and positional order. Behaviour is checked name by name in ``test_peft_surface_*.py``; names that
deliberately differ are listed in ``docs/migrating.md`` ("Public surface audit") instead.
"""

from __future__ import annotations

import inspect

import pytest

import fourierft

peft = pytest.importorskip("peft")

from peft_surface import build  # noqa: E402


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
         "TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING",
         "TRANSFORMERS_MODELS_TO_BOFT_TARGET_MODULES_MAPPING",
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
    ("AutoPeftModel.from_pretrained", lambda lib: lib.AutoPeftModel.from_pretrained),
    ("AutoPeftModelForCausalLM.from_pretrained", lambda lib: lib.AutoPeftModelForCausalLM.from_pretrained),
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
