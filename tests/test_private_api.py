"""Private names of torch and transformers this library relies on, each where no public way exists.

Every test here fails with a message naming the private API when an upgrade renames or changes it, so
that the breakage shows up here rather than as a silent change of behaviour elsewhere. The source
comments at each use say why the private name is needed.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn
from torch.nn.modules import module as module_registry

from conftest import build, method_config
from fourierft import cached_merged_weights, get_peft_model


@pytest.mark.parametrize("name", ["_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                                  "_global_backward_pre_hooks"])
def test_global_hook_dicts(name):
    """``layer.py::has_hooks``: the fused node must not skip a globally hooked base layer."""
    assert isinstance(getattr(module_registry, name, None), dict), f"torch.nn.modules.module.{name} changed"


def test_global_forward_hook_lands_in_the_dict_we_read():
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert module_registry._global_forward_hooks, "register_module_forward_hook no longer fills _global_forward_hooks"
    finally:
        handle.remove()


def test_module_hook_dicts():
    layer = nn.Linear(2, 2)
    for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
        assert isinstance(getattr(layer, name, None), dict), f"nn.Module.{name} changed"
    handle = layer.register_forward_hook(lambda *a: None)
    assert layer._forward_hooks, "register_forward_hook no longer fills Module._forward_hooks"
    handle.remove()


def test_fused_path_sees_hooks_through_these_names():
    from fourierft.layer import has_hooks

    layer = nn.Linear(2, 2)
    assert not has_hooks(layer)
    handle = nn.modules.module.register_module_forward_pre_hook(lambda *a: None)
    try:
        assert has_hooks(layer)
    finally:
        handle.remove()


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_conv_forward(padding_mode):
    """``methods/boft.py::BOFTConv2d``: the base convolution, all its settings, on a rotated weight."""
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2, dilation=1, padding_mode=padding_mode)
    assert list(inspect.signature(conv._conv_forward).parameters) == ["input", "weight", "bias"], \
        "nn.Conv2d._conv_forward(input, weight, bias) changed"
    x = torch.randn(1, 3, 7, 7)
    torch.testing.assert_close(conv._conv_forward(x, conv.weight, conv.bias), conv(x))


def test_tensor_version_counter():
    """``ops/scope.py::scope_key``: inside ``cached_merged_weights`` a derived weight is rebuilt when its
    parameter changes in place."""
    r = torch.zeros(3)
    before = r._version
    r.add_(1)
    assert isinstance(before, int) and r._version > before, "Tensor._version no longer counts in-place changes"


def test_boft_scope_follows_in_place_changes():
    torch.manual_seed(0)
    model = get_peft_model(build("mlp"), method_config("boft")).eval()
    x = torch.randn(3, 10)
    with torch.no_grad(), cached_merged_weights():
        first = model(x)
        model.base_model.model.lin1.boft_R["default"].mul_(2)  # an optimizer step would do the same
        assert not torch.equal(model(x), first)


def test_compiled_module_handle():
    """``get_peft_model_state_dict(unwrap_compiled=True)`` and the Trainer unwrap ``torch.compile``'s wrapper."""
    layer = nn.Linear(2, 2)
    assert torch.compile(layer)._orig_mod is layer, "torch.compile's wrapper no longer exposes _orig_mod"


@pytest.mark.parametrize("name,params", [
    ("_save", ["self", "output_dir", "state_dict"]),
    ("_load_from_checkpoint", ["self", "resume_from_checkpoint", "model"]),
    ("_load_best_model", ["self"]),
])
def test_trainer_methods_we_override(name, params):
    """``integrations/trainer.py::AdapterTrainer``: Trainer's checkpoint hooks."""
    from transformers import Trainer

    method = getattr(Trainer, name, None)
    assert method is not None, f"transformers.Trainer.{name} is gone: AdapterTrainer's override would never run"
    assert list(inspect.signature(method).parameters) == params, f"transformers.Trainer.{name} changed arguments"


def test_transformers_reads_the_peft_flag():
    """``PeftModel._hf_peft_config_loaded``: how transformers learns that adapters are attached."""
    import transformers.modeling_utils
    import transformers.trainer_utils

    sources = inspect.getsource(transformers.trainer_utils) + inspect.getsource(transformers.modeling_utils)
    assert "_hf_peft_config_loaded" in sources, "transformers no longer reads _hf_peft_config_loaded"


def test_bitsandbytes_cpu_layout_inverse():
    """fourierft.quantized undoes bitsandbytes' CPU-inference 4-bit repacking (no backward) with this private
    inverse; there is no public one. Its behaviour is covered in test_quantized.py (training after eval)."""
    functional = pytest.importorskip("bitsandbytes.functional")
    inverse = getattr(functional, "_convert_weight_packed_for_cpu_inverse", None)
    assert inverse is not None, "bitsandbytes.functional._convert_weight_packed_for_cpu_inverse is gone"
    assert list(inspect.signature(inverse).parameters)[:2] == ["packed_weight", "quant_state"]


def test_fake_mode_detection_and_mode_suspension():
    """``ops/_placement.py``: frequency entries and butterfly permutations are computed with every dispatch mode
    suspended (``_disable_current_modes``) and placed as fake tensors of the mode ``detect_fake_mode`` finds."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.utils._python_dispatch import _disable_current_modes

    assert detect_fake_mode() is None, "torch._guards.detect_fake_mode sees a mode outside any"
    with FakeTensorMode() as mode:
        assert detect_fake_mode() is mode, "torch._guards.detect_fake_mode no longer finds the active FakeTensorMode"
        with _disable_current_modes():
            real = torch.arange(3)
        assert type(real) is torch.Tensor and real.tolist() == [0, 1, 2], "_disable_current_modes no longer suspends"
        assert isinstance(torch.arange(3), FakeTensor)
