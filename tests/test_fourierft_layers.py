"""FourierFT on nn.Conv2d and nn.Embedding, against the dense definition written out here.

The reference draws the frequencies as PEFT does (the first ``n`` of a seeded ``randperm(d_out * d_in)``) and
builds ``dW[j, k] = a / (d_out d_in) * sum_i c_i cos(2 pi (p_i j / d_out + q_i k / d_in))`` element by element,
on the flattened ``(out, in * kh * kw)`` kernel of a convolution and on the ``(num_embeddings, dim)`` table of
an embedding. Covered: outputs and gradients (both embedding paths), merge equals unmerged, unmerge and
disable give the base back, save/load, mixed batches, and bad input.
"""

from __future__ import annotations

import copy
import math
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

from conftest import per_adapter_outputs
from fourierft import FourierFTConfig, PeftModel, get_peft_model
from fourierft.methods import fourierft_layers

SETTINGS = dict(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def dense_reference(spectrum: torch.Tensor, d_out: int, d_in: int, seed: int, scaling: float,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
    """``dW`` (or only its ``rows``) from the element-wise cosine sum (differentiable in ``spectrum``)."""
    n = spectrum.numel()
    flat = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[:n]
    p, q = (flat // d_in).double(), (flat % d_in).double()
    j = (torch.arange(d_out) if rows is None else rows).double()[:, None, None]
    k = torch.arange(d_in, dtype=torch.float64)[None, :, None]
    cos = torch.cos(2 * math.pi * (p * j / d_out + q * k / d_in))  # (d_out, d_in, n)
    return (cos @ spectrum.double()) * (scaling / (d_out * d_in))


def _spectrum(model, name="default") -> torch.Tensor:
    return model.base_model.model[0].fourierft_spectrum[name]


# ---------------------------------------------------------------------------------------------- Conv2d
@st.composite
def conv_cases(draw):
    c_in, c_out = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    d_in = c_in * kernel[0] * kernel[1]
    conv = dict(kernel_size=kernel, stride=draw(st.sampled_from([1, 2, (2, 1)])),
                padding=draw(st.sampled_from([0, 1, (1, 2)])), dilation=draw(st.sampled_from([1, 2, (1, 2)])),
                padding_mode=draw(st.sampled_from(["zeros", "reflect", "circular"])), bias=draw(st.booleans()))
    n = draw(st.integers(1, c_out * d_in))
    seed, scaling = draw(st.integers(0, 2**31)), draw(st.sampled_from([1.0, 150.0, -7.5]))
    return c_in, c_out, conv, n, seed, scaling, draw(st.integers(1, 3)), draw(st.integers(0, 2**16))


def _conv_model(c_in, c_out, conv, n, seed, scaling, init_seed):
    torch.manual_seed(init_seed)
    layer = nn.Conv2d(c_in, c_out, **conv).double()
    config = FourierFTConfig(target_modules=["0"], n_frequency=n, random_loc_seed=seed, scaling=scaling)
    return get_peft_model(nn.Sequential(layer), config).double().eval()


@settings(**SETTINGS)
@given(conv_cases())
def test_conv2d_equals_dense_definition(case):
    c_in, c_out, conv, n, seed, scaling, batch, init_seed = case
    model = _conv_model(c_in, c_out, conv, n, seed, scaling, init_seed)
    layer = model.base_model.model[0]
    base = layer.get_base_layer()
    reference = copy.deepcopy(base)
    x = torch.randn(batch, c_in, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(init_seed))
    x.requires_grad_()
    spectrum = _spectrum(model)
    d_in = c_in * conv["kernel_size"][0] * conv["kernel_size"][1]
    delta = dense_reference(spectrum, c_out, d_in, seed, scaling).reshape(base.weight.shape)
    want = reference._conv_forward(x, reference.weight.detach() + delta, reference.bias)
    got = model(x)
    torch.testing.assert_close(got, want, atol=1e-10 * max(1.0, want.abs().max().item()), rtol=1e-10)
    gy = torch.randn_like(want)
    for g, w in zip(torch.autograd.grad(got, [x, spectrum], gy), torch.autograd.grad(want, [x, spectrum], gy)):
        torch.testing.assert_close(g, w, atol=1e-9 * max(1.0, w.abs().max().item()), rtol=1e-9)
    with torch.no_grad():
        weight = base.weight.clone()
        model.merge_adapter()
        torch.testing.assert_close(base.weight, weight + delta.detach(), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(model(x), want, atol=1e-10 * max(1.0, want.abs().max().item()), rtol=1e-10)
        model.unmerge_adapter()
        torch.testing.assert_close(base.weight, weight, atol=1e-12, rtol=1e-12)
        with model.disable_adapter():
            torch.testing.assert_close(model(x), reference(x))


def test_conv2d_with_forward_hook_runs_the_base_layer():
    model = _conv_model(2, 3, dict(kernel_size=3, padding=1), 10, 0, 20.0, 0)
    base = model.base_model.model[0].get_base_layer()
    seen = []
    base.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    out = model(x)
    model.merge_adapter()
    torch.testing.assert_close(out, model(x))
    assert len(seen) == 2


# ---------------------------------------------------------------------------------------------- Embedding
@st.composite
def embedding_cases(draw):
    V, D = draw(st.sampled_from([1, 2, 5, 7, 13, 16, 31])), draw(st.sampled_from([1, 3, 4, 8, 9, 17]))
    n = draw(st.integers(1, V * D))
    shape = draw(st.sampled_from([(5,), (2, 3), (1, 1, 4), (0,)]))
    padding_idx = draw(st.sampled_from([None, 0]))
    return (V, D, n, draw(st.integers(0, 2**31)), draw(st.sampled_from([1.0, 150.0, -3.0])), shape, padding_idx,
            draw(st.sampled_from(["rows", "table"])), draw(st.integers(0, 2**16)))


def _embedding_model(V, D, n, seed, scaling, padding_idx, init_seed, dtype=torch.float64):
    torch.manual_seed(init_seed)
    layer = nn.Embedding(V, D, padding_idx=padding_idx).to(dtype)
    config = FourierFTConfig(target_modules=["0"], n_frequency=n, random_loc_seed=seed, scaling=scaling)
    return get_peft_model(nn.Sequential(layer), config).to(dtype).eval()


@settings(**SETTINGS)
@given(embedding_cases())
def test_embedding_equals_dense_definition(case):
    V, D, n, seed, scaling, shape, padding_idx, path, init_seed = case
    model = _embedding_model(V, D, n, seed, scaling, padding_idx, init_seed)
    base = model.base_model.model[0].get_base_layer()
    ids = torch.randint(0, V, shape, generator=torch.Generator().manual_seed(init_seed))
    spectrum = _spectrum(model)
    delta = dense_reference(spectrum, V, D, seed, scaling)
    want = nn.functional.embedding(ids, base.weight.detach() + delta)
    with mock.patch.object(fourierft_layers, "embedding_path", lambda *a: path):
        got = model(ids)
        torch.testing.assert_close(got, want, atol=1e-10 * max(1.0, scaling), rtol=1e-10)
        if ids.numel():
            gy = torch.randn_like(want)
            (g,) = torch.autograd.grad(got, [spectrum], gy)
            (w,) = torch.autograd.grad(want, [spectrum], gy)
            torch.testing.assert_close(g, w, atol=1e-9 * max(1.0, w.abs().max().item()), rtol=1e-9)
    with torch.no_grad():
        weight = base.weight.clone()
        model.merge_adapter()
        torch.testing.assert_close(model(ids), want, atol=1e-10 * max(1.0, scaling), rtol=1e-10)
        model.unmerge_adapter()
        torch.testing.assert_close(base.weight, weight, atol=1e-12, rtol=1e-12)
        with model.disable_adapter():
            torch.testing.assert_close(model(ids), nn.functional.embedding(ids, weight))


def test_embedding_rows_without_the_table_on_a_large_vocabulary():
    """At 4,000 x 96 with 30 ids the rows path is chosen; it matches the dense definition in float32."""
    V, D, n = 4000, 96, 300
    assert fourierft_layers.embedding_path(30, V, D, n) == "rows"
    assert fourierft_layers.embedding_path(30, 7, 5, n) == "table"
    model = _embedding_model(V, D, n, 5, 150.0, None, 0, dtype=torch.float32)
    model.train()
    ids = torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(1))
    spectrum = _spectrum(model)
    base = model.base_model.model[0].get_base_layer()
    with mock.patch.object(fourierft_layers.FourierFTEmbedding, "get_delta_weight",
                           side_effect=AssertionError("the table was built")):
        got = model(ids)
        got.square().sum().backward()
    flat = ids.reshape(-1)
    delta = dense_reference(spectrum.detach(), V, D, 5, 150.0, rows=flat).float()
    want = (base.weight.detach()[flat] + delta).reshape(3, 10, D)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    spectrum2 = spectrum.detach().double().requires_grad_()
    ref = base.weight.detach().double()[flat] + dense_reference(spectrum2, V, D, 5, 150.0, rows=flat)
    ref.square().sum().backward()
    torch.testing.assert_close(spectrum.grad.double(), spectrum2.grad, atol=1e-3 * spectrum2.grad.abs().max().item(),
                               rtol=1e-4)


def test_embedding_bad_ids_raise_the_base_error():
    model = _embedding_model(7, 4, 5, 0, 1.0, None, 0)
    with pytest.raises(IndexError):
        model(torch.tensor([7]))


# ---------------------------------------------------------------------------------------------- model level
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 6)
        self.conv = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, ids):
        x = self.emb(ids)  # (B, L, 6) -> an image (B, 6, L, L)
        return self.conv(x.transpose(1, 2)[..., None] * x.transpose(1, 2)[:, :, None])


def _net(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def _ids(batch=4):
    return torch.randint(0, 40, (batch, 5), generator=torch.Generator().manual_seed(3))


def test_save_load_round_trip_and_key_layout(tmp_path):
    config = FourierFTConfig(target_modules=["emb", "conv"], n_frequency=30, scaling=50.0)
    model = get_peft_model(_net(), config)
    with torch.no_grad():
        out = model(_ids())
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == ["base_model.model.conv.fourierft_spectrum", "base_model.model.emb.fourierft_spectrum"]
    assert all(t.shape == (30,) for t in tensors.values())
    loaded = PeftModel.from_pretrained(_net(), tmp_path)
    for key, t in tensors.items():
        assert torch.equal(loaded.state_dict()[key.replace("fourierft_spectrum", "fourierft_spectrum.default")], t)
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()), out, atol=0, rtol=0)
        merged = loaded.merge_and_unload()
        assert type(merged.emb) is nn.Embedding and type(merged.conv) is nn.Conv2d
        torch.testing.assert_close(merged(_ids()), out, atol=1e-5, rtol=1e-5)


