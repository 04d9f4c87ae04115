"""One test per bug a reader of the code found (each failed on the code before its fix).

Bug 2 (``ops/butterfly``'s ``__all__``) is tested with the BOFT op; bug 8 (a square FourierFT embedding computed
transposed) by the property tests (``tests/test_properties.py::test_fourierft_embedding_equals_dense_definition``).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import fourierft
from fourierft import BOFTConfig, FourierFTConfig, PeftModel, get_peft_model
from fourierft.integrations import spectrum_lr
from fourierft.integrations.optim import adapter_param_groups
from fourierft.ops import spectral_op

SRC = Path(fourierft.__file__).parent


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(64, 64, 3, padding=1)
        self.lin = nn.Linear(64, 64)

    def forward(self, x):
        return self.lin(self.conv(x).mean((2, 3)))


# ---------------------------------------------------------------------------------------------- bug 1
def test_bug1_conv2d_spectrum_gets_the_per_width_learning_rate():
    """A 64-channel 3x3 conv at n=100, scaling 150: the rule's 0.02 * sqrt(2) * 64 * sqrt(576) / (150 * 10)."""
    torch.manual_seed(0)
    model = get_peft_model(ConvNet(), FourierFTConfig(target_modules=["conv", "lin"], n_frequency=100, scaling=150.0))
    expected = 0.02 * math.sqrt(2) * 64 * math.sqrt(64 * 9) / (150 * math.sqrt(100))
    conv_spectrum = model.base_model.model.conv.fourierft_spectrum["default"]
    groups = adapter_param_groups(model)
    (lr,) = [g["lr"] for g in groups if any(p is conv_spectrum for p in g["params"])]
    assert lr == pytest.approx(expected, rel=1e-9)
    assert lr == pytest.approx(0.029, abs=5e-4)
    # the too-small-rate warning names the conv layer too
    slow = {key for key, *_ in spectrum_lr.slow_spectra(model, lambda p: 1e-6)}
    assert any(key.startswith("base_model.model.conv ") for key in slow), slow
    assert any(key.startswith("base_model.model.lin ") for key in slow), slow


# ---------------------------------------------------------------------------------------------- bug 3
def _hooked_linear_model(d: int, n: int):
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(d, d)), FourierFTConfig(target_modules=["0"], n_frequency=n,
                                                                           init_weights=False))
    model.base_model.model[0].base_layer.register_forward_hook(lambda *a: None)  # the base cannot be fused
    return model.eval()


def test_bug3_dense_route_builds_dw_once_inside_cached_merged_weights(monkeypatch):
    """Without gradients, a layer whose base cannot be fused may take the "dense" route inside the scope
    because W + dW is counted as free there; it must then build dW once, not on every call."""
    model = _hooked_linear_model(256, 2000)
    builds = []
    real = spectral_op.delta_weight
    monkeypatch.setattr(spectral_op, "delta_weight", lambda *a, **k: builds.append(1) or real(*a, **k))
    x = torch.randn(1, 256)
    with torch.no_grad():
        reference = model(x)
        outside = len(builds)
        builds.clear()
        with fourierft.cached_merged_weights():
            routes = fourierft.explain_routes(model, x, grad=False)
            outs = [model(x) for _ in range(10)]
    assert {r.route for r in routes} <= {"dense", "spectral"}
    if routes[0].route == "dense":
        assert len(builds) == 1, f"dW built {len(builds)} times for 11 forwards inside one scope"
    else:  # the rule no longer counts a build it does not amortise as free
        assert builds == []
    for out in outs:
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert outside <= 1


def test_bug3_dense_route_rebuilds_after_an_in_place_update():
    model = _hooked_linear_model(64, 500)
    spectrum = model.base_model.model[0].fourierft_spectrum["default"]
    x = torch.randn(3, 64)
    with torch.no_grad(), fourierft.cached_merged_weights(), spectral_route_forced("dense"):
        before = model(x)
        spectrum.mul_(2)
        after = model(x)
        base = model.base_model.model[0].base_layer(x)
    torch.testing.assert_close(after - base, 2 * (before - base), rtol=1e-4, atol=1e-5)


def spectral_route_forced(route):
    from fourierft.ops.spectral_routes import _force_route

    return _force_route(route)


