"""Both methods over bitsandbytes Linear8bitLt and Linear4bit (nf4/fp4, with and without double quantization).

The reference is a plain ``nn.Linear`` holding the de-quantized weight (int8: ``CB * SCB / 127``; 4 bit:
bitsandbytes' ``dequantize_4bit``, the weight the quantized layer multiplies by). Checked: training-step
gradients equal the reference's within the quantization tolerance, training never de-quantizes the weight,
merging re-quantizes within the documented bound (or never silently drops the adapter, as 8-bit merging did),
unmerging and ``unload()`` give back the quantized base bit for bit, save/load, and bad input.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from conftest import per_adapter_outputs  # noqa: E402
from fourierft import BOFTConfig, FourierFTConfig, PeftModel, get_peft_model, quantized  # noqa: E402

KINDS = {
    "int8": dict(bits=8, has_fp16_weights=False),
    "int8-fp16-weights": dict(bits=8, has_fp16_weights=True),
    "nf4": dict(bits=4, quant_type="nf4", compress_statistics=False),
    "nf4-double": dict(bits=4, quant_type="nf4", compress_statistics=True),
    "fp4": dict(bits=4, quant_type="fp4", compress_statistics=False),
    "fp4-double": dict(bits=4, quant_type="fp4", compress_statistics=True),
}
QUANTIZED_KINDS = [k for k in KINDS if k != "int8-fp16-weights"]
METHODS = {
    "fourierft": lambda: FourierFTConfig(target_modules=["lin0", "lin1"], n_frequency=200, scaling=40.0),
    "boft": lambda: BOFTConfig(target_modules=["lin0", "lin1"], boft_block_size=8, boft_n_butterfly_factor=2,
                               init_weights=False),
}
#: bitsandbytes' 4-bit CPU inference kernel (on AVX512-BF16 CPUs) computes in bfloat16.
EVAL_4BIT_RTOL = 2e-2
#: Half the largest gap between neighbouring code values, in units of the block's absmax (docs/quantized.md).
HALF_STEP = {"nf4": 0.1519, "fp4": 0.1667}


def quantize(linear: nn.Linear, kind: str) -> nn.Module:
    opts = dict(KINDS[kind])
    if opts.pop("bits") == 8:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None, **opts)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch.float32, **opts)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # bitsandbytes quantizes on the move to a device


class Net(nn.Module):
    def __init__(self, lin0: nn.Module, lin1: nn.Module) -> None:
        super().__init__()
        self.lin0, self.act, self.lin1 = lin0, nn.GELU(), lin1

    def forward(self, x):
        return self.lin1(self.act(self.lin0(x)))


def _linears(seed: int = 0) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(seed)
    return nn.Linear(64, 64), nn.Linear(64, 32)  # bitsandbytes packs 4-bit CPU weights in blocks of 32 rows


def quantized_net(kind: str, seed: int = 0) -> Net:
    lin0, lin1 = _linears(seed)
    return Net(quantize(lin0, kind), quantize(lin1, kind))


def dequantized(layer: nn.Module) -> torch.Tensor:
    """The weight a quantized layer multiplies by, computed here from bitsandbytes' stored fields."""
    w = layer.weight
    if isinstance(layer, bnb.nn.Linear8bitLt):
        if w.dtype != torch.int8:
            return w.data.float()
        scb = w.SCB if getattr(w, "SCB", None) is not None else layer.state.SCB
        return w.data.float() * scb.float()[:, None] / 127
    return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()


def reference_net(net: Net) -> Net:
    """Plain Linear layers holding the de-quantized weights."""
    layers = []
    for q in (net.lin0, net.lin1):
        lin = nn.Linear(q.in_features, q.out_features)
        lin.weight.data, lin.bias.data = dequantized(q).clone(), q.bias.data.float().clone()
        layers.append(lin)
    return Net(*layers)


def _x(rows: int = 12) -> torch.Tensor:
    return torch.randn(rows, 64, generator=torch.Generator().manual_seed(7))


