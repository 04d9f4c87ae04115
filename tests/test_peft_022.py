"""PEFT 0.22.0 parity: the differences found when code written for peft 0.22 runs on fourierft.

Each test runs the same user code in both libraries where peft 0.22 is the oracle, and checks outputs against a
dense float64 definition where the numbers are ours to get right:

* activation-checkpointed models (``apply_activation_checkpointing``): state-dict keys without the wrapper's
  ``_checkpoint_wrapped_module``, and loading into the wrapped model;
* loading an adapter's own state dict into an FSDP1 (root or per-module units) or FSDP2 model, ``bias="all"``,
  two targeted layers, with and without ``modules_to_save``;
* FSDP1's different FourierFT route: within float32 rounding of the unwrapped model, and why not equal;
* ``layer.indices`` is one live mapping; ``layers_to_transform`` with a regex ``target_modules`` is still refused,
  as by the installed peft 0.22.0; ``strict_adapter_check``;
* BOFT on a non-square Conv2d kernel, and merges of non-finite weights.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fourierft

peft = pytest.importorskip("peft")

from peft_surface import quiet  # noqa: E402

LIBS = (peft, fourierft)


def _config(lib, method: str, **kw):
    if method == "fourierft":
        return lib.FourierFTConfig(**{"n_frequency": 12, "init_weights": False, **kw})
    return lib.BOFTConfig(**{"boft_block_size": 4, "init_weights": False, **kw})


def _perturb(model: nn.Module, seed: int = 3) -> None:
    """Move every trainable tensor away from its start, so that a load that writes nothing is caught."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))  # a DTensor for an FSDP2 shard


# ------------------------------------------------------------------------------------ activation checkpointing
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _checkpointed(lib, method: str, when: str, seed: int = 0, **kw):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    torch.manual_seed(seed)
    base = Stack()
    wrap = lambda m: apply_activation_checkpointing(  # noqa: E731
        m, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda module: isinstance(module, Block))
    if when == "before":
        wrap(base)
    model = quiet(lib.get_peft_model, base, _config(lib, method, target_modules=["lin0", "lin1"], **kw))
    if when == "after":
        wrap(model)
    return model


def _plain(lib, method: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return quiet(lib.get_peft_model, Stack(), _config(lib, method, target_modules=["lin0", "lin1"], **kw))


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("method", ["fourierft", "boft"])
def test_checkpoint_wrapper_state_dict_as_peft(method, when):
    """Keys as the unwrapped model's (and peft's); the wrapped model loads them with no unexpected key."""
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    keys = {}
    for lib in LIBS:
        wrapped = _checkpointed(lib, method, when)
        _perturb(wrapped)
        tensors = lib.get_peft_model_state_dict(wrapped)
        assert sorted(tensors) == sorted(lib.get_peft_model_state_dict(_plain(lib, method)))
        assert not any("_checkpoint_wrapped_module" in k for k in tensors)
        keys[lib.__name__] = sorted(tensors)
        target = _checkpointed(lib, method, when, seed=5)  # other base weights do not matter: compare adapters
        result = quiet(lib.set_peft_model_state_dict, target, tensors)
        assert result.unexpected_keys == []
        if lib is fourierft:
            loaded = lib.get_peft_model_state_dict(target)
            assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
            source = _plain(lib, method)
            quiet(lib.set_peft_model_state_dict, source, tensors)
            with torch.no_grad():
                torch.testing.assert_close(wrapped(x), source(x), rtol=0, atol=0)
    assert keys["peft"] == keys["fourierft"]


# ------------------------------------------------------------------------------------------------- FSDP
class MLP3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1, self.lin2 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A one-rank gloo group in this process: enough for FSDP1 and FSDP2 on the CPU."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group yet")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path_factory.mktemp("g") / "store"), 1),
                            rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _shard(model: nn.Module, how: str) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    if how == "fsdp2":
        fully_shard(model)
        return model
    policy = {}
    if how == "fsdp1 per module":
        from peft.utils.other import fsdp_auto_wrap_policy  # what PEFT users pass (it only names module classes)

        policy = {"auto_wrap_policy": fsdp_auto_wrap_policy(model)}
    return FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"), **policy)


