"""Properties over random shapes and configs (hypothesis), for both methods, at the layer and model level.

* the fast path equals the dense definition (FourierFT: ``x @ (W + dW).T + b`` with ``dW`` from
  ``get_delta_weight``; embeddings: ``(W + dW)[ids]`` with ``dW = a Re(ifft2(S))`` written out, square tables
  included; BOFT: ``s * (x M W^T) + b`` with ``M = dense_rotation(cayley(R))``), outputs and
  gradients;
* merged equals unmerged, and unmerging gives the base weight back;
* save then load reproduces every adapter tensor bit for bit, and the outputs;
* the BOFT rotation stays orthogonal for any ``R``.

Example counts are modest so that the file runs in seconds; the op-level tests in ``test_ops_*.py`` go
wider on the pure functions.
"""

from __future__ import annotations

import copy
import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from fourierft import BOFTConfig, FourierFTConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from fourierft.ops import butterfly

SETTINGS = dict(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DIMS = st.sampled_from([1, 2, 3, 4, 5, 7, 8, 12, 13, 16, 17, 24])


# ---------------------------------------------------------------------------------------------- strategies
@st.composite
def fourierft_cases(draw):
    d_out, d_in = draw(DIMS), draw(DIMS)
    n = draw(st.integers(1, d_out * d_in))
    config = dict(n_frequency=n, random_loc_seed=draw(st.integers(0, 2**31)),
                  scaling=draw(st.sampled_from([1.0, 150.0, -7.5, 1e3])))
    if draw(st.booleans()) and d_out * d_in > 1:
        config["frequency_band"] = [draw(st.sampled_from([0.0, 0.2, 0.5])), 0.1]
    conv1d = draw(st.booleans())
    lead = draw(st.lists(st.integers(0, 3), min_size=0, max_size=2))
    return d_out, d_in, config, conv1d, lead, draw(st.integers(0, 2**16))


@st.composite
def fourierft_embedding_cases(draw):
    """Half of the tables square (``V == D``, at least 2x2): there a ``dW`` computed transposed keeps its shape,
    so only the values tell it apart."""
    vocab = draw(st.sampled_from([2, 3, 4, 5, 7, 8, 12, 13, 16]))
    dim = vocab if draw(st.booleans()) else draw(DIMS)
    n = draw(st.integers(1, vocab * dim))
    config = dict(n_frequency=n, random_loc_seed=draw(st.integers(0, 2**31)),
                  scaling=draw(st.sampled_from([1.0, 150.0, -7.5])))
    ids = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=12))
    return vocab, dim, config, ids, draw(st.sampled_from(["rows", "table"])), draw(st.integers(0, 2**16))


@st.composite
def boft_geometries(draw):
    """``(n, block_size, m)`` with ``N = n / b`` a multiple of ``2**(m-1)`` and ``b`` even when ``m > 1``."""
    m = draw(st.integers(1, 3))
    size = draw(st.sampled_from([1, 2, 3, 4, 5]) if m == 1 else st.sampled_from([2, 4, 6]))
    blocks = draw(st.integers(1, 3)) * 2 ** (m - 1)
    return blocks * size, size, m


@st.composite
def boft_cases(draw):
    n, size, m = draw(boft_geometries())
    d_out = draw(DIMS)
    conv = draw(st.booleans()) and n % 4 == 0
    lead = draw(st.lists(st.integers(0, 3), min_size=0, max_size=2))
    return n, size, m, d_out, conv, lead, draw(st.integers(0, 2**16))


def _magnitude(t: torch.Tensor) -> float:
    """Largest absolute entry, at least 1 (tolerances scale with it)."""
    return max(1.0, t.abs().max().item()) if t.numel() else 1.0


def _model(layer: nn.Module) -> nn.Module:
    return nn.Sequential(layer)


def _fourierft_model(d_out, d_in, config, conv1d, seed, dtype=torch.float64):
    torch.manual_seed(seed)
    layer = Conv1D(d_out, d_in) if conv1d else nn.Linear(d_in, d_out)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    model = get_peft_model(_model(layer.to(dtype)), FourierFTConfig(target_modules=["0"], **config))
    return model.to(dtype).eval()