def _stored(layer: nn.Module) -> list[torch.Tensor]:
    """The quantized layer's stored tensors (to compare bit for bit)."""
    w = layer.weight
    if isinstance(layer, bnb.nn.Linear8bitLt):
        scb = getattr(w, "SCB", None)
        return [w.data.clone()] + ([(scb if scb is not None else layer.state.SCB).clone()] if w.dtype == torch.int8 else [])
    return [w.data.clone(), w.quant_state.absmax.clone()]


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_train_step_gradients_equal_the_dequantized_reference(kind, method):
    net = quantized_net(kind)
    ref = reference_net(net)
    torch.manual_seed(1)
    model = get_peft_model(net, METHODS[method]())
    torch.manual_seed(1)
    ref_model = get_peft_model(ref, METHODS[method]())
    model.train(), ref_model.train()
    x, target = _x(), torch.randn(12, 32, generator=torch.Generator().manual_seed(8))
    nn.functional.mse_loss(model(x), target).backward()
    nn.functional.mse_loss(ref_model(x), target).backward()
    got = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    want = {k: p.grad for k, p in ref_model.named_parameters() if p.requires_grad}
    assert sorted(got) == sorted(want) and got
    # 4 bit multiplies by exactly the de-quantized weight; int8 also rounds the activations to int8 rows
    rtol = 3e-2 if kind.startswith("int8") else 1e-4
    for key in got:
        scale = want[key].abs().max().item()
        torch.testing.assert_close(got[key], want[key], atol=rtol * scale, rtol=rtol)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["int8", "nf4-double"])
def test_training_never_dequantizes_the_weight(kind, method, monkeypatch):
    model = get_peft_model(quantized_net(kind), METHODS[method]())
    model.train()
    calls = []
    monkeypatch.setattr(quantized, "dense_weight", lambda m: calls.append(m) or pytest.fail("dequantized"))
    model(_x()).square().sum().backward()
    assert not calls