@pytest.mark.parametrize("heads", [{}, {"modules_to_save": ["lin2"]}], ids=["", "modules_to_save"])
@pytest.mark.parametrize("how", ["fsdp1 root", "fsdp1 per module", "fsdp2"])
@pytest.mark.parametrize("method", ["boft", "fourierft"])
def test_fsdp_loads_its_own_state_dict(one_rank_group, method, how, heads):
    """``bias="all"``, two targeted layers: the sharded model's own state dict loads back into it."""
    torch.manual_seed(0)
    config = _config(fourierft, method, target_modules=["lin0", "lin1"], bias="all", **heads)
    model = quiet(fourierft.get_peft_model, MLP3(), config)
    _perturb(model)
    wrapped = _shard(model, how)
    saved = {k: v.clone() for k, v in fourierft.get_peft_model_state_dict(wrapped).items()}
    assert any(k.endswith("lin0.base_layer.bias") for k in saved) and any("boft_R" in k or "spectrum" in k
                                                                         for k in saved)
    _perturb(model, seed=4)
    assert any(not torch.equal(v, saved[k]) for k, v in fourierft.get_peft_model_state_dict(wrapped).items())
    result = fourierft.set_peft_model_state_dict(wrapped, saved)
    assert result.unexpected_keys == [] and result.missing_keys == []
    loaded = fourierft.get_peft_model_state_dict(wrapped)
    assert sorted(loaded) == sorted(saved)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key


def _dense_fourierft_output(model, x: torch.Tensor) -> torch.Tensor:
    """The MLP's output in float64 with every layer's weight W + dW from the dense definition (ifft2)."""
    from fourierft.ops.spectral import frequency_indices

    h = x.double()
    for name in ("lin0", "lin1", "lin2"):
        layer = getattr(model.base_model.model, name)
        base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        weight = base.weight.detach().double()
        if hasattr(layer, "fourierft_spectrum"):
            d_out, d_in = weight.shape
            p, q = frequency_indices(d_out, d_in, layer.fourierft_n_frequency["default"], 777)
            spectrum = torch.zeros(d_out, d_in, dtype=torch.complex128)
            spectrum[p, q] = layer.fourierft_spectrum["default"].detach().double().to(torch.complex128)
            weight = weight + layer.fourierft_scaling["default"] * torch.fft.ifft2(spectrum).real
        h = h @ weight.T + base.bias.detach().double()
        h = torch.relu(h) if name != "lin2" else h
    return h


def test_fsdp1_fourierft_route_differs_within_rounding(one_rank_group):
    """Decided and documented (docs/migrating.md): FSDP1 shows the frozen base weight as a view of a flat
    parameter that requires grad, so the layer adds the adapter's product to the base layer's instead of one
    GEMM on ``W + dW``. Both are the same function rounded differently in float32: each is within 1e-5 (relative
    to the output's largest entry) of the float64 dense definition, and so is their difference."""
    torch.manual_seed(0)
    config = fourierft.FourierFTConfig(target_modules=["lin0", "lin1", "lin2"], n_frequency=16, scaling=150.0)
    model = quiet(fourierft.get_peft_model, MLP3(), config)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(x)
        routes = {r.route for r in fourierft.explain_routes(model, x, grad=False)}
        wrapped = _shard(model, "fsdp1 root")
        sharded = wrapped(x)
        sharded_routes = {r.route for r in fourierft.explain_routes(wrapped, x, grad=False)}
    assert routes != sharded_routes  # the two routes really differ, else this test proves nothing
    dense = _dense_fourierft_output(model, x)
    scale = dense.abs().max()
    for out in (plain, sharded):
        assert (out.double() - dense).abs().max() <= 1e-5 * scale
    assert (plain - sharded).abs().max() <= 1e-5 * scale


