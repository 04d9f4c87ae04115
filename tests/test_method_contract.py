"""The method contract: the checks every method must pass, run on both built-in methods and on a toy
third method registered from outside the package (``tests/toy_method.py``) with the documented API.

Shared checks: identity at init (where the method promises it), merged equals unmerged, save then load
reproduces the outputs (through the files and a fresh model), disabled gives the base output, only adapter
tensors train; plus registration itself, and hot-swapping the toy through its own optional hook.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import toy_method
from conftest import METHODS, MethodCase, assert_visible, build, make_inputs, model_output
from fourierft import (AdapterLayer, HotswapError, PeftConfig, PeftModel, get_peft_model, hotswap_adapter,
                       prepare_model_for_hotswap, register_method)
from fourierft.contract import DEFAULT_ADAPTER_LR, METHODS as REGISTERED, MethodLayer, MethodTuner
from fourierft.integrations.optim import resolve_adapter_lr

#: Built-in methods plus the toy, with the init setting that makes each the identity.
CASES = {**METHODS, "toyscale": MethodCase(toy_method.ToyScaleConfig, {"init_weights": False})}
IDENTITY = {"fourierft": {"init_weights": True}, "boft": {"init_weights": True}, "toyscale": {"init_weights": True}}
# BERT's output hardly moves with query/value alone (BOFT's effect there is 3e-5): a dense layer makes it visible
KINDS = {"mlp": ["lin0", "lin1"], "bert": ["query", "value", "dense"]}
MERGE_TOL = dict(atol=1e-4, rtol=1e-4)


def adapted(method: str, kind: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    config = CASES[method].config(target_modules=KINDS[kind], **kwargs)
    return get_peft_model(build(kind), config).eval()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", CASES)
def test_identity_at_init(method, kind):
    x = make_inputs(kind)
    with torch.no_grad():
        expected = model_output(build(kind), kind, x)
        model = adapted(method, kind, **IDENTITY[method])
        torch.testing.assert_close(model_output(model, kind, x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", CASES)
def test_merged_equals_unmerged_and_disabled_is_base(method, kind):
    x = make_inputs(kind)
    model = adapted(method, kind)
    with torch.no_grad():
        base = model_output(build(kind), kind, x)
        unmerged = model_output(model, kind, x)
        assert_visible(unmerged, base, **MERGE_TOL)  # a merge that does nothing cannot pass
        with model.disable_adapter():
            torch.testing.assert_close(model_output(model, kind, x), base)
        model.merge_adapter()
        torch.testing.assert_close(model_output(model, kind, x), unmerged, **MERGE_TOL)
        model.unmerge_adapter()
        torch.testing.assert_close(model_output(model, kind, x), unmerged, **MERGE_TOL)
        plain = model.merge_and_unload(safe_merge=True)
        assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
        torch.testing.assert_close(model_output(plain, kind, x), unmerged, **MERGE_TOL)


@pytest.mark.parametrize("method", CASES)
def test_save_then_load_reproduces_outputs(method, tmp_dir):
    x = make_inputs("mlp")
    model = adapted(method, "mlp", seed=3)
    with torch.no_grad():
        expected = model_output(model, "mlp", x)
    model.save_pretrained(tmp_dir)
    assert PeftConfig.from_pretrained(tmp_dir).peft_type == CASES[method].config_cls.PEFT_TYPE
    loaded = PeftModel.from_pretrained(build("mlp"), tmp_dir)
    assert type(loaded.peft_config["default"]) is CASES[method].config_cls
    with torch.no_grad():
        torch.testing.assert_close(model_output(loaded, "mlp", x), expected)


@pytest.mark.parametrize("method", CASES)
def test_only_adapter_tensors_train(method):
    model = adapted(method, "mlp").train()
    model_output(model, "mlp", make_inputs("mlp")).pow(2).mean().backward()
    adapter = {id(t) for t in model.base_model.adapter_tensors()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(id(p) in adapter for n, p in model.named_parameters() if n in trainable)
    prefix = model.base_model.prefix
    assert all(n.rsplit(".", 2)[-2].startswith(prefix) for n in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)


@pytest.mark.parametrize("method", CASES)
def test_classes_follow_the_contract(method):
    registered = REGISTERED[CASES[method].config_cls.PEFT_TYPE]
    layer = next(m for m in adapted(method, "mlp").modules() if isinstance(m, AdapterLayer))
    assert isinstance(layer, MethodLayer)
    assert isinstance(registered.tuner_cls, MethodTuner)
    assert registered.config_cls is CASES[method].config_cls


def _layer_classes(tuner_cls: type) -> set[type]:
    """Every adapter layer class of the method (the library's and the toy's, not classes tests make up): the
    ones whose adapter tensor names carry the tuner's prefix, which registration makes every layer use."""
    found, todo = {tuner_cls.layer_cls}, [AdapterLayer]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        names = cls.adapter_layer_names
        if names and all(n.startswith(tuner_cls.prefix) for n in names) and \
                (cls.__module__.startswith("fourierft.") or cls.__module__ == toy_method.__name__):
            found.add(cls)
    return found


def _accepts(impl, proto) -> bool:
    """Whether ``impl`` accepts every call that ``proto``'s signature allows the core to make."""
    args, kwargs = [], {}
    for param in list(inspect.signature(proto).parameters.values()):
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD) and param.default is param.empty:
            args.append(object())
        elif param.kind is param.KEYWORD_ONLY and param.default is param.empty:
            kwargs[param.name] = object()
    try:
        inspect.signature(impl).bind(*args, **kwargs)
    except TypeError:
        return False
    return True


