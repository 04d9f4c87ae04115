"""The merged path (one GEMM on W + dW, spectrum gradient from sampled products), the native CPU kernels and
their torch fallbacks, the path choice, and the merged-weight cache of FourierFT layers.

Every path is checked against the dense definition (PEFT's ``Re(ifft2(S))``, built with
``dense_delta_weight`` and differentiated by autograd) on odd, prime and non-square shapes.
"""

import pytest
import torch

import fourierft
from fourierft import FourierFTConfig
from fourierft.ops import _native, spectral
from fourierft.ops.spectral import (dense_delta_weight, delta_weight, forced_path, frequency_indices,
                                    linear_spectral_apply, make_spectral_plan, merged_weight)

SHAPES = [  # (d_out, d_in, entry counts per adapter): odd, prime, non-square, tiny, n close to d_out * d_in
    (11, 6, [9, 20]), (13, 17, [50]), (7, 7, [49]), (64, 48, [300, 100]), (5, 1, [3]), (1, 9, [4]), (2, 2, [4]),
    (31, 37, [1000]),
]


@pytest.fixture(params=["native", "torch"])
def kernels(request, monkeypatch):
    """Run a test with the native CPU kernels, then with the torch implementation they replace."""
    if request.param == "native":
        if not _native.available():
            pytest.skip(f"native kernels unavailable here: {_native.status()}")
    else:
        monkeypatch.setattr(_native, "available", lambda: False)
    return request.param


def _case(d_out, d_in, ns, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    idx = [frequency_indices(d_out, d_in, n, i) for i, n in enumerate(ns)]
    plans = [make_spectral_plan(i, d_out, d_in) for i in idx]
    w = torch.randn(d_out, d_in, generator=gen, dtype=dtype)
    bias = torch.randn(d_out, generator=gen, dtype=dtype)
    spectra = [torch.randn(n, generator=gen, dtype=dtype, requires_grad=True) for n in ns]
    scalings = [2.0, -3.0][: len(ns)]
    return idx, plans, w, bias, spectra, scalings


def _reference(x, w, bias, spectra, idx, scalings):
    d_out, d_in = w.shape
    dw = sum(dense_delta_weight(c, i, d_out, d_in, a) for c, i, a in zip(spectra, idx, scalings))
    return torch.nn.functional.linear(x, w + dw, bias)


@pytest.mark.parametrize("d_out,d_in,ns", SHAPES)
def test_delta_weight_equals_dense_definition(d_out, d_in, ns):
    idx, plans, w, _, spectra, scalings = _case(d_out, d_in, ns)
    want = sum(dense_delta_weight(c, i, d_out, d_in, a) for c, i, a in zip(spectra, idx, scalings))
    torch.testing.assert_close(delta_weight(spectra, plans, scalings, torch.float64), want.detach(),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(merged_weight(w.t().contiguous(), spectra, plans, scalings, transposed=True),
                               w + want.detach(), rtol=0, atol=1e-12)
    f32 = delta_weight([c.float() for c in spectra], plans, scalings)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), want.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["merged", "spectral"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("d_out,d_in,ns", SHAPES)
def test_paths_equal_dense_definition(kernels, path, transposed, d_out, d_in, ns):
    """Outputs, input gradients and every spectrum's gradient, float64, both weight layouts."""
    idx, plans, w, bias, spectra, scalings = _case(d_out, d_in, ns, seed=d_out * d_in)
    x = torch.randn(3, 5, d_in, dtype=torch.float64, requires_grad=True)
    weight = w.t().contiguous() if transposed else w
    y = linear_spectral_apply(x, weight, bias, spectra, plans, scalings, transposed=transposed, path=path)
    ref = _reference(x, w, bias, spectra, idx, scalings)
    torch.testing.assert_close(y, ref)
    gy = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(y, [x, *spectra], gy), torch.autograd.grad(ref, [x, *spectra], gy)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("path", ["merged", "spectral"])
def test_paths_gradcheck(kernels, path):
    idx, plans, w, bias, spectra, scalings = _case(13, 17, [40, 25])
    x = torch.randn(2, 4, 17, dtype=torch.float64, requires_grad=True)
    fn = lambda x, c0, c1: linear_spectral_apply(x, w, bias, [c0, c1], plans, scalings, path=path)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, *spectra))


