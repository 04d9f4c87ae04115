"""Hot-swapping adapters in place: outputs against freshly loaded references (and PEFT), no recompilation
under torch.compile, refusals that leave the model unchanged, and padding that keeps outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from fourierft import (BOFTConfig, FourierFTConfig, HotswapError, PeftModel, get_peft_model,
                       get_peft_model_state_dict, hotswap_adapter, prepare_model_for_hotswap)
from fourierft.ops.spectral import band_frequency_indices, frequency_indices


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return Net()


X = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))


def config(method: str, **kw):
    if method == "fourierft":
        return FourierFTConfig(**{"target_modules": ["a", "b"], "n_frequency": 24, "init_weights": False, **kw})
    return BOFTConfig(**{"target_modules": ["a", "b"], "boft_block_size": 4, "boft_n_butterfly_factor": 2,
                         "init_weights": False, **kw})


def trained(base, method: str, seed: int, **kw) -> PeftModel:
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), config(method, **kw))
    if method == "boft":
        with torch.no_grad():  # init_weights=False draws s ~ N(1, 0.1); move R too, as training would
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def saved(model: PeftModel, tmp_path, name: str) -> str:
    path = str(tmp_path / name)
    model.save_pretrained(path)
    return path


def reference(base, path: str) -> PeftModel:
    return PeftModel.from_pretrained(copy.deepcopy(base), path).eval()


def out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def snapshot(model: nn.Module) -> dict:
    return {k: (id(v), v.detach().clone()) for k, v in [*model.named_parameters(), *model.named_buffers()]}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert list(after) == list(before)
    for k, (ident, value) in before.items():
        assert after[k][0] == ident, k
        assert torch.equal(after[k][1], value), k


# ---------------------------------------------------------------------------------------------- maths
def test_frequency_positions_are_nested_prefixes():
    """The fact FourierFT padding rests on: the first n of the seeded permutation do not depend on n."""
    for d_out, d_in in [(32, 16), (7, 13)]:
        big = frequency_indices(d_out, d_in, 90, 777)
        for n in (1, 24, 89):
            assert torch.equal(frequency_indices(d_out, d_in, n, 777), big[:, :n])
        assert not torch.equal(frequency_indices(d_out, d_in, 24, 778), big[:, :24])
        band = band_frequency_indices(d_out, d_in, 90, 3, 0.2, 0.1)
        assert torch.equal(band_frequency_indices(d_out, d_in, 30, 3, 0.2, 0.1), band[:, :30])


# ---------------------------------------------------------------------------------------------- eager swaps
@pytest.mark.parametrize("method", ["fourierft", "boft"])
def test_swap_matches_loading_and_keeps_every_tensor_object(base, tmp_path, method):
    model = trained(base, method, 1)
    before = snapshot(model)
    for seed in (2, 3):
        path = saved(trained(base, method, seed), tmp_path, f"a{seed}")
        model.hotswap_adapter(path, "default")
        torch.testing.assert_close(out(model), out(reference(base, path)), rtol=1e-5, atol=1e-6)
    after = snapshot(model)
    assert [(k, i) for k, (i, _) in after.items()] == [(k, i) for k, (i, _) in before.items()]


@pytest.mark.parametrize("method", ["fourierft", "boft"])
def test_swap_from_state_dict_and_non_default_name(base, method):
    model = trained(base, method, 1)
    model.add_adapter("other", config(method))
    model.set_adapter("other")
    source = trained(base, method, 4)
    hotswap_adapter(model, get_peft_model_state_dict(source), "other")
    torch.testing.assert_close(out(model), out(source), rtol=1e-5, atol=1e-6)


def test_fourierft_scaling_is_folded_into_the_coefficients(base, tmp_path):
    model = trained(base, "fourierft", 1)
    path = saved(trained(base, "fourierft", 2, scaling=37.5), tmp_path, "s")
    model.hotswap_adapter(path)
    assert model.peft_config["default"].scaling == 150.0  # the compiled graph's constant stays
    torch.testing.assert_close(out(model), out(reference(base, path)), rtol=1e-5, atol=1e-6)
    resaved = saved(model, tmp_path, "resaved")  # what is saved after the swap reproduces it
    torch.testing.assert_close(out(reference(base, resaved)), out(reference(base, path)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["fourierft", "boft"])
def test_subset_of_targets_leaves_the_others_identity(base, tmp_path, method):
    model = trained(base, method, 1)
    path = saved(trained(base, method, 2, target_modules=["a"]), tmp_path, "a_only")
    model.hotswap_adapter(path)
    torch.testing.assert_close(out(model), out(reference(base, path)), rtol=1e-5, atol=1e-6)


def test_swap_a_peft_saved_adapter(base, tmp_path):
    peft = pytest.importorskip("peft")
    for method, cfg in [("fourierft", peft.FourierFTConfig(target_modules=["a", "b"], n_frequency=24, init_weights=False)),
                        ("boft", peft.BOFTConfig(target_modules=["a", "b"], boft_block_size=4, init_weights=False))]:
        torch.manual_seed(5)
        theirs = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
        path = saved(theirs, tmp_path, method)
        model = trained(base, method, 1)  # BOFT: 2 factors; PEFT's CPU adapter has 1, padded with the identity
        model.hotswap_adapter(path)
        torch.testing.assert_close(out(model), out(theirs), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- padding
def test_prepare_pads_fourierft_without_changing_outputs(base, tmp_path):
    model = trained(base, "fourierft", 1)
    expected = out(model)
    prepare_model_for_hotswap(model, target_n_frequency=60)
    # float32: with 60 entries instead of 20 choose_path may take the other path (same maths, other rounding)
    torch.testing.assert_close(out(model), expected, rtol=1e-5, atol=1e-5)
    assert model.peft_config["default"].n_frequency == 60
    assert model.base_model.model.a.fourierft_spectrum["default"].shape == (60,)
    small = saved(trained(base, "fourierft", 2, n_frequency=10), tmp_path, "n10")
    model.hotswap_adapter(small)
    torch.testing.assert_close(out(model), out(reference(base, small)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out(reference(base, saved(model, tmp_path, "padded"))), out(model))


def test_prepare_pads_boft_factors_without_changing_outputs(base, tmp_path):
    model = trained(base, "boft", 1, boft_n_butterfly_factor=1)
    expected = out(model)
    prepare_model_for_hotswap(model, target_n_butterfly_factor=3)
    torch.testing.assert_close(out(model), expected, rtol=1e-5, atol=1e-6)
    assert model.base_model.model.b.boft_R["default"].shape == (3, 8, 4, 4)
    for m in (2, 3, 1):
        path = saved(trained(base, "boft", 10 + m, boft_n_butterfly_factor=m), tmp_path, f"m{m}")
        model.hotswap_adapter(path)
        torch.testing.assert_close(out(model), out(reference(base, path)), rtol=1e-5, atol=1e-6)


def test_prepare_refuses_what_it_cannot_do(base):
    model = trained(base, "boft", 1, boft_block_size=8, boft_n_butterfly_factor=1)
    before = snapshot(model)
    with pytest.raises(HotswapError, match="butterfly factors"):  # lin a: 2 blocks of 8 allow m <= 2
        prepare_model_for_hotswap(model, target_n_butterfly_factor=3)
    with pytest.raises(HotswapError, match="target_n_frequency"):
        prepare_model_for_hotswap(model, target_n_frequency=50)
    assert_unchanged(model, before)
    fourier = trained(base, "fourierft", 1)
    before = snapshot(fourier)
    with pytest.raises(HotswapError, match=">= its n_frequency"):
        prepare_model_for_hotswap(fourier, target_n_frequency=10)
    with pytest.raises(HotswapError, match="less than or equal"):  # lin a has 32 x 16 = 512 entries
        prepare_model_for_hotswap(fourier, target_n_frequency=513)
    assert_unchanged(fourier, before)
    with pytest.raises(HotswapError, match="before torch.compile"):
        prepare_model_for_hotswap(torch.compile(fourier), target_n_frequency=50)


# ---------------------------------------------------------------------------------------------- refusals
def refusal_cases():
    yield "fourierft", dict(n_frequency=30), "prepare_model_for_hotswap"
    yield "fourierft", dict(random_loc_seed=5), "frequency positions"
    yield "fourierft", dict(frequency_band=[0.2, 0.1]), "frequency positions"
    yield "boft", dict(boft_block_size=8), "same blocks"
    yield "boft", dict(boft_n_butterfly_factor=3), "prepare_model_for_hotswap"
    yield "boft", dict(bias="boft_only"), "bias differs"


@pytest.mark.parametrize("method,kw,message", list(refusal_cases()))
def test_other_geometry_is_refused_and_nothing_changes(base, tmp_path, method, kw, message):
    model = trained(base, method, 1)
    before, expected = snapshot(model), out(model)
    path = saved(trained(base, method, 2, **kw), tmp_path, "bad")
    with pytest.raises(HotswapError, match=message):
        model.hotswap_adapter(path)
    assert_unchanged(model, before)
    torch.testing.assert_close(out(model), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["fourierft", "boft"])
def test_bad_state_dicts_are_refused_before_any_copy(base, method):
    model = trained(base, method, 1)
    before = snapshot(model)
    good = get_peft_model_state_dict(trained(base, method, 2))
    last = sorted(good)[-1]  # layer b: layer a would be copied first if checks and copies were interleaved
    cases = {
        "no place": {**good, "base_model.model.c." + last.split(".")[-1]: good[last]},
        "floating-point": {**good, last: good[last].long()},
        "targets none": {},
    }
    if method == "boft":
        cases["but not"] = {k: v for k, v in good.items() if k != "base_model.model.b.boft_s"}
    else:
        cases["must be 1-D"] = {**good, last: good[last][:3].reshape(3, 1)}
    for message, sd in cases.items():
        with pytest.raises(HotswapError, match=message):
            hotswap_adapter(model, sd)
        assert_unchanged(model, before)
    other = trained(base, "boft" if method == "fourierft" else "fourierft", 3)
    with pytest.raises(HotswapError, match="Cannot swap"):
        hotswap_adapter(model, get_peft_model_state_dict(other), config=other.peft_config["default"])
    with pytest.raises(HotswapError, match="no adapter 'nope'"):
        hotswap_adapter(model, good, "nope")
    model.merge_adapter()
    with pytest.raises(HotswapError, match="merged"):
        hotswap_adapter(model, good)


# ---------------------------------------------------------------------------------------------- compiled
def compiled_swaps(base, tmp_path, method: str, variants: list[dict], prepare: dict) -> tuple[int, list]:
    """Compile once (fullgraph: a graph break raises), then swap each variant in; returns the number of
    compiled frames and, per swap, the compiled output beside a freshly loaded eager reference."""
    model = trained(base, method, 1)
    if prepare:
        prepare_model_for_hotswap(model, **prepare)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    out(compiled)
    assert counter.frame_count == 1
    pairs = []
    for i, kw in enumerate(variants):
        path = saved(trained(base, method, 20 + i, **kw), tmp_path, f"v{i}")
        hotswap_adapter(compiled, path)
        pairs.append((out(compiled), out(reference(base, path))))
    return counter.frame_count, pairs


@pytest.mark.parametrize("method,variants,prepare", [
    ("fourierft", [{}, {"scaling": 20.0}, {"n_frequency": 8}, {"target_modules": ["b"]}, {"n_frequency": 40}],
     {"target_n_frequency": 40}),
    ("boft", [{}, {"boft_n_butterfly_factor": 1}, {"target_modules": ["a"]}, {"boft_n_butterfly_factor": 3}],
     {"target_n_butterfly_factor": 3}),
])
def test_compiled_model_never_recompiles(base, tmp_path, method, variants, prepare):
    frames, pairs = compiled_swaps(base, tmp_path, method, variants, prepare)
    assert frames == 1
    for got, expected in pairs:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # compiled: torch kernels; eager: native


@pytest.mark.parametrize("method", ["fourierft", "boft"])
def test_modules_to_save_are_swapped_too(base, tmp_path, method):
    kw = {"target_modules": ["a"], "modules_to_save": ["b"]}
    model = trained(base, method, 1, **kw)
    source = trained(base, method, 2, **kw)
    with torch.no_grad():
        source.base_model.model.b.modules_to_save["default"].weight.mul_(2.0)
    path = saved(source, tmp_path, "with_head")
    model.hotswap_adapter(path)
    torch.testing.assert_close(out(model), out(reference(base, path)), rtol=1e-5, atol=1e-6)
    before = snapshot(model)
    without = {k: v for k, v in get_peft_model_state_dict(source).items() if not k.startswith("base_model.model.b.")}
    with pytest.raises(HotswapError, match="lacks"):
        hotswap_adapter(model, without)
    assert_unchanged(model, before)