def contract_violations(protocol: type, cls: type) -> list[str]:
    """Members of ``protocol`` that ``cls`` lacks, or whose signature rejects the calls the protocol allows."""
    methods = {n for n, v in vars(protocol).items()
               if not n.startswith("_") and (callable(v) or isinstance(v, (classmethod, staticmethod)))}
    problems = [f"{cls.__name__} lacks {name}" for name in sorted(set(protocol.__annotations__) | methods)
                if not hasattr(cls, name)]
    for name in sorted(methods):
        if hasattr(cls, name):
            proto, impl = inspect.getattr_static(protocol, name), inspect.getattr_static(cls, name)
            if not callable(getattr(cls, name)):
                problems.append(f"{cls.__name__}.{name} is not callable")
            elif isinstance(proto, classmethod) != isinstance(impl, classmethod) or \
                    isinstance(proto, staticmethod) != isinstance(impl, staticmethod):
                problems.append(f"{cls.__name__}.{name}: classmethod/staticmethod differs from the contract")
            elif not _accepts(getattr(cls, name), getattr(protocol, name)):
                problems.append(f"{cls.__name__}.{name}{inspect.signature(getattr(cls, name))} rejects the "
                                f"contract's call {name}{inspect.signature(getattr(protocol, name))}")
    return problems


@pytest.mark.parametrize("peft_type", sorted(REGISTERED))
def test_every_registered_method_satisfies_the_protocols(peft_type):
    """Each registered method's tuner and all of its layer classes have every member of the contract, with
    signatures that accept the calls the core makes (``runtime_checkable`` checks names only)."""
    tuner_cls = REGISTERED[peft_type].tuner_cls
    assert isinstance(tuner_cls, MethodTuner)
    problems = contract_violations(MethodTuner, tuner_cls)
    for layer_cls in _layer_classes(tuner_cls):
        problems += contract_violations(MethodLayer, layer_cls)
    assert not problems, problems


def test_the_protocol_check_sees_a_wrong_signature():
    class Broken(toy_method.ToyScaleLinear):
        def merged_weight(self, weight):  # the adapter name forgotten
            return weight

        @staticmethod
        def check_target(module, config, key):  # the contract's is a classmethod
            return None

    problems = contract_violations(MethodLayer, Broken)
    assert any("merged_weight" in p for p in problems) and any("check_target" in p for p in problems)
    assert not contract_violations(MethodLayer, toy_method.ToyScaleLinear)


def test_registration_feeds_every_registry():
    model = adapted("toyscale", "mlp")
    assert DEFAULT_ADAPTER_LR["TOYSCALE"] == 1e-2
    assert resolve_adapter_lr(model, None, fallback=1.0) == 1e-2
    config = PeftConfig.from_dict({"peft_type": "TOYSCALE", "target_modules": ["lin0"]})
    assert isinstance(config, toy_method.ToyScaleConfig)
    assert "toyscale_s" in type(model.base_model.model.lin0).adapter_layer_names


def test_bad_registrations_are_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_method("TOYSCALE", toy_method.ToyScaleConfig, type("Other", (toy_method.ToyScaleModel,), {}))

    class Unfinished(AdapterLayer):
        adapter_layer_names = ("half_s",)

    with pytest.raises(TypeError, match="does not implement"):
        register_method("HALF", type("HalfConfig", (toy_method.ToyScaleConfig,), {}),
                        type("HalfModel", (toy_method.AdapterModel,), {"prefix": "half_", "layer_cls": Unfinished,
                                                                       "target_types": (nn.Linear,)}))
    unprefixed = type("Unprefixed", (toy_method.ToyScaleLinear,), {"adapter_layer_names": ("scale",)})
    with pytest.raises(ValueError, match="must start with the prefix"):
        register_method("UNPREFIXED", type("UConfig", (toy_method.ToyScaleConfig,), {}),
                        type("UModel", (toy_method.AdapterModel,), {"prefix": "u_", "layer_cls": unprefixed,
                                                                    "target_types": (nn.Linear,)}))
    assert not {"HALF", "UNPREFIXED"} & set(REGISTERED)


def test_toy_method_hot_swaps_through_its_own_hook(tmp_dir):
    """The toy's ``hotswap_values`` (an optional hook, defined outside the package) decides the swap: a new
    adapter that targets only ``lin0`` makes ``lin1`` the identity (``s = 1``), which the default rule refuses."""
    from conftest import MLP

    model = adapted("toyscale", "mlp", seed=0)
    tensors = [p for _, p in model.named_parameters() if "toyscale_s" in _]
    torch.manual_seed(1)
    new = get_peft_model(MLP(), toy_method.ToyScaleConfig(target_modules=["lin0"], init_weights=False))
    new.save_pretrained(tmp_dir)
    x = make_inputs("mlp")
    expected = PeftModel.from_pretrained(build("mlp"), tmp_dir).eval()
    hotswap_adapter(model, tmp_dir)
    with torch.no_grad():
        torch.testing.assert_close(model_output(model, "mlp", x), model_output(expected, "mlp", x))
    assert tensors == [p for _, p in model.named_parameters() if "toyscale_s" in _]  # the same objects, in place
    torch.testing.assert_close(model.base_model.model.lin1.toyscale_s["default"].detach(), torch.ones(2))

    class NoIdentity(toy_method.ToyScaleLinear):  # without the hook: the default rule refuses an untargeted layer
        hotswap_values = AdapterLayer.hotswap_values

    model.base_model.model.lin1.__class__ = NoIdentity
    with pytest.raises(HotswapError, match="lin1: the new adapter has no tensors"):
        hotswap_adapter(model, tmp_dir)
    with pytest.raises(HotswapError, match="TOYSCALE adapters cannot be padded"):
        prepare_model_for_hotswap(model, target_n_frequency=10)
