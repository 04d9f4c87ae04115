"""convert_to_lora / save_as_lora against the dense definition of dW and against peft 0.22's own conversion.

The oracle for "same B @ A as peft" is ``peft.convert_to_lora`` run on the same adapter file loaded into peft;
the oracle for "peft loads it as LoRA" is ``peft.PeftModel.from_pretrained`` and the outputs of the result.
"""

from __future__ import annotations

import copy
import math
import os
import warnings

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import fourierft
from fourierft.lora_conversion import ConversionResult, LayerConversion, delta_operator
from fourierft.ops import lowrank, spectral


class Net(nn.Module):
    """Linear layers of odd, non-square shapes, and a head kept in modules_to_save."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(40, 56)
        self.b = nn.Linear(56, 40)
        self.head = nn.Linear(40, 3)

    def forward(self, x):
        return self.head(self.b(torch.tanh(self.a(x))))


class Mixed(nn.Module):
    """A Conv1D (GPT-2's layer), a Conv2d with a non-square kernel and an Embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 12)
        self.proj = Conv1D(24, 12)  # weight (12, 24): in 12, out 24
        self.conv = nn.Conv2d(3, 6, (3, 2), padding=1, dilation=(1, 2))

    def forward(self, ids, img):
        return self.proj(self.emb(ids)), self.conv(img)


def _fourierft(model_cls=Net, **kw):
    torch.manual_seed(0)
    base = model_cls()
    kw.setdefault("target_modules", ["a", "b"])
    kw.setdefault("n_frequency", 300)
    model = fourierft.get_peft_model(copy.deepcopy(base), fourierft.FourierFTConfig(**kw))
    return base, model


def _boft(model_cls=Net, **kw):
    torch.manual_seed(0)
    base = model_cls()
    kw.setdefault("target_modules", ["a", "b"])
    kw.setdefault("boft_block_size", 4)
    model = fourierft.get_peft_model(copy.deepcopy(base), fourierft.BOFTConfig(init_weights=False, **kw))
    return base, model


def _products(state_dict: dict) -> dict[str, torch.Tensor]:
    """``module name -> B @ A`` from a LoRA state dict (Linear keys)."""
    names = {k.rsplit(".lora_A.weight", 1)[0] for k in state_dict if k.endswith(".lora_A.weight")}
    return {n: state_dict[f"{n}.lora_B.weight"].float() @ state_dict[f"{n}.lora_A.weight"].float() for n in names}


def _peft_conversion(base, model, tmp_path, rank):
    model.save_pretrained(str(tmp_path / "src"))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "src"))
    return peft.convert_to_lora(theirs, rank)


def _separated_rank(model, near: int) -> int:
    """A rank close to ``near`` where every layer's spectrum has a gap (FourierFT's singular values come in
    equal pairs, so a rank that splits a pair has no unique B @ A)."""
    spectra = [torch.linalg.svdvals(delta_operator(m, "default").dense().double())
               for m in model.modules() if isinstance(m, fourierft.AdapterLayer)]
    for r in sorted(range(2, 30), key=lambda r: abs(r - near)):
        if all(s[r - 1] - s[r] > 1e-3 * s[0] for s in spectra):
            return r
    raise AssertionError("no separated rank")


# ---------------------------------------------------------------- operators
@pytest.mark.parametrize("d_out,d_in,n", [(37, 50, 200), (64, 31, 1000), (17, 17, 289)])
def test_spectral_operator_matches_the_dense_definition(d_out, d_in, n):
    pos = spectral.frequency_indices(d_out, d_in, n, 3)
    c = torch.randn(n, dtype=torch.float64)
    op = lowrank.SpectralDelta(pos[0].long(), pos[1].long(), c, 7.5, d_out, d_in)
    j, k = torch.arange(d_out, dtype=torch.float64)[:, None, None], torch.arange(d_in, dtype=torch.float64)[None, :, None]
    phase = 2 * math.pi * (pos[0].double() * j / d_out + pos[1].double() * k / d_in)
    dense = 7.5 / (d_out * d_in) * (c * torch.cos(phase)).sum(-1)  # DESIGN.md section 3, element-wise
    x, y = torch.randn(d_in, 4, dtype=torch.float64), torch.randn(d_out, 3, dtype=torch.float64)
    torch.testing.assert_close(op.matmul(x), dense @ x)
    torch.testing.assert_close(op.rmatmul(y), dense.T @ y)
    assert op.frobenius_sq() == pytest.approx(float(dense.square().sum()), rel=1e-10)


