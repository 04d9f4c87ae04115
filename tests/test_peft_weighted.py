"""``add_weighted_adapter``: exact weighted sums of FourierFT adapters sharing frequency positions, refused otherwise.

The reference is the dense definition ``dW = a * Re(ifft2(S))`` in float64 for every source adapter; the
combined adapter's file is loaded by peft 0.22 as an ordinary FourierFT adapter and must give the same outputs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fourierft
from fourierft.ops.spectral import frequency_indices

peft = pytest.importorskip("peft")

from peft_surface import quiet  # noqa: E402


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1, self.head = nn.Linear(10, 12), nn.Linear(12, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


X = torch.randn(5, 10, generator=torch.Generator().manual_seed(1))
SOURCES = {  # name: (targets, scaling); same n and seed, so the same positions at each layer
    "a": (["lin0", "lin1"], 150.0),
    "b": (["lin0", "lin1"], 40.0),
    "c": (["lin1"], 150.0),  # only on lin1: contributes nothing at lin0
}
WEIGHTS = {"a": 0.5, "b": -1.25, "c": 2.0}


def _lib_config(lib, targets, scaling, **kw):
    return lib.FourierFTConfig(target_modules=targets, n_frequency=20, scaling=scaling, init_weights=False, **kw)


def _model(lib=fourierft, **kw):
    torch.manual_seed(0)
    model = None
    for name, (targets, scaling) in SOURCES.items():
        config = _lib_config(lib, targets, scaling, **kw)
        if model is None:
            model = quiet(lib.get_peft_model, Net(), config, adapter_name=name)
        else:
            quiet(model.add_adapter, name, config)
    return model


def _dense_delta(layer, name: str) -> torch.Tensor:
    """``a * Re(ifft2(S))`` in float64, positions drawn as PEFT draws them."""
    d_out, d_in = layer.out_features, layer.in_features
    p, q = frequency_indices(d_out, d_in, layer.fourierft_n_frequency[name], layer.fourierft_random_loc_seed[name])
    spectrum = torch.zeros(d_out, d_in, dtype=torch.complex128)
    spectrum[p, q] = layer.fourierft_spectrum[name].detach().double().to(torch.complex128)
    return layer.fourierft_scaling[name] * torch.fft.ifft2(spectrum).real


def test_weighted_sum_is_exact_and_peft_loads_it(tmp_path):
    model = _model()
    model.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), "mix")
    assert model.active_adapters == ["a"]  # the new adapter is added inactive, as in peft
    for name in ("lin0", "lin1"):
        layer = getattr(model.base_model.model, name)
        want = sum(w * _dense_delta(layer, k) for k, w in WEIGHTS.items() if k in layer.adapter_names())
        got = _dense_delta(layer, "mix")
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
        torch.testing.assert_close(layer.get_delta_weight("mix").double(), want, rtol=1e-5,
                                   atol=1e-5 * want.abs().max().item())
    model.set_adapter("mix")
    with torch.no_grad():
        ours = model(X)
        base = model.get_base_model()
        h = X.double()
        for name in ("lin0", "lin1"):
            layer = getattr(base, name)
            weight = layer.get_base_layer().weight.double() + _dense_delta(layer, "mix")
            h = torch.relu(h @ weight.T + layer.get_base_layer().bias.double())
        dense = h @ base.head.weight.double().T + base.head.bias.double()
    torch.testing.assert_close(ours.double(), dense, rtol=1e-5, atol=1e-5)

    model.save_pretrained(str(tmp_path), selected_adapters=["mix"])
    folder = tmp_path / "mix"
    torch.manual_seed(0)
    theirs = quiet(peft.PeftModel.from_pretrained, Net(), str(folder)).eval()
    assert type(theirs.base_model).__name__ == "FourierFTModel"
    ours_reloaded = quiet(fourierft.PeftModel.from_pretrained, _fresh_like(model), str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(X), ours, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours_reloaded(X), ours, rtol=1e-6, atol=1e-7)


def _fresh_like(model) -> nn.Module:
    torch.manual_seed(0)
    return Net()


def _unchanged(model, before: dict) -> None:
    assert sorted(model.peft_config) == sorted(before)
    for _, layer in model.base_model.adapter_layers():
        assert set(layer.fourierft_spectrum) <= set(before)


@pytest.mark.parametrize("other", [dict(random_loc_seed=5), dict(n_frequency=21)], ids=["seed", "n"])
def test_different_positions_refused(other):
    model = _model()
    config = fourierft.FourierFTConfig(**{"target_modules": ["lin0"], "n_frequency": 20, "init_weights": False,
                                          **other})
    quiet(model.add_adapter, "far", config)
    before = dict(model.peft_config)
    with pytest.raises(ValueError, match="convert_to_lora"):
        model.add_weighted_adapter(["a", "far"], [1.0, 1.0], "mix")
    _unchanged(model, before)


def test_boft_refused_with_what_works_instead():
    torch.manual_seed(0)
    model = quiet(fourierft.get_peft_model, Net(), fourierft.BOFTConfig(target_modules=["lin1"], boft_block_size=4))
    quiet(model.add_adapter, "b", fourierft.BOFTConfig(target_modules=["lin1"], boft_block_size=4))
    with pytest.raises(ValueError, match="convert_to_lora.*combination_type='cat'"):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix")
    assert sorted(model.peft_config) == ["b", "default"]


@pytest.mark.parametrize("args,message", [
    ((["a", "b"], [1.0], "mix"), "one finite number per adapter"),
    ((["a", "b"], [1.0, float("nan")], "mix"), "one finite number per adapter"),
    ((["a", "zzz"], [1.0, 1.0], "mix"), "existing adapters"),
    ((["a", "b"], [1.0, 1.0], "b"), "already exists"),
    ((["a", "b"], [1.0, 1.0], "mix", "svd"), "combination_type='svd' is not supported"),
])
def test_bad_arguments_refused(args, message):
    model = _model()
    before = dict(model.peft_config)
    with pytest.raises(ValueError, match=message):
        model.add_weighted_adapter(*args)
    _unchanged(model, before)


def test_bias_or_heads_refused():
    torch.manual_seed(0)
    model = quiet(fourierft.get_peft_model, Net(), _lib_config(fourierft, ["lin0"], 150.0, modules_to_save=["head"]))
    quiet(model.add_adapter, "b", _lib_config(fourierft, ["lin0"], 150.0))
    with pytest.raises(ValueError, match="modules_to_save"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix")
    assert sorted(model.peft_config) == ["b", "default"]