def test_float32_many_tokens_native_equals_torch(monkeypatch):
    """Enough tokens for several token blocks and threads: the two implementations agree in float32."""
    d_out, d_in, n = 96, 70, 700
    idx, plans, w, bias, spectra, scalings = _case(d_out, d_in, [n], dtype=torch.float32)
    x = torch.randn(700, d_in, requires_grad=True)
    results = {}
    for impl in ("native", "torch"):
        if impl == "torch":
            monkeypatch.setattr(_native, "available", lambda: False)
        elif not _native.available():
            continue
        for path in ("merged", "spectral"):
            y = linear_spectral_apply(x, w, bias, spectra, plans, scalings, path=path)
            results[impl, path] = (y, *torch.autograd.grad(y.square().sum(), [x, *spectra]))
    ref = _reference(x.double(), w.double(), bias.double(), [s.double() for s in spectra], idx, scalings)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *spectra])
    for key, (y, *grads) in results.items():
        torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4, msg=str(key))
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-3, atol=1e-2, msg=str(key))


def test_zero_tokens_and_frozen_spectra():
    idx, plans, w, bias, spectra, scalings = _case(11, 6, [9])
    x = torch.randn(0, 6, dtype=torch.float64, requires_grad=True)
    y = linear_spectral_apply(x, w, bias, spectra, plans, scalings, path="merged")
    assert y.shape == (0, 11)
    gx, gc = torch.autograd.grad(y.sum(), [x, spectra[0]], allow_unused=True)
    assert gx.shape == x.shape and torch.equal(gc, torch.zeros_like(gc))
    frozen = [s.detach() for s in spectra]
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = linear_spectral_apply(x, w, bias, frozen, plans, scalings, path="merged")
    assert all(t.data_ptr() != x.data_ptr() for t in saved)  # x is saved only for a spectrum gradient
    gx, = torch.autograd.grad(y.sum(), [x])
    torch.testing.assert_close(gx, torch.autograd.grad(_reference(x, w, bias, frozen, idx, scalings).sum(), [x])[0])