@pytest.mark.parametrize("method", METHODS)
def test_training_after_inference_still_reaches_every_adapter(method):
    """bitsandbytes repacks 4-bit CPU weights on an inference forward (AVX512-BF16) into a layout without
    backward; the adapter layers unpack them for training, so the first layer's adapter still gets its gradient."""
    x, target = _x(), torch.randn(12, 32, generator=torch.Generator().manual_seed(8))
    grads = []
    for infer_first in (False, True):
        torch.manual_seed(1)
        config = METHODS[method]()
        config.target_modules = ["lin0"]  # the gradient must pass through the unadapted 4-bit lin1
        model = get_peft_model(quantized_net("nf4"), config)
        if infer_first:
            model.eval()
            with torch.no_grad():
                model(x)
            layer = model.base_model.model.lin0.get_base_layer()
            assert quantized.is_repacked(layer) == bool(layer.support_avx512bf16_for_cpu)
        model.train()
        nn.functional.mse_loss(model(x), target).backward()
        grads.append({k: p.grad for k, p in model.named_parameters() if p.requires_grad and ".lin0." in k})
    for key, want in grads[0].items():
        got = grads[1][key]
        assert got is not None
        torch.testing.assert_close(got, want, atol=EVAL_4BIT_RTOL * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_mixed_batch_and_disable_over_a_quantized_base(kind, method):
    torch.manual_seed(2)
    model = get_peft_model(quantized_net(kind), METHODS[method]())
    model.add_adapter("other", METHODS[method]())
    model.train()  # the un-repacked 4-bit kernel: per-sample rows are then comparable exactly
    names = ["other", "__base__", "default", "other"]
    mixed, single = per_adapter_outputs(model, _x(4), names)
    tol = 3e-2 if kind == "int8" else 1e-5  # int8 rounds each activation row with the batch's own scale
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], single[name][i], atol=tol * single[name].abs().max().item(), rtol=0)
    assert (single["default"] - single["__base__"]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_merge_requantizes_within_the_bound_and_unmerge_is_exact(kind, method):
    model = get_peft_model(quantized_net(kind), METHODS[method]())
    model.eval()
    layers = [model.base_model.model.lin0, model.base_model.model.lin1]
    x = _x()
    with torch.no_grad():
        # before any inference forward: on an AVX512-BF16 CPU that repacks a 4-bit weight in place
        want = [layer.merged_weight("default", dequantized(layer.get_base_layer())) for layer in layers]
        unmerged = model(x)
        stored = [_stored(layer.get_base_layer()) for layer in layers]
        with pytest.warns(UserWarning, match="re-quantiz") if kind in QUANTIZED_KINDS else _no_warning():
            model.merge_adapter()
        for layer, w in zip(layers, want):
            got = dequantized(layer.get_base_layer())
            assert (got - w).abs().max() <= _bound(kind, w)
        merged = model(x)
        assert (merged - unmerged).abs().max() > 0 or kind == "int8-fp16-weights"
        assert (merged - unmerged).abs().max() <= 0.25 * unmerged.abs().max()
        model.unmerge_adapter()
        for layer, old in zip(layers, stored):
            for a, b in zip(_stored(layer.get_base_layer()), old):
                torch.testing.assert_close(a, b, atol=0, rtol=0) if kind != "int8-fp16-weights" else None
        torch.testing.assert_close(model(x), unmerged, atol=1e-4 * unmerged.abs().max().item(), rtol=1e-4)


def _bound(kind: str, weight: torch.Tensor) -> float:
    """Largest rounding a re-quantization may leave on ``weight`` (per element, on the whole tensor)."""
    if kind == "int8-fp16-weights":
        return 1e-6 * weight.abs().max().item()
    if kind == "int8":
        return (weight.abs().amax(1) / 254).max().item() * 1.01 + 1e-3 * weight.abs().max().item()
    blocks = weight.reshape(-1, 64).abs().amax(1)
    slack = 1.10 if kind.endswith("double") else 1.001  # double quantization rounds the absmax too (8 bit)
    return (blocks * HALF_STEP[kind.split("-")[0]]).max().item() * slack


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_keeps_the_adapter_and_the_quantized_type(kind, method):
    """Regression: 8-bit merge_and_unload used to leave the int8 weight unchanged and drop the adapter."""
    net = quantized_net(kind)
    dense = reference_net(net)
    classes = (type(net.lin0), type(net.lin1))
    torch.manual_seed(1)
    model = get_peft_model(net, METHODS[method]())
    torch.manual_seed(1)  # the same adapter on float32 copies of the layers: W + dW as the forward applies it
    dense = get_peft_model(dense, METHODS[method]()).base_model.model
    want = [layer.get_base_layer().weight + forward_delta(layer) for layer in (dense.lin0, dense.lin1)]
    model.eval()
    x = _x()
    with torch.no_grad():
        unmerged = model(x)
        with model.disable_adapter():
            base = model(x)
        merged_model = model.merge_and_unload()
        assert (type(merged_model.lin0), type(merged_model.lin1)) == classes
        for layer, w in zip((merged_model.lin0, merged_model.lin1), want):  # the whole change, rounded once
            assert (dequantized(layer) - w).abs().max() <= _bound(kind, w)  # (before a forward repacks it)
        merged = merged_model(x)
    assert (unmerged - base).abs().max() > 0.05 * base.abs().max()
    assert (merged - unmerged).abs().max() < 0.5 * (unmerged - base).abs().max()


def forward_delta(layer: nn.Module) -> torch.Tensor:
    """``dW`` read off the adapter layer's forward on the identity (``layer(I) - base(I)`` is ``dW^T``),
    independent of ``merged_weight``, the code under test."""
    eye = torch.eye(layer.get_base_layer().in_features)
    with torch.no_grad():
        return (layer(eye) - layer.get_base_layer()(eye)).T


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["int8", "fp4-double"])
def test_unload_gives_back_the_quantized_base(kind, method):
    net = quantized_net(kind)
    stored = [_stored(net.lin0), _stored(net.lin1)]
    classes = (type(net.lin0), type(net.lin1))
    model = get_peft_model(net, METHODS[method]())
    model.eval()
    with torch.no_grad():
        model.merge_adapter()
        base = model.unload()
    assert (type(base.lin0), type(base.lin1)) == classes
    for layer, old in zip((base.lin0, base.lin1), stored):
        for a, b in zip(_stored(layer), old):
            assert torch.equal(a, b)


