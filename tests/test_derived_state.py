"""Derived state (plans) lives with the layers that use it: no global cache outlives the models.

Plans (FourierFT positions and gather/scatter tensors, BOFT butterfly gathers) are shared by the live
layers of one shape through weak references; deleting the models frees them. Mixed-batch index tensors
live as long as the ``mixed_batch`` context. Plans never enter a state dict or a file, follow the
adapter's device, and keep their dtype when the model is cast.
"""

from __future__ import annotations

import gc

import pytest
import torch

from conftest import METHODS, build, make_inputs, method_config
from fourierft import get_peft_model
from fourierft.methods import boft as boft_method
from fourierft.methods import fourierft as fourierft_method

REGISTRIES = {"positions": fourierft_method._POSITIONS, "fourierft plans": fourierft_method._PLANS,
              "boft plans": boft_method._PLANS}


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def sizes() -> dict[str, int]:
    gc.collect()
    return {name: len(registry) for name, registry in REGISTRIES.items()}


def make_and_run(method: str, i: int) -> None:
    """A model with two adapters of a geometry / seed no other model uses, run plain and mixed."""
    kwargs = {"random_loc_seed": 1000 + i} if method == "fourierft" else {"boft_n_butterfly_factor": 1 + i % 2,
                                                                         "target_modules": ["lin1"]}
    model = get_peft_model(build("mlp"), method_config(method, **kwargs))
    model.add_adapter("other", method_config(method, **kwargs))
    x = make_inputs("mlp")["X"]
    model(x).sum().backward()
    with torch.no_grad():
        model(X=x[:4], adapter_names=["default", "other", "__base__", "default"])
        model.merge_adapter()
        model.unmerge_adapter()


@pytest.mark.parametrize("method", METHODS)
def test_creating_and_deleting_models_does_not_grow_memory(method):
    make_and_run(method, 0)  # warm up whatever torch caches on first use
    before_tensors, before_sizes = live_tensors(), sizes()
    for i in range(1, 25):
        make_and_run(method, i)
    assert sizes() == before_sizes
    assert live_tensors() <= before_tensors


@pytest.mark.parametrize("method", METHODS)
def test_plans_are_shared_while_models_live(method):
    before = sizes()
    kwargs = {"random_loc_seed": 4242} if method == "fourierft" else {"boft_n_butterfly_factor": 2,
                                                                      "target_modules": ["lin1"]}
    models = [get_peft_model(build("mlp"), method_config(method, **kwargs)) for _ in range(3)]
    grown = {k: v - before[k] for k, v in sizes().items()}
    per_layer_shape = 2 if method == "fourierft" else 1  # lin0 and lin1 differ; BOFT adapts lin1 only
    assert sum(grown.values()) == (2 * per_layer_shape if method == "fourierft" else 1)
    layers = [m.base_model.model.lin1 for m in models]
    assert len({id(layer.plan("default")) for layer in layers}) == 1
    del models, layers
    assert sizes() == before


def plan_tensors(plan) -> list[torch.Tensor]:
    """Every tensor a plan holds, through nested plan objects and sequences."""
    if isinstance(plan, torch.Tensor):
        return [plan]
    if isinstance(plan, (list, tuple)):
        return [t for item in plan for t in plan_tensors(item)]
    if hasattr(plan, "__dict__") and not isinstance(plan, type):
        return [t for value in vars(plan).values() for t in plan_tensors(value)]
    return []


@pytest.mark.parametrize("method", METHODS)
def test_plans_are_not_in_the_state_dict_and_keep_their_dtype(method):
    model = get_peft_model(build("mlp"), method_config(method))
    keys = set(model.state_dict())
    layer = model.base_model.model.lin1
    plan = layer.plan("default")
    tensors = [t for t in plan_tensors(plan) if t.numel()]
    saved = {v.untyped_storage().data_ptr() for v in model.state_dict().values() if v.numel()}
    # by storage: state_dict() hands out new tensor objects (detached views), never the plan's own
    assert tensors
    assert not {t.untyped_storage().data_ptr() for t in tensors} & saved, "plan tensors are in the state dict"
    model.to(torch.float64)
    assert set(model.state_dict()) == keys
    assert layer.plan("default") is plan  # same device: nothing rebuilt, dtypes untouched


def test_the_memory_check_sees_a_global_cache(monkeypatch):
    """The measure above is not blind: a strong (PEFT-style global) cache makes the tensor count grow."""
    monkeypatch.setattr(fourierft_method._PLANS, "_plans", {})
    make_and_run("fourierft", 0)
    before = live_tensors()
    for i in range(1, 6):
        make_and_run("fourierft", i)
    assert live_tensors() > before


@pytest.mark.parametrize("method", METHODS)
def test_moving_the_model_builds_the_plans_at_once(method):
    """``PeftModel.to`` (and ``cuda``/``cpu``) builds the plans for the new device eagerly, outside any trace."""
    model = get_peft_model(build("mlp"), method_config(method))
    layer = model.base_model.model.lin1
    layer._plans.clear()
    assert model.to(torch.device("cpu")) is model
    assert set(layer._plans) == {"default"}
    layer._plans.clear()
    model.cpu()
    assert set(layer._plans) == {"default"}