def test_mixed_batch_matches_each_adapter():
    model = get_peft_model(_net(), FourierFTConfig(target_modules=["emb", "conv"], n_frequency=30, scaling=50.0))
    model.add_adapter("other", FourierFTConfig(target_modules=["emb", "conv"], n_frequency=20, scaling=-80.0,
                                               random_loc_seed=1))
    names = ["other", "default", "__base__", "other"]
    mixed, single = per_adapter_outputs(model, _ids(4), names)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], single[name][i], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("make, config, error, match", [
    (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), dict(n_frequency=4), ValueError,
     "FourierFT does not support grouped convolutions: 0 has groups=2"),
    (lambda: nn.Sequential(nn.Conv2d(2, 3, (2, 2))), dict(n_frequency=25), ValueError,
     r"value passed is 25 and the product is 24 \(layer 0: Conv2d weight \(3, 2, 2, 2\) flattened to \(3, 8\)\)"),
    (lambda: nn.Sequential(nn.Embedding(4, 3)), dict(n_frequency=13), ValueError,
     r"value passed is 13 and the product is 12 \(layer 0, 4x3\)"),
    (lambda: nn.Sequential(nn.Embedding(4, 3, max_norm=1.0)), dict(n_frequency=2), ValueError,
     "FourierFT does not support nn.Embedding with max_norm"),
    (lambda: nn.Sequential(nn.Conv3d(2, 2, 1)), dict(n_frequency=2), TypeError, r"0 \(Conv3d\) is not supported"),
    (lambda: nn.Sequential(nn.EmbeddingBag(4, 3)), dict(n_frequency=2), TypeError,
     r"0 \(EmbeddingBag\) is not supported"),
])
def test_bad_targets_raise_named_errors_and_change_nothing(make, config, error, match):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = list(model.modules())
    with pytest.raises(error, match=match):
        get_peft_model(model, FourierFTConfig(target_modules=["0"], **config))
    assert list(model.modules()) == modules
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "peft_config")


def test_all_linear_still_means_linear_layers():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Conv2d(2, 2, 1), nn.Linear(8, 2))
    model = get_peft_model(model, FourierFTConfig(target_modules="all-linear", n_frequency=4))
    adapted = [k for k, m in model.base_model.adapter_layers()]
    assert adapted == ["1", "3"]
