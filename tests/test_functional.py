"""fourierft.functional against peft as the oracle: the same code on a PEFT model and on ours (same seed,
same config) must give the same results, field by field."""

from __future__ import annotations

import copy
import dataclasses
import inspect

import pytest
import torch
import transformers
from torch import nn

import fourierft
from fourierft import functional as F

peft = pytest.importorskip("peft")
import peft.functional as PF  # noqa: E402


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(x))))


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return Net()


def configs(lib, method: str, **kw):
    if method == "fourierft":
        return lib.FourierFTConfig(target_modules=["a", "b"], n_frequency=24, init_weights=False, **kw)
    return lib.BOFTConfig(target_modules=["a", "b"], boft_block_size=4, init_weights=False, **kw)  # PEFT on CPU: m=1


def pair(base, method: str, dtype=None, **kw):
    """``(peft model, our model)`` built the same way from the same seed."""
    models = []
    for lib in (peft, fourierft):
        model = copy.deepcopy(base) if dtype is None else copy.deepcopy(base).to(dtype)
        torch.manual_seed(3)
        extra = {} if dtype is None else {"autocast_adapter_dtype": False}
        models.append(lib.get_peft_model(model, configs(lib, method, **kw), **extra))
    return models


def two_adapters(base, method: str):
    models = pair(base, method, modules_to_save=["head"])
    for lib, model in zip((peft, fourierft), models):
        torch.manual_seed(4)
        model.add_adapter("other", configs(lib, method))
    return models


def statuses(model, module=peft):
    return [dataclasses.asdict(s) for s in module.get_layer_status(model)]


def ours(model):
    return [dataclasses.asdict(s) for s in F.get_layer_status(model)]


def same_layers(theirs: list[dict], mine: list[dict]) -> None:
    assert theirs == mine


def grads(model) -> dict:
    return {k: p.requires_grad for k, p in model.named_parameters()}


def dtypes(model) -> dict:
    return {k: p.dtype for k, p in model.named_parameters()}


METHODS = ["fourierft", "boft"]


def test_names_and_signatures_match_peft():
    names = ["cast_adapter_dtype", "delete_adapter", "get_peft_model_state_dict", "inject_adapter_in_model",
             "set_adapter", "set_peft_model_state_dict", "set_requires_grad", "set_training"]
    assert sorted(PF.__all__) == names
    pairs = [(getattr(PF, n), getattr(F, n)) for n in names] + [
        (getattr(peft, n), getattr(F, n)) for n in ("load_peft_weights", "get_layer_status", "get_model_status",
                                                   "prepare_model_for_kbit_training")]
    for theirs, mine in pairs:
        expected = list(inspect.signature(theirs).parameters)  # ours may add keyword arguments after PEFT's
        assert list(inspect.signature(mine).parameters)[: len(expected)] == expected, mine.__name__
    from peft.peft_model import TunerLayerStatus, TunerModelStatus

    for theirs, mine in ((TunerLayerStatus, F.TunerLayerStatus), (TunerModelStatus, F.TunerModelStatus)):
        assert [f.name for f in dataclasses.fields(theirs)] == [f.name for f in dataclasses.fields(mine)]


@pytest.mark.parametrize("method", METHODS)
def test_layer_and_model_status_match_peft(base, method):
    theirs, mine = two_adapters(base, method)
    for step in ("added", "set", "merged", "disabled"):
        if step == "set":
            for m in (theirs, mine):
                m.set_adapter("other")
        if step == "merged":
            for m in (theirs, mine):
                m.merge_adapter()
        if step == "disabled":
            for m in (theirs, mine):
                m.unmerge_adapter()
                m.base_model.disable_adapter_layers()
        theirs_layers, mine_layers = statuses(theirs), ours(mine)
        t, m = dataclasses.asdict(peft.get_model_status(theirs)), dataclasses.asdict(F.get_model_status(mine))
        same_layers(theirs_layers, mine_layers)
        assert t == m, step
        assert mine.get_model_status() == fourierft.get_model_status(mine) == F.get_model_status(mine)
        assert mine.get_layer_status() == fourierft.get_layer_status(mine)


@pytest.mark.parametrize("method", METHODS)
def test_status_of_an_injected_plain_model(base, method):
    models = []
    for lib in (peft, fourierft):
        torch.manual_seed(3)
        models.append(lib.inject_adapter_in_model(configs(lib, method), copy.deepcopy(base)))
    same_layers(statuses(models[0]), ours(models[1]))
    assert dataclasses.asdict(peft.get_model_status(models[0])) == dataclasses.asdict(F.get_model_status(models[1]))
    with pytest.raises(ValueError, match="No adapter layers"):
        F.get_layer_status(copy.deepcopy(base))


@pytest.mark.parametrize("method", METHODS)
def test_cast_adapter_dtype_matches_peft(base, method):
    theirs, mine = pair(base, method, dtype=torch.bfloat16)
    assert dtypes(theirs) == dtypes(mine)
    assert torch.bfloat16 in set(dtypes(mine).values())
    for fn, model in ((PF.cast_adapter_dtype, theirs), (F.cast_adapter_dtype, mine)):
        fn(model, "default", autocast_adapter_dtype=False)
    assert dtypes(theirs) == dtypes(mine)
    for fn, model in ((PF.cast_adapter_dtype, theirs), (F.cast_adapter_dtype, mine)):
        fn(model, "default")
    assert dtypes(theirs) == dtypes(mine)
    assert {v for k, v in dtypes(mine).items() if "default" in k} == {torch.float32}
    assert grads(theirs) == grads(mine)