def test_linear_spectral_apply_validation():
    idx, plans, w, bias, spectra, scalings = _case(11, 6, [9])
    x = torch.randn(2, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown path 'dense'"):
        linear_spectral_apply(x, w, bias, spectra, plans, scalings, path="dense")
    with pytest.raises(ValueError, match=r"merged must be a \(11, 6\) torch.float64 tensor"):
        linear_spectral_apply(x, w, bias, spectra, plans, scalings, merged=torch.zeros(6, 11, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown path"):
        with forced_path("fast"):
            pass


def test_forced_path_reaches_each_path_and_results_agree(monkeypatch):
    """Every path choose_path can return is reachable through forced_path, and all give the same result."""
    taken = []
    for name in ("_MergedLinearApply", "_LinearSpectralApply", "_SpectralApply"):
        cls = getattr(spectral, name)
        monkeypatch.setattr(cls, "apply", (lambda real, n: lambda *a: taken.append(n) or real(*a))(cls.apply, name))
    idx, plans, w, bias, spectra, scalings = _case(13, 17, [60])
    x = torch.randn(6, 17, dtype=torch.float64)
    outs = {}
    for path in ("merged", "spectral"):
        with forced_path(path):
            outs["fused", path] = linear_spectral_apply(x, w, bias, spectra, plans, scalings)
    with torch.no_grad():
        for path in ("dense", "spectral"):
            with forced_path(path):
                outs["delta", path] = torch.nn.functional.linear(x, w, bias) + spectral.spectral_apply(
                    x, spectra, plans, scalings, 13)
    assert taken == ["_MergedLinearApply", "_LinearSpectralApply", "_SpectralApply"]  # dense: no op at all
    ref = _reference(x, w, bias, spectra, idx, scalings).detach()
    for key, out in outs.items():
        torch.testing.assert_close(out.detach(), ref, msg=str(key))


def test_native_kernels_report_why_they_are_off(monkeypatch):
    monkeypatch.setattr(_native, "_STATE", {})
    monkeypatch.setenv("FOURIERFT_NATIVE", "0")
    assert not _native.available() and "FOURIERFT_NATIVE=0" in _native.status()
    with pytest.raises(RuntimeError, match="native kernels unavailable"):
        _native.pair_products(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.int32),
                              torch.zeros(1, dtype=torch.int32))
    monkeypatch.setattr(_native, "_STATE", {})
    monkeypatch.setenv("FOURIERFT_NATIVE", "1")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert not _native.available() and "no C compiler" in _native.status()
    # the layers still train, through the torch implementation
    _, plans, w, bias, spectra, scalings = _case(11, 6, [9])
    linear_spectral_apply(torch.randn(3, 6, dtype=torch.float64), w, bias, spectra, plans, scalings,
                          path="merged").sum().backward()
    assert spectra[0].grad is not None


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_native_kernels_work_in_a_forked_child():
    """A child forked after the parent used the thread pool (a DataLoader worker, a forked launcher) still runs
    the kernels, on a pool of its own."""
    import os

    if not _native.available():
        pytest.skip(f"native kernels unavailable here: {_native.status()}")
    r, g = torch.randn(1024, 10), torch.randn(1024, 10)
    a, b = torch.tensor([0, 3, 9], dtype=torch.int32), torch.tensor([1, 1, 2], dtype=torch.int32)
    want = (r[:, a.long()] * g[:, b.long()]).sum(0)
    with torch.no_grad():
        torch.testing.assert_close(_native.pair_products(r, g, a, b), want, rtol=1e-5, atol=1e-4)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: a hang here would time the test out instead of passing
        ok = torch.allclose(_native.pair_products(r, g, a, b), want, rtol=1e-5, atol=1e-4)
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"


# ------------------------------------------------------------------------------------ layers and the cache
def _model(d=48, n=200, conv1d=False):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(d, d) if conv1d else torch.nn.Linear(d, d)
    config = FourierFTConfig(target_modules=["0"], n_frequency=n, init_weights=False, scaling=10.0)
    return fourierft.get_peft_model(torch.nn.Sequential(layer), config).train()


def _layer(model):
    return model.base_model.model[0]


def _dense_output(model, x):
    layer = _layer(model)
    w = layer.base_layer.weight.detach()
    w = w.t() if layer.fan_in_fan_out else w
    delta = layer.get_delta_weight("default").detach()
    return torch.nn.functional.linear(x, w + delta, layer.base_layer.bias)


@pytest.mark.parametrize("conv1d", [False, True])
def test_layer_takes_the_merged_path_and_matches(conv1d, monkeypatch):
    model = _model(conv1d=conv1d)
    builds = []
    real = spectral.merged_weight
    monkeypatch.setattr(spectral, "merged_weight", lambda *a, **k: builds.append(1) or real(*a, **k))
    x = torch.randn(4, 300, 48, requires_grad=True)
    assert spectral.choose_path(1200, 48, 48, 200, True, fused=True) == "merged"
    y = model(x)
    torch.testing.assert_close(y, _dense_output(model, x), rtol=1e-5, atol=1e-5)
    spectrum = _layer(model).fourierft_spectrum["default"]
    got = torch.autograd.grad(y.square().sum(), [x, spectrum])
    with forced_path("spectral"):
        y2 = model(x)
    want = torch.autograd.grad(y2.square().sum(), [x, spectrum])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert builds == [1]


def test_gradient_accumulation_reuses_merged_weight_until_the_optimizer_step(monkeypatch):
    model = _model()
    builds = []
    real = spectral.merged_weight
    monkeypatch.setattr(spectral, "merged_weight", lambda *a, **k: builds.append(1) or real(*a, **k))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    xs = [torch.randn(2, 400, 48) for _ in range(3)]
    with forced_path("merged"):
        for x in xs:  # three micro-batches, one build
            model(x).square().mean().backward()
        assert builds == [1]
        opt.step()
        opt.zero_grad()
        y = model(xs[0])  # the spectrum changed: rebuilt, and equal to the dense definition
        assert builds == [1, 1]
        torch.testing.assert_close(y, _dense_output(model, xs[0]), rtol=1e-5, atol=1e-5)
        spectrum = _layer(model).fourierft_spectrum["default"]
        spectrum.data.mul_(0.5)  # a write that bypasses the version counter is still seen
        torch.testing.assert_close(model(xs[0]), _dense_output(model, xs[0]), rtol=1e-5, atol=1e-5)
        assert builds == [1, 1, 1]
        model.eval()  # eval drops the kept weight; inference with the default policy keeps none
        assert _layer(model)._merged_cache is None
        with torch.no_grad():
            model(xs[0])
            model(xs[0])
        assert builds == [1] * 5 and _layer(model)._merged_cache is None  # built per call, not kept


def test_merged_weight_cache_modes():
    model = _model()
    layer = _layer(model)
    x = torch.randn(1, 3, 48)
    assert fourierft.set_merged_weight_cache(model, "always") == 1
    model.eval()
    with torch.no_grad():
        y = model(x)  # a few tokens, but with "always" the weight is built once and kept
    assert layer._merged_cache is not None
    torch.testing.assert_close(y, _dense_output(model, x), rtol=1e-5, atol=1e-5)
    kept = layer._merged_cache[2]
    with torch.no_grad():
        model(x)
    assert layer._merged_cache[2] is kept
    model.merge_adapter()  # merging drops it (the base weight changes)
    assert layer._merged_cache is None
    model.unmerge_adapter()
    fourierft.set_merged_weight_cache(model, "off")
    model.train()
    with forced_path("merged"):
        model(torch.randn(2, 300, 48)).sum().backward()
    assert layer._merged_cache is None
    with pytest.raises(ValueError, match="unknown merged-weight cache mode 'sometimes'"):
        fourierft.set_merged_weight_cache(model, "sometimes")
    with pytest.raises(ValueError, match="holds no FourierFT linear layer"):
        fourierft.set_merged_weight_cache(torch.nn.Linear(2, 2), "off")


def test_trainer_style_train_calls_keep_the_cache():
    """transformers' Trainer calls model.train() before every micro-batch: that must not drop the kept weight."""
    model = _model()
    with forced_path("merged"):
        model(torch.randn(2, 300, 48)).sum().backward()
        kept = _layer(model)._merged_cache
        model.train()
        assert _layer(model)._merged_cache is kept


def test_checkpoint_recompute_takes_the_original_path():
    """A layer used twice in one forward (short and long input, e.g. a shared encoder) under non-reentrant
    checkpointing: the recompute of the short call must not switch to the merged path because the long call
    kept W + dW (the saved tensors would then be read as the wrong path's)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    config = FourierFTConfig(target_modules=["0"], n_frequency=1000, init_weights=False, scaling=10.0)
    model = fourierft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(384, 384)), config).train()
    short, long = torch.randn(20, 384, requires_grad=True), torch.randn(600, 384, requires_grad=True)
    assert spectral.choose_path(20, 384, 384, 1000, True, fused=True) == "spectral"
    assert spectral.choose_path(600, 384, 384, 1000, True, fused=True) == "merged"

    def loss(fn):
        return fn(short).square().sum() + fn(long).square().sum()

    want = torch.autograd.grad(loss(model), [short, long])
    model.base_model.model[0].drop_merged_cache()  # the short call runs first with nothing kept
    got = torch.autograd.grad(loss(lambda x: checkpoint(model, x, use_reentrant=False)), [short, long])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_accelerate_hooks_run_in_inference():
    """accelerate replaces a module's forward (device_map offload): the base layer must run as a module."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    model = _model()
    calls = []

    class Count(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(1)
            return args, kwargs

    add_hook_to_module(_layer(model).base_layer, Count())
    x = torch.randn(2, 300, 48)
    with torch.no_grad():
        y = model(x)
    model(x.requires_grad_()).sum().backward()
    assert calls == [1, 1]
    torch.testing.assert_close(y, _dense_output(model, x).detach(), rtol=1e-5, atol=1e-5)


def test_cache_lifetime_inference_mode_moves_and_copies():
    import copy

    model = _model()
    layer = _layer(model)
    fourierft.set_merged_weight_cache(model, "always")
    x = torch.randn(2, 300, 48)
    with torch.inference_mode():  # inference tensors have no version counter: nothing is kept
        model(x)
    assert layer._merged_cache is None
    model.train()
    model(x).sum().backward()  # and a training forward after it works
    assert layer._merged_cache is not None
    assert copy.deepcopy(model).base_model.model[0]._merged_cache is None  # copies do not carry it
    assert layer._merged_cache is not None
    model.to("cpu")  # a move drops it (it would stay on the old device)
    assert layer._merged_cache is None
    fourierft.set_merged_weight_cache(model, "train")
    with forced_path("merged"):
        model(x).sum().backward()
    assert layer._merged_cache is not None
    with forced_path("spectral"):  # a forward on the spectral path frees it
        model(x).sum().backward()
    assert layer._merged_cache is None