def _boft_model(n, size, m, d_out, conv, seed, dtype=torch.float64):
    torch.manual_seed(seed)
    layer = nn.Conv2d(n // 4, d_out, (2, 2), padding=1) if conv else nn.Linear(n, d_out)
    config = BOFTConfig(target_modules=["0"], boft_block_size=size, boft_n_butterfly_factor=m, init_weights=False)
    model = get_peft_model(_model(layer.to(dtype)), config)
    return model.to(dtype).eval()


def _input(model, lead, seed, dtype=torch.float64):
    layer = model.base_model.model[0].get_base_layer()
    gen = torch.Generator().manual_seed(seed + 1)
    if isinstance(layer, nn.Conv2d):
        return torch.randn(max(1, lead[0] if lead else 1), layer.in_channels, 3, 3, generator=gen, dtype=dtype)
    width = layer.weight.shape[0] if isinstance(layer, Conv1D) else layer.in_features
    return torch.randn(*lead, width, generator=gen, dtype=dtype)


# ---------------------------------------------------------------------------------------------- dense definition
@settings(**SETTINGS)
@given(fourierft_cases())
def test_fourierft_layer_equals_dense_definition(case):
    d_out, d_in, config, conv1d, lead, seed = case
    model = _fourierft_model(d_out, d_in, config, conv1d, seed)
    layer = model.base_model.model[0]
    base = layer.get_base_layer()
    x = _input(model, lead, seed).requires_grad_()
    spectrum = layer.fourierft_spectrum["default"]
    weight = (base.weight.T if conv1d else base.weight).detach()
    delta = layer.get_delta_weight("default")
    assert delta.shape == (d_out, d_in)
    y = layer(x)  # with gradients: always the spectral path
    dense = x @ (weight + delta).T + base.bias
    scale = _magnitude(dense)
    torch.testing.assert_close(y, dense, atol=1e-10 * scale, rtol=1e-10)
    gy = torch.randn_like(dense)
    got = torch.autograd.grad(y, [x, spectrum], gy)
    want = torch.autograd.grad(dense, [x, spectrum], gy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-9 * _magnitude(w), rtol=1e-9)
    with torch.no_grad():  # inference may take the dense route: same numbers
        torch.testing.assert_close(layer(x), dense, atol=1e-10 * scale, rtol=1e-10)


def _dense_delta(positions: torch.Tensor, spectrum: torch.Tensor, scaling: float, d_out: int, d_in: int) -> torch.Tensor:
    """FourierFT's definition, written out: ``a * Re(ifft2(S))`` with ``S[p_i, q_i] = c_i`` on ``(d_out, d_in)``."""
    S = torch.zeros(d_out, d_in, dtype=torch.complex128)
    S[positions[0], positions[1]] = spectrum.detach().to(torch.complex128)
    return scaling * torch.fft.ifft2(S).real


@settings(**SETTINGS)
@given(fourierft_embedding_cases())
def test_fourierft_embedding_equals_dense_definition(case):
    """Looked-up rows of ``W + dW`` with ``dW`` on the ``(num_embeddings, embedding_dim)`` table, by both
    paths (only the looked-up rows, the whole table), also for square tables."""
    from unittest import mock

    from fourierft.methods import fourierft_layers

    vocab, dim, config, ids, path, seed = case
    torch.manual_seed(seed)
    table = nn.Embedding(vocab, dim).to(torch.float64)
    model = get_peft_model(_model(table), FourierFTConfig(target_modules=["0"], init_weights=False, **config))
    layer = model.base_model.model[0]
    positions = layer.indices["default"]
    assert positions.shape == (2, config["n_frequency"])
    delta = _dense_delta(positions, layer.fourierft_spectrum["default"], config["scaling"], vocab, dim)
    x = torch.tensor(ids)
    with mock.patch.object(fourierft_layers, "embedding_path", return_value=path):
        y = layer(x)
    dense = table.weight.detach()[x] + delta[x]
    torch.testing.assert_close(y, dense, atol=1e-10 * _magnitude(dense), rtol=1e-10)
    torch.testing.assert_close(layer.get_delta_weight("default"), delta, atol=1e-10 * _magnitude(delta), rtol=1e-10)


@settings(**SETTINGS)
@given(boft_cases())
def test_boft_layer_equals_dense_definition(case):
    n, size, m, d_out, conv, lead, seed = case
    model = _boft_model(n, size, m, d_out, conv, seed)
    layer = model.base_model.model[0]
    base = layer.get_base_layer()
    R, s = layer.boft_R["default"], layer.boft_s["default"]
    M = butterfly.dense_rotation(butterfly.cayley(R))
    weight = base.weight.reshape(d_out, -1)
    rotated = (s.reshape(-1, 1) * (weight @ M.T)).reshape(base.weight.shape)
    x = _input(model, lead, seed).requires_grad_()
    if conv:
        dense = base._conv_forward(x, rotated, base.bias)
    else:
        dense = x @ rotated.T + base.bias
    y = layer(x)
    torch.testing.assert_close(y, dense, atol=1e-10, rtol=1e-10)
    gy = torch.randn_like(dense)
    got = torch.autograd.grad(y, [x, R, s], gy)
    want = torch.autograd.grad(dense, [x, R, s], gy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)


@settings(**SETTINGS)
@given(boft_geometries(), st.floats(1e-3, 1e3), st.integers(0, 2**16), st.sampled_from([torch.float32, torch.float64]))
def test_boft_rotation_is_orthogonal(geometry, magnitude, seed, dtype):
    n, size, m = geometry
    gen = torch.Generator().manual_seed(seed)
    R = (torch.randn(m, n // size, size, size, generator=gen, dtype=torch.float64) * magnitude).to(dtype)
    Q = butterfly.cayley(R)
    M = butterfly.dense_rotation(Q)
    # Cayley's rounding error grows with cond(I + S) ~ |R|: float32 needs a tolerance that scales with it
    tol = max(1e-12 if dtype == torch.float64 else 2e-5, 8 * torch.finfo(dtype).eps * (1 + magnitude))
    eye = torch.eye(n, dtype=dtype)
    torch.testing.assert_close(M @ M.T, eye, atol=tol * n, rtol=0)
    torch.testing.assert_close(M.T @ M, eye, atol=tol * n, rtol=0)
    torch.testing.assert_close(Q @ Q.mT, torch.eye(size, dtype=dtype).expand_as(Q), atol=tol * size, rtol=0)
    x = torch.randn(3, n, generator=gen, dtype=torch.float64).to(dtype)  # rotations keep norms
    torch.testing.assert_close(butterfly.rotate(x, Q).norm(dim=-1), x.norm(dim=-1), atol=tol * n, rtol=tol * n)


# ---------------------------------------------------------------------------------------------- merge
def _check_merge(model, x, tol=1e-10):
    layer = model.base_model.model[0]
    weight = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter(safe_merge=True)
        assert layer.merged_adapters == ["default"]
        merged = model(x)
        model.unmerge_adapter()
        again = model(x)
    scale = _magnitude(unmerged)
    torch.testing.assert_close(merged, unmerged, atol=tol * scale, rtol=tol)
    torch.testing.assert_close(again, unmerged, atol=tol * scale, rtol=tol)
    torch.testing.assert_close(layer.get_base_layer().weight, weight, atol=tol * scale, rtol=tol)


@settings(**SETTINGS)
@given(fourierft_cases())
def test_fourierft_merged_equals_unmerged(case):
    d_out, d_in, config, conv1d, lead, seed = case
    model = _fourierft_model(d_out, d_in, config, conv1d, seed)
    _check_merge(model, _input(model, lead, seed))


@settings(**SETTINGS)
@given(boft_cases())
def test_boft_merged_equals_unmerged(case):
    n, size, m, d_out, conv, lead, seed = case
    model = _boft_model(n, size, m, d_out, conv, seed)
    _check_merge(model, _input(model, lead, seed))


# ---------------------------------------------------------------------------------------------- files
def _round_trip(model, build, x, name, safe):
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, safe_serialization=safe)
        subfolder = None if name == "default" else name
        loaded = PeftModel.from_pretrained(build(), folder, subfolder=subfolder, adapter_name=name)
    ours, theirs = get_peft_model_state_dict(model, adapter_name=name), get_peft_model_state_dict(loaded,
                                                                                                  adapter_name=name)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


@settings(**SETTINGS)
@given(fourierft_cases(), st.sampled_from(["default", "other"]), st.booleans())
def test_fourierft_save_load_round_trip_is_exact(case, name, safe):
    d_out, d_in, config, conv1d, lead, seed = case
    torch.manual_seed(seed)
    model = _fourierft_model(d_out, d_in, config, conv1d, seed, dtype=torch.float32)
    if name != "default":
        model.add_adapter(name, FourierFTConfig(target_modules=["0"], **config))
        model.set_adapter(name)
        with torch.no_grad():
            model.base_model.model[0].fourierft_spectrum[name].normal_()
    _round_trip(model, lambda: _model(_fresh_copy(model)), _input(model, lead, seed, torch.float32), name, safe)


@settings(**SETTINGS)
@given(boft_cases(), st.sampled_from(["default", "other"]), st.booleans())
def test_boft_save_load_round_trip_is_exact(case, name, safe):
    n, size, m, d_out, conv, lead, seed = case
    model = _boft_model(n, size, m, d_out, conv, seed, dtype=torch.float32)
    if name != "default":
        config = BOFTConfig(target_modules=["0"], boft_block_size=size, boft_n_butterfly_factor=m, init_weights=False)
        model.add_adapter(name, config)
        model.set_adapter(name)
    _round_trip(model, lambda: _model(_fresh_copy(model)), _input(model, lead, seed, torch.float32), name, safe)


def _fresh_copy(model) -> nn.Module:
    """A new plain layer with the adapted layer's base weights (the base model the adapter was trained on)."""
    return copy.deepcopy(model.base_model.model[0].get_base_layer())