@pytest.mark.parametrize("method", METHODS)
def test_set_requires_grad_and_set_adapter_match_peft(base, method):
    theirs, mine = two_adapters(base, method)
    for args in (("other", True), (["default", "other"], False), ("default", True)):
        PF.set_requires_grad(theirs, *args)
        F.set_requires_grad(mine, *args)
        assert grads(theirs) == grads(mine), args
    for args in (("other", True), (["default", "other"], False)):
        PF.set_adapter(theirs, *args)
        F.set_adapter(mine, *args)
        assert grads(theirs) == grads(mine), args
        same_layers(statuses(theirs), ours(mine))


@pytest.mark.parametrize("method", METHODS)
def test_set_training_matches_peft(base, method):
    """peft 0.22's ``set_training``: the named adapters' ``modules_to_save`` copies switch mode, others keep theirs."""
    theirs, mine = two_adapters(base, method)
    modes = {}
    for module, model in ((PF, theirs), (F, mine)):
        model.train()
        module.set_training(model, "default", training=False)
        first = {n: m.training for n, m in model.named_modules() if ".modules_to_save." in n + "."}
        module.set_training(model, ["default"], training=True)
        modes[module.__name__] = first, {n: m.training for n, m in model.named_modules() if ".modules_to_save." in n + "."}
    assert modes["peft.functional"] == modes["fourierft.functional"]
    first, second = modes["fourierft.functional"]
    assert not first["base_model.model.head.modules_to_save.default"] and all(second.values())


@pytest.mark.parametrize("method", METHODS)
def test_delete_adapter_matches_peft(base, method):
    theirs, mine = two_adapters(base, method)
    prefix = "fourierft_" if method == "fourierft" else "boft_"
    assert PF.delete_adapter(theirs, "default", prefix) == F.delete_adapter(mine, "default", prefix) == ["other"]
    same_layers(statuses(theirs), ours(mine))
    assert sorted(k for k in theirs.state_dict()) == sorted(k for k in mine.state_dict())
    assert list(theirs.peft_config) == list(mine.peft_config)  # the config is kept, as in PEFT
    mine.merge_adapter(["other"])
    with pytest.raises(ValueError, match="merged"):
        F.delete_adapter(mine, "other", prefix)


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_functions_match_peft(base, method):
    theirs, mine = pair(base, method)
    sd_t, sd_m = PF.get_peft_model_state_dict(theirs), F.get_peft_model_state_dict(mine)
    assert sd_t.keys() == sd_m.keys()
    for k in sd_t:
        torch.testing.assert_close(sd_t[k], sd_m[k])
    shifted = {k: v + 0.5 for k, v in sd_t.items()}
    PF.set_peft_model_state_dict(theirs, shifted)
    F.set_peft_model_state_dict(mine, shifted)
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), mine(x), rtol=1e-5, atol=1e-5)
    injected = F.inject_adapter_in_model(configs(fourierft, method), copy.deepcopy(base))
    assert F.get_layer_status(injected)[0].available_adapters == ["default"]


def test_load_peft_weights_matches_peft(base, tmp_path):
    theirs, _ = pair(base, "fourierft")
    theirs.save_pretrained(tmp_path)
    mapping = {r"^a\.": "renamed_a."}
    for kwargs in ({}, {"key_mapping": mapping}):
        t = peft.load_peft_weights(str(tmp_path), device="cpu", **kwargs)
        m = F.load_peft_weights(str(tmp_path), device="cpu", **kwargs)
        assert t.keys() == m.keys()
        assert all(torch.equal(t[k], m[k]) for k in t)
    assert any(k.startswith("base_model.model.renamed_a.") for k in m)
    with pytest.raises(FileNotFoundError):
        F.load_peft_weights(str(tmp_path / "nothing"), device="cpu")


def tiny_lm(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).to(dtype)


@pytest.mark.parametrize("kbit", [False, True])
def test_prepare_model_for_kbit_training_matches_peft(kbit):
    models = [tiny_lm(torch.bfloat16), tiny_lm(torch.bfloat16)]
    for fn, model in zip((peft.prepare_model_for_kbit_training, F.prepare_model_for_kbit_training), models):
        if kbit:  # what transformers sets when loading with bitsandbytes; selects the checkpointing branch
            model.is_loaded_in_8bit = True
        assert fn(model) is model
    theirs, mine = models
    assert dtypes(theirs) == dtypes(mine) and set(dtypes(mine).values()) == {torch.float32}
    assert grads(theirs) == grads(mine) and not any(grads(mine).values())
    assert theirs.is_gradient_checkpointing == mine.is_gradient_checkpointing == kbit
    ids = torch.tensor([[1, 2, 3]])
    embedded = [m.get_input_embeddings()(ids).requires_grad for m in models]
    assert embedded[1] == kbit  # ours: input gradients, so that reentrant checkpointing trains the adapters
    if int(transformers.__version__.split(".")[0]) >= 5:  # peft 0.22 leaves them off on transformers 4.45.2
        assert embedded[0] == kbit


def test_prepare_model_for_kbit_training_old_kwargs_name_as_peft(base):
    """peft 0.22 renamed ``gradient_checkpointing_kwargs`` to ``activation_checkpointing_kwargs``: the old name
    warns (FutureWarning) and giving both raises ValueError, in both libraries."""
    for module in (peft, F):
        with pytest.warns(FutureWarning, match="gradient_checkpointing_kwargs"):
            module.prepare_model_for_kbit_training(copy.deepcopy(base), gradient_checkpointing_kwargs={"a": 1})
        with pytest.raises(ValueError, match="activation_checkpointing_kwargs"):
            module.prepare_model_for_kbit_training(copy.deepcopy(base), activation_checkpointing_kwargs={"a": 1},
                                                   gradient_checkpointing_kwargs={"a": 1})