# ---------------------------------------------------------------------------------------------- bug 4
class Renamed(nn.Module):
    """The MLP with its layers renamed (``lin0`` -> ``first``, ``lin1`` -> ``second``)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.relu, self.second = nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2)

    def forward(self, x):
        return self.second(self.relu(self.first(x)))


def _saved_mlp(tmp_path):
    from conftest import MLP

    torch.manual_seed(0)
    model = get_peft_model(MLP(), FourierFTConfig(target_modules=["lin0", "lin1"], n_frequency=6, init_weights=False))
    model.save_pretrained(tmp_path)
    return model


def _renamed_base(trained):
    base = Renamed()
    mlp = trained.get_base_model()
    with torch.no_grad():
        for new, old in (("first", "lin0"), ("second", "lin1")):
            getattr(base, new).weight.copy_(getattr(mlp, old).get_base_layer().weight)
            getattr(base, new).bias.copy_(getattr(mlp, old).get_base_layer().bias)
    return base


def _renamed_config(tmp_path):
    config = fourierft.PeftConfig.from_pretrained(str(tmp_path))
    config.target_modules = ["first", "second"]
    return config


def test_bug4_from_pretrained_and_load_adapter_apply_key_mapping(tmp_path):
    trained = _saved_mlp(tmp_path)
    x = torch.randn(4, 10)
    expected = trained(x)
    mapping = {r"^lin0\.": "first.", r"^lin1\.": "second."}
    loaded = PeftModel.from_pretrained(_renamed_base(trained), str(tmp_path), config=_renamed_config(tmp_path),
                                       key_mapping=mapping)
    torch.testing.assert_close(loaded(x), expected)
    loaded.load_adapter(str(tmp_path), "again", config=_renamed_config(tmp_path), key_mapping=mapping)
    loaded.set_adapter("again")
    torch.testing.assert_close(loaded(x), expected)


def test_bug4_ephemeral_gpu_offload_is_not_ignored_silently(tmp_path):
    from conftest import MLP

    _saved_mlp(tmp_path)
    with pytest.warns(UserWarning, match="ephemeral_gpu_offload"):
        model = PeftModel.from_pretrained(MLP(), str(tmp_path), ephemeral_gpu_offload=True)
    with pytest.warns(UserWarning, match="ephemeral_gpu_offload"):
        model.load_adapter(str(tmp_path), "other", ephemeral_gpu_offload=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.load_adapter(str(tmp_path), "third")


# ---------------------------------------------------------------------------------------------- bug 5
def test_bug5_boft_block_size_and_num_both_given_raises_as_peft_does():
    import peft

    with pytest.raises(ValueError):
        peft.BOFTConfig(boft_block_size=4, boft_block_num=8)
    with pytest.raises(ValueError, match="boft_block_size or boft_block_num"):
        BOFTConfig(boft_block_size=4, boft_block_num=8)
    with pytest.raises(ValueError):
        BOFTConfig(boft_block_size=2, boft_block_num=8)
    config = BOFTConfig(boft_block_num=8)  # only the number: still accepted here
    assert (config.boft_block_size, config.boft_block_num) == (0, 8)
    assert BOFTConfig.from_dict(config.to_dict()).boft_block_num == 8
    assert BOFTConfig(boft_block_size=4).boft_block_size == 4


# ---------------------------------------------------------------------------------------------- bug 6
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bug6_conv2d_does_not_round_dw_into_a_half_precision_weight(dtype):
    """A dW below the weight's half-precision resolution must still change the output."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    with torch.no_grad():  # entries +-1, where half precision cannot hold a change below 2**-11 ...
        conv.weight.fill_(1.0)
        conv.weight[:, 1::2] = -1.0  # ... and channel pairs that cancel: the base output is exactly 0 on ones
    model = get_peft_model(nn.Sequential(conv.to(dtype)),
                           FourierFTConfig(target_modules=["0"], n_frequency=20, scaling=1e-3, init_weights=False))
    layer = model.base_model.model[0]
    x = torch.ones(2, 4, 5, 5, dtype=dtype)
    with torch.no_grad():
        out = model(x).float()
        base = layer.base_layer(x).float()
        delta = layer.get_delta_weight("default").float().reshape(conv.weight.shape)
        expected = torch.nn.functional.conv2d(x.float(), delta, padding=1)
    assert expected.abs().max() > 0 and base.abs().max() == 0
    assert delta.abs().max() < 2**-12  # far below what W + dW can hold in half precision
    torch.testing.assert_close(out - base, expected, rtol=0.05, atol=2e-2 * float(expected.abs().max()))


# ---------------------------------------------------------------------------------------------- bug 7
def test_bug7_fourierft_config_refuses_another_methods_bias_option():
    with pytest.raises(ValueError, match="boft_only"):
        FourierFTConfig(bias="boft_only")
    with pytest.raises(ValueError, match="fourierft_only"):
        BOFTConfig(bias="fourierft_only")
    for bias in ("none", "all", "fourier_only", "fourierft_only"):  # PEFT's spelling and the type string's
        assert FourierFTConfig(bias=bias).bias == bias
    assert BOFTConfig(bias="boft_only").bias == "boft_only"


# ---------------------------------------------------------------------------------------------- bug 9
def test_bug9_no_stale_or_dead_text():
    state_dict = (SRC / "serialization" / "state_dict.py").read_text()
    assert "never adapt embeddings" not in state_dict
    assert not _identical_ternaries(state_dict)