# ----------------------------------------------------------------------------- smaller 0.22 differences
def _two_adapters(lib):
    torch.manual_seed(0)
    model = quiet(lib.get_peft_model, MLP3(), _config(lib, "fourierft", target_modules=["lin0"]))
    quiet(model.add_adapter, "other", _config(lib, "fourierft", target_modules=["lin0"], random_loc_seed=9))
    return model


def test_indices_is_one_live_mapping():
    """A reference to ``layer.indices`` taken before ``delete_adapter`` no longer holds the deleted adapter."""
    seen = {}
    for lib in LIBS:
        model = _two_adapters(lib)
        layer = model.base_model.model.lin0
        indices = layer.indices
        assert sorted(indices) == ["default", "other"]
        before = {k: v.clone() for k, v in indices.items()}
        quiet(model.delete_adapter, "other")
        assert sorted(indices) == ["default"]
        seen[lib.__name__] = before
    for name in ("default", "other"):
        assert torch.equal(seen["peft"][name].cpu(), seen["fourierft"][name])
    with pytest.raises(TypeError):
        indices["default"] = torch.zeros(2, 12, dtype=torch.long)  # derived from the seed: read-only here


def test_layers_to_transform_with_regex_targets_as_peft():
    """Installed peft 0.22.0 still refuses ``layers_to_transform`` with a regex ``target_modules``: FourierFT's
    own config check is gone, but ``PeftConfig.__post_init__`` now refuses it for every method. Same here."""
    errors = {}
    for lib in LIBS:
        for cls, kw in ((lib.FourierFTConfig, {}), (lib.BOFTConfig, {"boft_block_size": 2})):
            with pytest.raises(ValueError) as info:
                cls(target_modules=r".*\.lin[01]", layers_to_transform=[0], **kw)
            errors[(lib.__name__, cls.__name__)] = str(info.value)
    assert len(set(errors.values())) == 1, errors
    assert "`layers_to_transform` cannot be used when `target_modules` is a str." in errors[("peft", "BOFTConfig")]


def test_strict_adapter_check(tmp_path):
    """peft 0.22's new argument: a bad value is refused by both; a file lacking a layer's tensor raises with
    ``"error"`` in both (fourierft refuses it for every value: a partly loaded adapter gives wrong outputs)."""
    from safetensors.torch import load_file, save_file

    for lib in LIBS:
        torch.manual_seed(0)
        model = quiet(lib.get_peft_model, MLP3(), _config(lib, "fourierft", target_modules=["lin0", "lin1"]))
        folder = tmp_path / lib.__name__
        quiet(model.save_pretrained, str(folder))
        with pytest.raises(ValueError, match="strict_adapter_check"):
            quiet(lib.PeftModel.from_pretrained, MLP3(), str(folder), strict_adapter_check="strict")
        weights = folder / "adapter_model.safetensors"
        tensors = load_file(str(weights))
        del tensors["base_model.model.lin1.fourierft_spectrum"]
        save_file(tensors, str(weights))
        with pytest.raises((RuntimeError, ValueError), match="(?i)missing"):
            quiet(model.load_adapter, str(folder), "second", strict_adapter_check="error")
    for check in ("warn", "ignore"):
        with pytest.raises(fourierft.CheckpointError, match="missing key"):
            quiet(model.load_adapter, str(tmp_path / "fourierft"), "second", strict_adapter_check=check)
        assert sorted(model.peft_config) == ["default"]  # nothing half-added


# ------------------------------------------------------------------------------------------ BOFT Conv2d
class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, (1, 3))

    def forward(self, x):
        return self.conv(x)


def _cayley(r: torch.Tensor) -> torch.Tensor:
    skew = (r - r.transpose(-1, -2)) / 2
    eye = torch.eye(r.shape[-1], dtype=r.dtype)
    return torch.linalg.solve((eye + skew).mT, (eye - skew).mT).mT  # (I - S)(I + S)^-1