def test_layer_operators_equal_each_methods_own_delta():
    _, ft = _fourierft()
    _, bo = _boft(boft_n_butterfly_factor=2)
    for model in (ft, bo):
        for layer in (model.base_model.model.a, model.base_model.model.b):
            weight = layer.get_base_layer().weight.data
            merged = layer.merged_weight("default", weight.double()) - weight.double()
            torch.testing.assert_close(delta_operator(layer, "default").dense().double(), merged,
                                       atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- parity with peft (Linear, both methods)
@pytest.mark.parametrize("method", ["fourierft", "boft"])
def test_same_factors_as_peft_convert_to_lora(method, tmp_path):
    base, model = _fourierft() if method == "fourierft" else _boft()
    rank = _separated_rank(model, 12)
    their_config, theirs = _peft_conversion(base, model, tmp_path, rank)
    config, ours = fourierft.convert_to_lora(model, rank)
    assert sorted(ours) == sorted(theirs)
    for name, product in _products(theirs).items():
        torch.testing.assert_close(_products(ours)[name], product, atol=2e-5, rtol=1e-4)
    assert config.r == their_config.r == rank and config.lora_alpha == their_config.lora_alpha == rank
    assert set(config.target_modules) == set(their_config.target_modules)


@pytest.mark.parametrize("method", ["fourierft", "boft"])
def test_energy_threshold_picks_peft_ranks(method, tmp_path):
    base, model = _fourierft() if method == "fourierft" else _boft()
    their_config, theirs = _peft_conversion(base, model, tmp_path, 0.6)
    config, ours = result = fourierft.convert_to_lora(model, 0.6)
    assert config.rank_pattern == their_config.rank_pattern and config.alpha_pattern == their_config.alpha_pattern
    assert all(row.energy_kept >= 0.6 for row in result.report)
    for name, product in _products(theirs).items():
        torch.testing.assert_close(_products(ours)[name], product, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------- peft loads the result
def _assert_peft_loads(base, model, tmp_path, inputs, rank, lora_types):
    report = fourierft.save_as_lora(str(tmp_path / "lora"), model, rank)
    assert all(isinstance(row, LayerConversion) for row in report)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora"))
    assert isinstance(loaded.base_model, peft.LoraModel)
    kinds = {type(m).__name__ for m in loaded.modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert kinds == lora_types
    with torch.no_grad():
        ours, theirs = model(*inputs), loaded(*inputs)
        plain = base(*inputs)
    effect = 0.0
    for o, t, p in zip(*(x if isinstance(x, tuple) else (x,) for x in (ours, theirs, plain))):
        torch.testing.assert_close(t, o, atol=1e-4, rtol=1e-4)  # full rank: exact
        effect = max(effect, float((o - p).abs().max()))
    assert effect > 1e-2  # the adapter does something the check can see


def test_peft_loads_linear_with_modules_to_save(tmp_path):
    base, model = _fourierft(modules_to_save=["head"])
    with torch.no_grad():
        model.base_model.model.head.modules_to_save["default"].weight.add_(0.5)
    _assert_peft_loads(base, model, tmp_path, (torch.randn(4, 40),), 40, {"Linear"})


@pytest.mark.parametrize("method", ["fourierft", "boft"])
def test_peft_loads_conv2d(method, tmp_path):
    make = _fourierft if method == "fourierft" else _boft
    kw = {"n_frequency": 60} if method == "fourierft" else {"boft_block_size": 3}
    base, model = make(Mixed, target_modules=["conv"], **kw)
    inputs = (torch.randint(0, 50, (2, 5)), torch.randn(2, 3, 9, 8))
    _assert_peft_loads(base, model, tmp_path, inputs, 6, {"Conv2d"})


def test_peft_loads_conv1d_and_embedding(tmp_path):
    base, model = _fourierft(Mixed, target_modules=["proj", "emb"], n_frequency=100)
    inputs = (torch.randint(0, 50, (2, 5)), torch.randn(2, 3, 9, 8))
    _assert_peft_loads(base, model, tmp_path, inputs, 12, {"Linear", "Embedding"})
    config = peft.PeftConfig.from_pretrained(str(tmp_path / "lora"))
    assert config.fan_in_fan_out is True


def test_peft_loads_a_regex_target_as_rank_pattern(tmp_path):
    base, model = _boft(target_modules=r".*\.?[ab]$")
    config, _ = fourierft.convert_to_lora(model, 40)
    assert config.target_modules == r".*\.?[ab]$" and config.rank_pattern == {"a": 40, "b": 40}
    _assert_peft_loads(base, model, tmp_path, (torch.randn(4, 40),), 40, {"Linear"})


# ---------------------------------------------------------------- accuracy of the fast route, the report
@pytest.mark.parametrize("method", ["fourierft", "boft"])
@pytest.mark.parametrize("rank", [8, 32, 128])
def test_randomized_error_within_one_percent_of_exact(method, rank):
    torch.manual_seed(1)
    lin = nn.Sequential(nn.Linear(768, 512))
    config = (fourierft.FourierFTConfig(target_modules=["0"], n_frequency=1000) if method == "fourierft"
              else fourierft.BOFTConfig(target_modules=["0"], boft_block_size=32, init_weights=False))
    model = fourierft.get_peft_model(lin, config)
    fast = fourierft.convert_to_lora(model, rank, svd="randomized", min_energy=0).report[0]
    exact = fourierft.convert_to_lora(model, rank, svd="exact", min_energy=0).report[0]
    assert (fast.svd, exact.svd) == ("randomized", "exact")
    assert exact.relative_error <= fast.relative_error <= 1.01 * exact.relative_error


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_report_error_is_the_true_error(svd):
    _, model = _fourierft(n_frequency=500)
    result = fourierft.convert_to_lora(model, 6, svd=svd, min_energy=0)
    assert isinstance(result, ConversionResult) and len(result) == 2
    products = _products(result[1])
    for row in result.report:
        dense = delta_operator(model.get_submodule(row.name), "default").dense()
        true = float((dense - products[row.name]).norm() / dense.norm())
        assert row.relative_error == pytest.approx(true, rel=1e-3)
        assert row.energy_kept == pytest.approx(1 - true ** 2, rel=1e-3) and row.rank == 6


def test_low_energy_layers_warn():
    _, model = _fourierft()
    with pytest.warns(UserWarning, match="keep less than 50%"):
        fourierft.convert_to_lora(model, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fourierft.convert_to_lora(model, 2, min_energy=0.0)


def test_compile_kwargs_give_the_same_factors():
    _, model = _boft()
    _, plain = fourierft.convert_to_lora(model, 8)
    _, compiled = fourierft.convert_to_lora(model, 8, compile_kwargs={"backend": "eager"})
    for key in plain:
        torch.testing.assert_close(compiled[key], plain[key])


# ---------------------------------------------------------------- refusals
def test_merged_adapter_is_refused_and_nothing_written(tmp_path):
    _, model = _fourierft()
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        fourierft.save_as_lora(str(tmp_path / "out"), model, 4)
    assert not os.path.exists(tmp_path / "out" / "adapter_model.safetensors")
    model.unmerge_adapter()
    assert fourierft.convert_to_lora(model, 4)[1]


@pytest.mark.parametrize("rank,error,match", [
    (0, ValueError, "positive"), (1.5, ValueError, "between 0 and 1"), (0.0, ValueError, "between 0 and 1"),
    (41, ValueError, "larger than the weight shape"), ("8", TypeError, "int or a float"),
    ((0.5, "randomized"), ValueError, "needs the exact SVD"), ((8, "fast"), ValueError, "svd must be one of"),
])
def test_bad_ranks_are_refused(rank, error, match):
    _, model = _boft()
    rank, svd = rank if isinstance(rank, tuple) else (rank, "auto")
    with pytest.raises(error, match=match):
        fourierft.convert_to_lora(model, rank, svd=svd)


def test_bias_and_missing_layers_are_refused():
    _, model = _boft(bias="boft_only")
    with pytest.raises(ValueError, match="bias=boft_only"):
        fourierft.convert_to_lora(model, 4)
    with pytest.raises(TypeError, match="Could not detect any layer"):
        fourierft.convert_to_lora(Net(), 4)
    _, model = _fourierft()
    with pytest.raises(TypeError, match="Could not detect any layer"):
        fourierft.convert_to_lora(model, 4, adapter_name="other")


def test_layers_support_lora_conversion():
    _, ft = _fourierft(Mixed, target_modules=["proj", "emb", "conv"], n_frequency=20)
    _, bo = _boft(Mixed, target_modules=["conv"], boft_block_size=3)
    layers = [m for model in (ft, bo) for m in model.modules() if isinstance(m, fourierft.AdapterLayer)]
    assert len(layers) == 4 and all(m.supports_lora_conversion() for m in layers)


def test_config_builds_peft_lora_config():
    _, model = _fourierft(modules_to_save=["head"], task_type="SEQ_CLS")
    config, _ = fourierft.convert_to_lora(model, 0.5)
    theirs = config.to_peft()
    assert isinstance(theirs, peft.LoraConfig) and theirs.rank_pattern == config.rank_pattern
    assert theirs.task_type == "SEQ_CLS" and "head" in theirs.modules_to_save
    assert set(config.rank_pattern) == {"a", "b"} and config.rank_pattern == config.alpha_pattern


@pytest.mark.parametrize("method", ["fourierft", "boft"])
def test_conversion_leaves_the_model_unchanged(method):
    _, model = _fourierft() if method == "fourierft" else _boft()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 40)
    out = model(x)
    fourierft.convert_to_lora(model, 8, svd="exact")
    fourierft.convert_to_lora(model, 8, svd="randomized")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(x), out, atol=0, rtol=0)


def test_signatures_match_peft():
    import inspect

    for name in ("convert_to_lora", "save_as_lora"):
        theirs = inspect.signature(getattr(peft, name)).parameters
        mine = inspect.signature(getattr(fourierft, name)).parameters
        assert [(p.name, p.default) for p in list(mine.values())[: len(theirs)]] == \
               [(p.name, p.default) for p in theirs.values()]
        assert all(p.kind is p.KEYWORD_ONLY for p in list(mine.values())[len(theirs):])  # our additions
    theirs = inspect.signature(peft.tuners.fourierft.FourierFTLayer.supports_lora_conversion).parameters
    for cls in (fourierft.FourierFTLayer, fourierft.BOFTLinear):
        mine = inspect.signature(cls.supports_lora_conversion).parameters
        assert [(p.name, p.default) for p in mine.values()] == [(p.name, p.default) for p in theirs.values()]


def test_models_report_lora_conversion_support():
    _, model = _fourierft()
    assert model.supports_lora_conversion() and model.base_model.supports_lora_conversion("default")
    torch.manual_seed(0)
    toy = fourierft.get_peft_model(Net(), fourierft.BOFTConfig(target_modules=["a"], boft_block_size=4))
    assert toy.supports_lora_conversion()
    toy.base_model.model.a.supports_lora_conversion = lambda adapter_name="default": False  # a layer that cannot
    assert not toy.supports_lora_conversion()


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(192, 160)

    def forward(self, x):
        return self.a(x)


@pytest.mark.parametrize("method", ["fourierft", "boft"])
def test_randomized_factors_equal_peft_when_the_spectrum_has_a_gap(method, tmp_path):
    """On a layer large enough for the randomised route, with a decaying spectrum (as trained adapters tend to
    have), its B @ A is peft's (exact SVD) B @ A."""
    torch.manual_seed(0)
    base = Wide()
    if method == "fourierft":
        model = fourierft.get_peft_model(copy.deepcopy(base), fourierft.FourierFTConfig(target_modules=["a"],
                                                                                       n_frequency=300))
        with torch.no_grad():  # four dominant coefficients: singular values in pairs 10, 8, 6, 4, then small
            model.base_model.model.a.fourierft_spectrum["default"].mul_(0.05)[:4] = torch.tensor([10., 8, 6, 4])
    else:
        u, _, vh = torch.linalg.svd(torch.randn(160, 192), full_matrices=False)
        with torch.no_grad():
            base.a.weight.copy_(u * 0.7 ** torch.arange(160.0) @ vh)
        model = fourierft.get_peft_model(copy.deepcopy(base), fourierft.BOFTConfig(
            target_modules=["a"], boft_block_size=8, init_weights=False))
    result = fourierft.convert_to_lora(model, 8, min_energy=0)
    assert result.report[0].svd == "randomized"
    _, theirs = _peft_conversion(base, model, tmp_path, 8)
    (name, product), = _products(theirs).items()
    torch.testing.assert_close(_products(result[1])[name], product, atol=1e-4 * product.abs().max(), rtol=1e-3)


def test_each_layer_is_logged(caplog):
    _, model = _boft()
    with caplog.at_level("INFO", logger="fourierft.lora_conversion"):
        result = fourierft.convert_to_lora(model, 4, min_energy=0)
    lines = [r.getMessage() for r in caplog.records if r.name == "fourierft.lora_conversion"]
    for row in result.report:
        assert any(line.startswith(f"{row.name}: rank 4 keeps {100 * row.energy_kept:.1f}%") for line in lines)