def test_bug9_trainer_docstrings_count_the_hooks_and_keep_args_whole():
    trainer = (SRC / "integrations" / "trainer.py").read_text()
    import ast
    import re

    import transformers

    methods = {node.name for cls in ast.walk(ast.parse(trainer)) if isinstance(cls, ast.ClassDef)
               for node in cls.body if isinstance(node, ast.FunctionDef)}
    hooks = sorted(name for name in methods if not name.startswith("__") and hasattr(transformers.Trainer, name))
    words = {4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
    claim = re.search(r"overrides (\w+) of Trainer's", trainer)
    assert claim is None or claim.group(1) == words.get(len(hooks), str(len(hooks))), (claim.group(1), hooks)
    assert _args_blocks_unbroken(trainer)


def test_bug9_no_layer_registry_shared_with_subclasses():
    """``extra_layer_classes`` was a mutable class dict: a subclass's ``register_layer`` wrote into its parent's.
    Now ``layer_classes`` is a tuple a registering subclass copies, and ``layer_class_for`` is the core's one
    lookup (no method overrides it)."""
    from fourierft.methods.boft import BOFTModel
    from fourierft.methods.fourierft import FourierFTModel
    from fourierft.tuner import AdapterModel

    class Marker(nn.Module):
        pass

    class Sub(FourierFTModel):
        pass

    before = (FourierFTModel.layer_classes, FourierFTModel.target_types)
    Sub.register_layer(Marker, fourierft.FourierFTEmbedding)
    assert Sub.layer_class_for(Marker()) is fourierft.FourierFTEmbedding
    assert (FourierFTModel.layer_classes, FourierFTModel.target_types) == before  # the parent is untouched
    assert FourierFTModel.layer_class_for(Marker()) is fourierft.FourierFTLinear
    for tuner, base, layer_class in ((FourierFTModel, nn.Conv2d(2, 2, 1), fourierft.FourierFTConv2d),
                                     (FourierFTModel, nn.Embedding(3, 2), fourierft.FourierFTEmbedding),
                                     (FourierFTModel, nn.Linear(2, 2), fourierft.FourierFTLinear),
                                     (BOFTModel, nn.Conv2d(4, 4, 1), fourierft.BOFTConv2d),
                                     (BOFTModel, nn.Linear(4, 4), fourierft.BOFTLinear)):
        assert tuner.layer_class_for(base) is layer_class
        assert isinstance(base, tuner.target_types)
        assert "layer_class_for" not in vars(tuner)  # one mechanism: the declared pairs
    assert isinstance(AdapterModel.layer_classes, tuple)


def _identical_ternaries(source: str) -> list[str]:
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.IfExp) and ast.dump(node.body) == ast.dump(node.orelse):
            found.append(ast.unparse(node))
    return found


def _args_blocks_unbroken(source: str) -> bool:
    """No docstring's ``Args:`` block is split: after a plain paragraph at the section's own indentation,
    no more argument entries follow before the next section header."""
    import ast
    import re

    entry = re.compile(r"\*{0,2}\w+( \(.*\))?: ")
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            continue
        lines = (ast.get_docstring(node, clean=True) or "").splitlines()
        for i, line in enumerate(lines):
            if line.strip() != "Args:":
                continue
            indent, interrupted = len(line) - len(line.lstrip()), False
            for rest in lines[i + 1:]:
                if not rest.strip():
                    continue
                level = len(rest) - len(rest.lstrip())
                if level <= indent and re.fullmatch(r"\s*[A-Z]\w*( \w+)?::?", rest):
                    break  # the next section
                if level <= indent:
                    interrupted = True
                elif interrupted and level == indent + 4 and entry.match(rest.strip()):
                    return False
    return True


# ---------------------------------------------------------------------------------------------- one owner each
def test_one_rule_for_the_active_adapter_after_delete():
    """Model, layers and ``modules_to_save`` wrappers follow one rule (``fourierft.layer.next_active``, PEFT's):
    the remaining adapter whose name sorts first, not the first created. Checked at the model level and through
    the functional ``delete_adapter`` (layers on their own, as diffusers components use it) against peft."""
    import peft
    import peft.functional

    import fourierft.functional
    from conftest import MLP

    def build(lib):
        torch.manual_seed(0)
        config = lambda: lib.FourierFTConfig(target_modules=["lin0"], n_frequency=4, modules_to_save=["lin1"])  # noqa: E731
        model = lib.get_peft_model(MLP(), config(), adapter_name="zeta")
        model.add_adapter("beta", config())
        model.add_adapter("alpha", config())
        return model

    ours, theirs = build(fourierft), build(peft)
    for model in (ours, theirs):
        model.delete_adapter("zeta")
    assert ours.active_adapters == theirs.active_adapters == ["alpha"]
    assert ours.base_model.model.lin0.active_adapters == ["alpha"]
    assert ours.base_model.model.lin1.active_adapter == "alpha"

    ours, theirs = build(fourierft), build(peft)
    got = fourierft.functional.delete_adapter(ours.base_model.model, "zeta", prefix="fourierft_")
    want = peft.functional.delete_adapter(theirs.base_model.model, "zeta", prefix="fourierft_")
    assert got == want == ["alpha"]
    assert ours.base_model.model.lin0.active_adapters == theirs.base_model.model.lin0.active_adapters
    assert ours.base_model.model.lin1.active_adapter == "alpha"