def test_boft_conv2d_non_square_kernel_as_peft_and_dense():
    """A (1, 3) kernel: ``n = in * kh * kw = 6`` (peft 0.22's fix); outputs equal peft's and the dense
    ``W' = diag(s) W M^T`` with the weight flattened in ``(in, kh, kw)`` order; the merge gives the same."""
    x = torch.randn(2, 2, 5, 7, generator=torch.Generator().manual_seed(1))
    outs = {}
    for lib in LIBS:
        torch.manual_seed(0)
        model = quiet(lib.get_peft_model, Conv(), _config(lib, "boft", target_modules=["conv"], boft_block_size=3))
        with torch.no_grad():
            outs[lib.__name__] = model(x)
    torch.testing.assert_close(outs["fourierft"], outs["peft"])
    layer = model.base_model.model.conv
    base = layer.get_base_layer()
    r, s = layer.boft_R["default"].detach().double(), layer.boft_s["default"].detach().double()
    assert r.shape == (1, 2, 3, 3)
    rotation = torch.block_diag(*_cayley(r[0]))
    weight = base.weight.detach().double().reshape(4, 6)
    merged = (s.reshape(4, 1) * (weight @ rotation.T)).reshape(4, 2, 1, 3)
    dense = torch.nn.functional.conv2d(x.double(), merged, base.bias.detach().double())
    torch.testing.assert_close(outs["fourierft"].double(), dense, rtol=1e-5, atol=1e-5)
    quiet(model.merge_adapter)
    with torch.no_grad():
        torch.testing.assert_close(model(x), outs["fourierft"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["fourierft", "boft"])
def test_non_finite_merge_as_peft(method):
    """As in peft 0.22: ``safe_merge=True`` raises ValueError ("NaNs detected in the merged weights") and leaves
    the weights alone; a plain merge does what it is told (the weight becomes non-finite) in both."""
    results = {}
    for lib in LIBS:
        torch.manual_seed(0)
        model = quiet(lib.get_peft_model, MLP3(), _config(lib, method, target_modules=["lin0"]))
        layer = model.base_model.model.lin0
        tensor = layer.fourierft_spectrum["default"] if method == "fourierft" else layer.boft_s["default"]
        with torch.no_grad():
            tensor.view(-1)[0] = float("nan")
        before = layer.get_base_layer().weight.detach().clone()
        with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
            quiet(model.merge_adapter, safe_merge=True)
        assert torch.equal(layer.get_base_layer().weight, before)
        quiet(model.merge_adapter)
        results[lib.__name__] = bool(torch.isfinite(layer.get_base_layer().weight).all())
    assert results == {"peft": False, "fourierft": False}


class Shared(nn.Module):
    """A module registered under two names, a tied weight and a non-persistent buffer: state-dict corner cases."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1, self.norm = nn.Linear(8, 8), nn.Linear(8, 8), nn.BatchNorm1d(8)
        self.again = self.norm
        self.out = nn.Linear(8, 8)
        self.out.weight = self.lin1.weight
        self.register_buffer("scratch", torch.ones(1), persistent=False)

    def forward(self, x):
        return self.out(self.again(self.lin1(torch.relu(self.lin0(x)))))


@pytest.mark.parametrize("method", ["fourierft", "boft"])
def test_bias_all_keys_with_shared_modules_as_peft(method):
    """``bias="all"`` keys come from the modules' state-dict names without calling ``state_dict`` on nested
    modules: a shared module, a tied weight and a non-persistent buffer give peft 0.22's keys."""
    keys = {}
    for lib in LIBS:
        torch.manual_seed(0)
        model = quiet(lib.get_peft_model, Shared(), _config(lib, method, target_modules=["lin0"], bias="all",
                                                            modules_to_save=["out"]))
        keys[lib.__name__] = sorted(lib.get_peft_model_state_dict(model))
    assert keys["peft"] == keys["fourierft"]
    assert "base_model.model.again.bias" in keys["fourierft"]