@pytest.mark.parametrize("method", METHODS)
def test_dequantize_model_merges_into_a_full_precision_copy(method):
    model = get_peft_model(quantized_net("nf4"), METHODS[method]())
    model.eval()
    x = _x()
    with torch.no_grad():
        unmerged = model(x)
        quantized.dequantize_model(model)
        assert type(model.base_model.model.lin0.get_base_layer()) is nn.Linear
        dense = model(x)
        # bitsandbytes' 4-bit CPU inference kernel (AVX512-BF16) works in bfloat16: about 1% apart
        torch.testing.assert_close(dense, unmerged, atol=EVAL_4BIT_RTOL * unmerged.abs().max().item(), rtol=0)
        merged = model.merge_and_unload()
        assert type(merged.lin0) is nn.Linear
        torch.testing.assert_close(merged(x), dense, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["int8", "nf4", "fp4-double"])
def test_save_load_round_trip_over_a_quantized_base(kind, method, tmp_path):
    torch.manual_seed(3)
    model = get_peft_model(quantized_net(kind), METHODS[method]())
    model.eval()
    x = _x()
    with torch.no_grad():
        out = model(x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(quantized_net(kind), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out, atol=1e-5 * out.abs().max().item(), rtol=1e-5)
    full = PeftModel.from_pretrained(reference_net(quantized_net(kind)), tmp_path).eval()  # same file, dense base
    with torch.no_grad():
        tol = 3e-2 if kind == "int8" else EVAL_4BIT_RTOL
        torch.testing.assert_close(full(x), out, atol=tol * out.abs().max().item(), rtol=tol)


def test_parameter_counts_count_4bit_weights_not_bytes():
    """PEFT counts a packed 4-bit weight as its number of values (two per byte); so does this library."""
    counts = [get_peft_model(net, METHODS["fourierft"]()).get_nb_trainable_parameters()
              for net in (reference_net(quantized_net("nf4")), quantized_net("nf4"))]
    assert counts[0] == counts[1]


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_bitsandbytes_is_a_clear_error_and_changes_nothing(monkeypatch):
    net = quantized_net("nf4")
    modules = list(net.modules())
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(ImportError, match=r"Target module lin0 \(Linear4bit\) needs bitsandbytes.*fourierft\[quantized\]"):
        get_peft_model(net, METHODS["fourierft"]())
    assert list(net.modules()) == modules and not hasattr(net, "peft_config")


@pytest.mark.parametrize("method, make, match", [
    ("fourierft", lambda: bnb.nn.StableEmbedding(10, 8), r"0 is a bitsandbytes StableEmbedding, which is not supported"),
    ("fourierft", lambda: bnb.nn.Embedding8bit(10, 8), r"0 is a bitsandbytes Embedding8bit, which is not supported"),
    ("boft", lambda: bnb.nn.StableEmbedding(10, 8), r"0 \(StableEmbedding\) is not supported by BOFTModel"),
])
def test_unsupported_bitsandbytes_layers_raise_named_errors(method, make, match):
    model = nn.Sequential(make())
    modules = list(model.modules())
    config = (FourierFTConfig(target_modules=["0"], n_frequency=4) if method == "fourierft"
              else BOFTConfig(target_modules=["0"], boft_block_size=2))
    with pytest.raises(TypeError, match=match):
        get_peft_model(model, config)
    assert list(model.modules()) == modules


def test_importing_fourierft_does_not_import_bitsandbytes():
    code = "import sys, fourierft; print('bitsandbytes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
