"""Contract tests for fourierft.ops.spectral and the op: PEFT golden values, every route == the dense maths.

The reference is PEFT's definition, ``scaling * Re(ifft2(S))``, written here (:func:`dense_delta_weight`) and
nowhere in ``src/``: the library builds ``dW`` one way (:func:`fourierft.ops.spectral.delta_weight`)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from fourierft.ops import _native
from fourierft.ops.spectral import (
    SpectralPlan,
    band_frequency_indices,
    delta_weight,
    frequency_indices,
    make_spectral_plan,
)
from fourierft.ops.spectral_op import fourierft_linear
from fourierft.ops.spectral_routes import choose_route, route_costs


def dense_delta_weight(spectrum, indices, d_out, d_in, scaling):
    """PEFT's definition, ``scaling * Re(ifft2(S))`` with ``S[p, q] = c`` (float64; differentiable)."""
    dense = torch.zeros(d_out, d_in, dtype=torch.float64).index_put((indices[0], indices[1]), spectrum.double())
    return (torch.fft.ifft2(dense).real * scaling).to(spectrum.dtype)


def spectral_apply(x, spectra, plans, scalings, d_out, route=None):
    """``x @ dW^T`` through the op (no base weight); ``route`` forces one."""
    assert all(p.d_out == d_out for p in plans)
    return fourierft_linear(x, spectra, plans, scalings, route=route)


def spectral_apply_per_sample(x, spectra, plan, scalings, slots):
    return fourierft_linear(x, spectra, [plan] * len(spectra), scalings, slots=slots)


def linear_spectral_apply(x, w, bias, spectra, plans, scalings, transposed=False, route=None):
    return fourierft_linear(x, spectra, plans, scalings, weight=w, bias=bias, transposed=transposed, route=route)


def _no_native(monkeypatch):
    monkeypatch.setitem(_native._STATE, "lib", None)
    monkeypatch.setitem(_native._STATE, "reason", "off for this test")


@pytest.fixture(params=["native", "torch"])
def kernels(request, monkeypatch):
    """Both implementations of the CPU token maps: the C kernels and the torch bodies every other device runs."""
    if request.param == "native" and not _native.available():
        pytest.skip(f"native kernels unavailable here: {_native.status()}")
    if request.param == "torch":
        _no_native(monkeypatch)
    return request.param

# ---------------------------------------------------------------- indices (PEFT compatibility)

GOLDEN_FLAT = [  # peft-compat.md section 5.1 (torch 2.13)
    ((64, 64, 8, 777), [2151, 945, 3161, 4091, 1983, 1566, 3683, 2858]),
    ((20, 12, 6, 42), [102, 3, 132, 115, 218, 160]),
    ((4096, 4096, 5, 777), [1374311, 8240085, 6766295, 6474818, 14786199]),
    ((128, 64, 5, 0), [2732, 2171, 6295, 4563, 8067]),
]


@pytest.mark.parametrize("shape, flat", GOLDEN_FLAT)
def test_frequency_indices_golden(shape, flat):
    d_out, d_in, n, seed = shape
    idx = frequency_indices(d_out, d_in, n, seed)
    assert idx.dtype == torch.int64 and idx.shape == (2, n)
    assert (idx[0] * d_in + idx[1]).tolist() == flat


def test_frequency_indices_golden_rows_cols():
    idx = frequency_indices(64, 64, 8, 777)
    assert idx[0].tolist() == [33, 14, 49, 63, 30, 24, 57, 44]
    assert idx[1].tolist() == [39, 49, 25, 59, 63, 30, 35, 42]


@pytest.mark.parametrize("d_out, d_in, n, seed", [(16, 24, 50, 0), (7, 3, 21, 5), (33, 65, 1, 123)])
def test_frequency_indices_match_peft(d_out, d_in, n, seed):
    from peft import FourierFTConfig
    from peft.tuners.fourierft.layer import FourierFTLinear

    config = FourierFTConfig(n_frequency=n, random_loc_seed=seed, target_modules=["x"])
    layer = FourierFTLinear(torch.nn.Linear(d_in, d_out), "default", config=config, n_frequency=n)
    assert torch.equal(frequency_indices(d_out, d_in, n, seed), layer.indices["default"])
    spectrum = torch.randn(n)
    with torch.no_grad():
        layer.fourierft_spectrum["default"].copy_(spectrum)
        expected = layer.get_delta_weight("default")
    got = dense_delta_weight(spectrum, layer.indices["default"], d_out, d_in, config.scaling)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("n", [0, -1, 13])
def test_frequency_indices_rejects_bad_count(n):
    with pytest.raises(ValueError, match=rf"n_frequency={n}.*\[1, 12\]"):
        frequency_indices(3, 4, n, 0)


@pytest.mark.parametrize("build", ["library", "reference"])
def test_delta_weight_golden(build):
    idx = frequency_indices(4, 3, 3, 777)
    assert idx.tolist() == [[3, 2, 1], [2, 1, 0]]
    c = torch.tensor([1.0, 2.0, 3.0])
    if build == "library":
        dw = delta_weight([c], [make_spectral_plan(idx, 4, 3).weight], [150.0])
    else:
        dw = dense_delta_weight(c, idx, 4, 3, 150.0).float()
    expected = torch.tensor([[75, 18.75, 18.75], [-25, 1.6747, 23.3253],
                             [-25, -43.75, -43.75], [-25, 23.3253, 1.6747]])
    torch.testing.assert_close(dw, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(6, 5), (7, 7), (13, 4), (2, 17)])
def test_delta_weight_keeps_float64_and_matches_closed_form(shape):
    (d_out, d_in), n, a = shape, 9, 2.0
    idx = frequency_indices(d_out, d_in, n, 3)
    c = torch.randn(n, dtype=torch.float64)
    dw = delta_weight([c], [make_spectral_plan(idx, d_out, d_in).weight], [a])
    j, k = torch.meshgrid(torch.arange(d_out), torch.arange(d_in), indexing="ij")
    p, q = idx.double()[:, :, None, None]
    phase = 2 * math.pi * (p * j / d_out + q * k / d_in)
    closed = a / (d_out * d_in) * (c[:, None, None] * torch.cos(phase)).sum(0)
    assert dw.dtype == torch.float64
    torch.testing.assert_close(dw, closed, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- band ("frequency bias") indices


def _mean_radius(idx, d_out, d_in):
    fp = torch.minimum(idx[0], d_out - idx[0]).double() / d_out
    fq = torch.minimum(idx[1], d_in - idx[1]).double() / d_in
    return torch.sqrt(fp**2 + fq**2).mean().item()


def test_band_indices_deterministic_unique_in_range():
    a = band_frequency_indices(48, 40, 300, 7, center=0.2, width=0.05)
    b = band_frequency_indices(48, 40, 300, 7, center=0.2, width=0.05)
    assert torch.equal(a, b) and a.shape == (2, 300) and a.dtype == torch.int64
    assert (a[0] * 40 + a[1]).unique().numel() == 300
    assert a[0].min() >= 0 and a[0].max() < 48 and a[1].min() >= 0 and a[1].max() < 40
    assert not torch.equal(a, band_frequency_indices(48, 40, 300, 8, center=0.2, width=0.05))


@pytest.mark.parametrize("center", [0.05, 0.25, 0.45])
def test_band_indices_concentrate_on_the_band(center):
    idx = band_frequency_indices(128, 96, 200, 0, center=center, width=0.02)
    assert abs(_mean_radius(idx, 128, 96) - center) < 0.02


def test_band_indices_low_vs_high_and_full_draw():
    low = _mean_radius(band_frequency_indices(64, 64, 100, 1, 0.0, 0.1), 64, 64)
    high = _mean_radius(band_frequency_indices(64, 64, 100, 1, 0.6, 0.1), 64, 64)
    assert low < 0.15 < 0.45 < high
    full = band_frequency_indices(9, 7, 63, 2, center=0.7, width=1e-3)  # tiny weights survive
    assert (full[0] * 7 + full[1]).sort().values.tolist() == list(range(63))


def test_band_indices_equal_torch_multinomial():
    from fourierft.ops.spectral import _radial_band_weights

    w = _radial_band_weights(24, 18, 0.3, 0.1)
    flat = torch.multinomial(w, 50, replacement=False, generator=torch.Generator().manual_seed(4))
    idx = band_frequency_indices(24, 18, 50, 4, center=0.3, width=0.1)
    assert (idx[0] * 18 + idx[1]).tolist() == flat.tolist()


@pytest.mark.parametrize("kwargs, match", [
    (dict(center=-0.1, width=0.1), "center=-0.1"), (dict(center=0.8, width=0.1), "center=0.8"),
    (dict(center=0.2, width=0.0), "width=0.0"), (dict(center=0.2, width=float("nan")), "width=nan"),
])
def test_band_indices_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        band_frequency_indices(8, 8, 4, 0, **kwargs)
    with pytest.raises(ValueError, match="n_frequency=65"):
        band_frequency_indices(8, 8, 65, 0, center=0.2, width=0.1)


# ---------------------------------------------------------------- fast apply == dense definition


def _dense_reference(x, spectra, indices, scalings, d_out, d_in):
    dw = sum(dense_delta_weight(c.double(), i, d_out, d_in, a)
             for c, i, a in zip(spectra, indices, scalings))
    return x.double() @ dw.T


def _case(data, dtype):
    """Random shapes (primes, odd, even, 1), several adapters, input rank 1..4 (maybe 0 tokens)."""
    dims = st.sampled_from([1, 2, 3, 4, 5, 7, 8, 12, 13, 16, 17, 31, 32])
    d_out, d_in = data.draw(dims), data.draw(dims)
    lead = data.draw(st.lists(st.integers(0, 3), min_size=0, max_size=3))
    n_adapters = data.draw(st.integers(1, 3))
    counts = [data.draw(st.integers(1, d_out * d_in)) for _ in range(n_adapters)]
    seed = data.draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d_in, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    indices = [frequency_indices(d_out, d_in, n, seed + i) for i, n in enumerate(counts)]
    spectra = [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
               for n in counts]
    scalings = [float(data.draw(st.sampled_from([1.0, 150.0, -3.5]))) for _ in counts]
    return x, spectra, indices, scalings, d_out, d_in


def _close(got, want, tol):
    """``got`` equals ``want`` up to ``tol`` relative to the largest entry of ``want``."""
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, atol=tol * scale, rtol=tol)


def _check_against_dense(data, dtype, tol):
    """Each route that applies at ``dtype`` (the base weight fused in for "merged", which needs fp32/fp64)."""
    x, spectra, indices, scalings, d_out, d_in = _case(data, dtype)
    plans = [make_spectral_plan(i, d_out, d_in) for i in indices]
    route = data.draw(st.sampled_from(["spectral", "merged"] if dtype in (torch.float32, torch.float64)
                                      else ["spectral"]))
    w = torch.randn(d_out, d_in, dtype=torch.float64).to(dtype) if route == "merged" else None
    y = fourierft_linear(x, spectra, plans, scalings, weight=w, route=route)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], d_out)
    leaves = [t.detach().double().requires_grad_() for t in (x, *spectra)]
    ref = _dense_reference(leaves[0], leaves[1:], indices, scalings, d_out, d_in)
    if w is not None:
        ref = ref + leaves[0] @ w.double().T
    gy = torch.randn(ref.shape, dtype=torch.float64).to(dtype)
    got = torch.autograd.grad(y, [x, *spectra], gy)
    want = torch.autograd.grad(ref, leaves, gy.double())
    _close(y, ref, tol)
    for g, w, t in zip(got, want, [x, *spectra]):
        assert g.dtype == t.dtype and g.shape == t.shape
        _close(g, w, tol)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_apply_matches_dense_float64(data):
    _check_against_dense(data, torch.float64, tol=1e-10)


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_apply_matches_dense_float32(data):
    _check_against_dense(data, torch.float32, tol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_apply_matches_dense_half(dtype, tol, data):
    _check_against_dense(data, dtype, tol)


def test_apply_non_contiguous_and_single_token():
    d_out, d_in, n = 10, 9, 30
    idx = frequency_indices(d_out, d_in, n, 1)
    plan, c = make_spectral_plan(idx, d_out, d_in), torch.randn(n, dtype=torch.float64)
    base = torch.randn(9, 5, 4, dtype=torch.float64)
    for x in (base.permute(1, 2, 0), base[:, 0, 0], base.permute(2, 1, 0)[:, ::2]):
        assert x.shape[-1] == d_in
        y = spectral_apply(x, [c], [plan], [2.0], d_out)
        torch.testing.assert_close(y, _dense_reference(x, [c], [idx], [2.0], d_out, d_in))


@pytest.mark.parametrize("block_elems", [1, 7, 64])
def test_apply_token_blocks_match_dense(monkeypatch, block_elems):
    _no_native(monkeypatch)  # the torch bodies of the token maps go through tokens in blocks on CPU
    monkeypatch.setattr(_native, "_BLOCK_ELEMS", block_elems)  # blocks of 1 or a few tokens
    d_out, d_in, tokens = 9, 16, 11
    idx = [frequency_indices(d_out, d_in, 13, 0), frequency_indices(d_out, d_in, 5, 1)]
    x = torch.randn(tokens, d_in, dtype=torch.float64, requires_grad=True)
    c = [torch.randn(i.shape[1], dtype=torch.float64, requires_grad=True) for i in idx]
    plans = [make_spectral_plan(i, d_out, d_in) for i in idx]
    y = spectral_apply(x, c, plans, [2.0, 3.0], d_out)
    ref = _dense_reference(x, c, idx, [2.0, 3.0], d_out, d_in)
    torch.testing.assert_close(y, ref)
    gy = torch.randn_like(y)
    for g, w in zip(torch.autograd.grad(y, [x, *c], gy), torch.autograd.grad(ref, [x, *c], gy)):
        torch.testing.assert_close(g, w)


def test_apply_grad_paths_x_only_and_spectrum_only():
    d_out, d_in, n = 12, 7, 20
    idx = frequency_indices(d_out, d_in, n, 2)
    plan = make_spectral_plan(idx, d_out, d_in)
    x, c = torch.randn(3, d_in, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    ref_gx, ref_gc = torch.autograd.grad(
        _dense_reference(x.requires_grad_(), [c.requires_grad_()], [idx], [3.0], d_out, d_in).sum(),
        [x, c])
    gc, = torch.autograd.grad(spectral_apply(x.detach(), [c], [plan], [3.0], d_out).sum(), [c])
    gx, = torch.autograd.grad(spectral_apply(x, [c.detach()], [plan], [3.0], d_out).sum(), [x])
    torch.testing.assert_close(gc, ref_gc)
    torch.testing.assert_close(gx, ref_gx)


def test_apply_gradcheck():
    d_out, d_in = 5, 6
    idx = [frequency_indices(d_out, d_in, 7, 0), frequency_indices(d_out, d_in, 30, 1)]
    plans = [make_spectral_plan(i, d_out, d_in) for i in idx]
    x = torch.randn(2, 3, d_in, dtype=torch.float64, requires_grad=True)
    c = [torch.randn(i.shape[1], dtype=torch.float64, requires_grad=True) for i in idx]
    fn = lambda x, c0, c1: spectral_apply(x, [c0, c1], plans, [2.0, -0.5], d_out)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, *c))


def test_apply_compiles_without_graph_breaks():
    import torch._dynamo

    d_out, d_in, n = 24, 20, 50
    idx = frequency_indices(d_out, d_in, n, 0)
    plan = make_spectral_plan(idx, d_out, d_in)
    c = torch.randn(n, requires_grad=True)
    fn = lambda x: spectral_apply(x, [c], [plan], [150.0], d_out).square().sum()  # noqa: E731
    x = torch.randn(6, d_in, requires_grad=True)
    torch._dynamo.reset()
    assert torch._dynamo.explain(fn)(x).graph_break_count == 0
    loss = torch.compile(fn, backend="aot_eager", fullgraph=True)(x)
    got = torch.autograd.grad(loss, [x, c])
    want = torch.autograd.grad(fn(x), [x, c])
    # the traced graph calls the same custom ops as eager; the compiler may still reorder float32 sums
    torch.testing.assert_close(loss, fn(x), rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)


class _NumelRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.sizes.append((t.numel(), str(func)))
        return out


def test_apply_never_builds_a_weight_sized_tensor():
    d, n, tokens = 64, 200, 4
    plans = [make_spectral_plan(frequency_indices(d, d, n, s), d, d) for s in (0, 1)]
    x = torch.randn(tokens, d, requires_grad=True)
    spectra = [torch.randn(n, requires_grad=True) for _ in plans]
    with _NumelRecorder() as rec:
        spectral_apply(x, spectra, plans, [150.0, 2.0], d, route="spectral").square().sum().backward()
    assert rec.sizes, "dispatch mode recorded nothing"
    assert max(rec.sizes) < (d * d, ""), max(rec.sizes)
    assert x.grad is not None and all(s.grad is not None for s in spectra)


@pytest.mark.parametrize("spectrum_grad", [True, False])
def test_apply_saves_only_x_and_spectra(spectrum_grad):
    d, n, tokens = 32, 300, 16
    plan = make_spectral_plan(frequency_indices(d, d, n, 0), d, d)
    x = torch.randn(tokens, d, requires_grad=True)
    c = torch.randn(n, requires_grad=spectrum_grad)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = spectral_apply(x, [c], [plan], [1.0], d)
    assert all(t is c or t.data_ptr() == x.data_ptr() for t in saved), [t.shape for t in saved]
    assert any(t.data_ptr() == x.data_ptr() for t in saved) == spectrum_grad  # x only for dL/dc
    y.sum().backward()


def _cpu(tokens, d, n, grad, fused=True, threads=2, dtype=torch.float32, amortised=False, d_in=None):
    costs = route_costs("cpu", tokens=tokens, d_out=d, d_in=d_in or d, n=n, grad=grad, fused=fused,
                        weight_dtype=dtype if fused else None, amortised=amortised, threads=threads)
    return min(costs, key=costs.get)


def test_cpu_route_rule():
    # the base layer runs as a module: the spectral route, or dW and one extra GEMM without gradients
    assert _cpu(4096, 64, 1000, True, fused=False) == "spectral"
    assert _cpu(512, 64, 1000, False, fused=False) == "dense"
    assert _cpu(512, 256, 1000, False, fused=False) == "dense"
    assert _cpu(1, 256, 1000, False, fused=False) == "spectral"
    assert _cpu(512, 4096, 1000, False, fused=False) == "spectral"
    # fused training (benchmarks/bench_spectral_op.py, forced routes): merged for many tokens at small widths,
    # spectral for few tokens and for the widest layers, where building dW costs most
    for threads in (1, 2):
        assert _cpu(512, 384, 1000, True, threads=threads) == "merged"
        assert _cpu(2048, 768, 1000, True, threads=threads) == "merged"
        assert _cpu(2048, 1024, 1000, True, threads=threads) == "merged"
        assert _cpu(8, 768, 1000, True, threads=threads) == "spectral"
        assert _cpu(512, 4096, 1000, True, threads=threads) == "spectral"
        assert _cpu(512, 2048, 1000, True, threads=threads) == "spectral"
        # inside cached_merged_weights without gradients W + dW is free: merged from one token on
        assert _cpu(1, 768, 1000, False, threads=threads, amortised=True) == "merged"
    # half-precision weights keep the activation route (W + dW rounded to bf16 would lose dW)
    assert _cpu(4096, 768, 1000, True, dtype=torch.bfloat16) == "spectral"


def test_device_route_rule_is_counted_and_never_builds_c_code(monkeypatch):
    """On CUDA (and any non-CPU device) the rule is the counted model: it never asks for the C kernels."""
    monkeypatch.setattr(_native, "_lib", lambda: pytest.fail("the C kernels were asked for on a GPU"))

    def gpu(tokens, d, grad=True, **kw):
        return choose_route(torch.device("cuda"), tokens=tokens, d_out=d, d_in=d, n=1000, grad=grad, fused=True,
                            weight_dtype=kw.pop("dtype", torch.float32), **kw)

    assert gpu(512, 4096) == "spectral"  # building a 16.8M-value dW costs more than 512 tokens' FFTs
    assert gpu(65536, 4096) == "merged"  # ... but not than 64k tokens'
    assert gpu(8192, 768) == "merged"
    assert gpu(65536, 768, dtype=torch.bfloat16) == "spectral"
    assert gpu(1, 4096, grad=False, amortised=True) == "merged"
    costs = route_costs("cuda", tokens=512, d_out=4096, d_in=4096, n=1000, grad=True, fused=True,
                        weight_dtype=torch.float32)
    assert set(costs) == {"spectral", "merged"} and all(v > 0 for v in costs.values())


def test_forced_route_applies_only_where_it_can():
    from fourierft.ops.spectral_routes import _force_route, recording_routes

    d = 16
    plan = make_spectral_plan(frequency_indices(d, d, 30, 0), d, d)
    x, c, w = torch.randn(4, d), torch.randn(30, requires_grad=True), torch.randn(d, d)
    records = []
    with recording_routes(records), _force_route("merged"):
        fourierft_linear(x, [c], [plan], [1.0], weight=w)
        fourierft_linear(x, [c], [plan], [1.0])  # no base weight: merged does not apply, the rule decides
    assert [r.route for r in records] == ["merged", "spectral"] and [r.forced for r in records] == [True, False]
    assert "merged (forced)" in str(records[0]) and "spectral" in str(records[0])
    with pytest.raises(ValueError, match="unknown route"):
        with _force_route("fast"):
            pass


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_no_grad_dense_path_matches(dtype):
    d_out, d_in, tokens = 12, 10, 700
    assert _cpu(tokens, d_out, 60, False, fused=False, d_in=d_in) == "dense"
    idx = [frequency_indices(d_out, d_in, 40, 0), frequency_indices(d_out, d_in, 20, 1)]
    plans = [make_spectral_plan(i, d_out, d_in) for i in idx]
    x = torch.randn(7, 100, d_in, dtype=torch.float64).to(dtype)
    c = [torch.randn(i.shape[1], dtype=torch.float64).to(dtype) for i in idx]
    with torch.no_grad():
        y = spectral_apply(x, c, plans, [2.0, -1.0], d_out, route="dense")
    assert y.dtype == dtype and y.shape == (7, 100, d_out)
    _close(y, _dense_reference(x, c, idx, [2.0, -1.0], d_out, d_in), 1e-10 if dtype == torch.float64
           else 1e-5 if dtype == torch.float32 else 1.6e-2)


# ---------------------------------------------------------------- plans


def test_plans_hold_what_their_route_reads_and_validate():
    idx = frequency_indices(6, 4, 10, 0)
    plan = make_spectral_plan(idx, 6, 4)
    assert isinstance(plan, SpectralPlan) and (plan.d_out, plan.d_in, plan.n) == (6, 4, 10)
    assert set(plan.tokens.tensors()) == {"in_cols", "out_cols", "fwd_weight", "bwd_weight", "grad_sign"}
    assert set(plan.weight.tensors()) == {"index", "weight"}
    assert all(v.shape == (20,) for v in plan.tokens.tensors().values())
    moved = plan.to("meta")
    assert all(v.device.type == "meta" for v in moved.tensors().values()) and moved.n == 10
    with pytest.raises(ValueError, match="out of range"):
        make_spectral_plan(idx, 5, 4)
    with pytest.raises(ValueError, match="shape"):
        make_spectral_plan(idx[0], 6, 4)
    with pytest.raises(ValueError, match="d_in=4"):
        spectral_apply(torch.randn(2, 5), [torch.randn(10)], [plan], [1.0], 6)
    with pytest.raises(ValueError, match="one spectrum, plan and scaling"):
        spectral_apply(torch.randn(2, 4), [torch.randn(10)], [plan], [], 6)


# ---------------------------------------------------------------- mixed batches: one adapter per sample


def _per_sample_reference(x, spectra, idx, scalings, slots, d_out, d_in):
    """Each sample through its own dense dW (or zero), stacked: the definition of a mixed batch."""
    rows = []
    for s, k in enumerate(slots.tolist()):
        if k == len(spectra):
            rows.append(x[s].double() @ torch.zeros(d_in, d_out, dtype=torch.float64))
        else:
            rows.append(_dense_reference(x[s], [spectra[k]], [idx], [scalings[k]], d_out, d_in))
    return torch.stack(rows)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_per_sample_apply_matches_dense(data):
    dims = st.sampled_from([1, 2, 3, 5, 8, 13, 16])
    d_out, d_in = data.draw(dims), data.draw(dims)
    n = data.draw(st.integers(1, d_out * d_in))
    k = data.draw(st.integers(1, 4))
    samples = data.draw(st.integers(1, 6))
    lead = data.draw(st.lists(st.integers(0, 4), min_size=0, max_size=2))
    block = data.draw(st.sampled_from([1, 5, 64, 1 << 17]))
    seed = data.draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    idx = frequency_indices(d_out, d_in, n, seed)
    plan = make_spectral_plan(idx, d_out, d_in)
    x = torch.randn(samples, *lead, d_in, generator=gen, dtype=torch.float64, requires_grad=True)
    spectra = [torch.randn(n, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(k)]
    scalings = [1.0 + 2.0 * i for i in range(k)]
    slots = torch.randint(0, k + 1, (samples,), generator=gen)  # k: no adapter
    native = data.draw(st.booleans())
    old = dict(_native._STATE), _native._BLOCK_ELEMS
    _native._BLOCK_ELEMS = block  # torch bodies: blocks inside and across samples
    if not native:
        _native._STATE.update(lib=None, reason="off for this example")
    try:
        y = spectral_apply_per_sample(x, spectra, plan, scalings, slots)
        gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        got = torch.autograd.grad(y, [x, *spectra], gy, allow_unused=True)
    finally:
        _native._STATE.clear()
        _native._STATE.update(old[0])
        _native._BLOCK_ELEMS = old[1]
    ref = _per_sample_reference(x, spectra, idx, scalings, slots, d_out, d_in)
    want = torch.autograd.grad(ref, [x, *spectra], gy, allow_unused=True)
    _close(y, ref, 1e-10)
    for g, w, t in zip(got, want, [x, *spectra]):
        g = torch.zeros_like(t) if g is None else g
        w = torch.zeros_like(t) if w is None else w
        _close(g, w, 1e-10)


def test_per_sample_apply_float32_and_bf16_inputs():
    d_out, d_in, n = 24, 40, 60
    idx = frequency_indices(d_out, d_in, n, 3)
    plan = make_spectral_plan(idx, d_out, d_in)
    spectra = [torch.randn(n) for _ in range(3)]
    slots = torch.tensor([2, 0, 3, 1, 0])
    x = torch.randn(5, 7, d_in)
    ref = _per_sample_reference(x, spectra, idx, [150.0] * 3, slots, d_out, d_in)
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 1.6e-2)]:
        y = spectral_apply_per_sample(x.to(dtype), spectra, plan, [150.0] * 3, slots)
        assert y.dtype == dtype and y.shape == (5, 7, d_out)
        _close(y, _per_sample_reference(x.to(dtype), spectra, idx, [150.0] * 3, slots, d_out, d_in)
               if dtype == torch.bfloat16 else ref, tol)


def test_per_sample_apply_gradcheck_and_validation():
    d_out, d_in = 5, 6
    idx = frequency_indices(d_out, d_in, 9, 0)
    plan = make_spectral_plan(idx, d_out, d_in)
    x = torch.randn(4, 3, d_in, dtype=torch.float64, requires_grad=True)
    c = [torch.randn(9, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    slots = torch.tensor([1, 0, 2, 1])
    fn = lambda x, c0, c1: spectral_apply_per_sample(x, [c0, c1], plan, [2.0, -0.5], slots)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, *c))
    with pytest.raises(ValueError, match="one adapter index per sample"):
        spectral_apply_per_sample(x, c, plan, [1.0, 1.0], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="do not fit"):
        spectral_apply_per_sample(x, [torch.randn(8)], plan, [1.0], slots)
    with pytest.raises(ValueError, match="one adapter index per sample"):
        spectral_apply_per_sample(torch.randn(6), c, plan, [1.0, 1.0], slots)
    with pytest.raises(ValueError, match="one spectrum, plan and scaling"):
        fourierft_linear(x, c, [plan] * 2, [1.0], slots=slots)
    with pytest.raises(ValueError, match="share one plan"):
        fourierft_linear(x, c, [plan, make_spectral_plan(idx, d_out, d_in)], [1.0, 1.0], slots=slots)


# ---------------------------------------------------------------- frozen base layer fused with the adapters


@pytest.mark.parametrize("route", ["spectral", "merged"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("lead", [(3, 5), (7,), (0, 2)])
def test_linear_spectral_apply_equals_base_plus_dense(kernels, route, transposed, with_bias, lead):
    d_out, d_in = 11, 6
    gen = torch.Generator().manual_seed(len(lead) + 2 * transposed + with_bias)
    idx = [frequency_indices(d_out, d_in, 9, 0), frequency_indices(d_out, d_in, 20, 1)]
    plans = [make_spectral_plan(i, d_out, d_in) for i in idx]
    w = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    bias = torch.randn(d_out, generator=gen, dtype=torch.float64) if with_bias else None
    x = torch.randn(*lead, d_in, generator=gen, dtype=torch.float64, requires_grad=True)
    c = [torch.randn(i.shape[1], generator=gen, dtype=torch.float64, requires_grad=True) for i in idx]
    y = linear_spectral_apply(x, w.t().contiguous() if transposed else w, bias, c, plans, [2.0, -3.0],
                              transposed=transposed, route=route)
    ref = torch.nn.functional.linear(x, w, bias) + _dense_reference(x, c, idx, [2.0, -3.0], d_out, d_in)
    torch.testing.assert_close(y, ref)
    gy = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    for g, r in zip(torch.autograd.grad(y, [x, *c], gy), torch.autograd.grad(ref, [x, *c], gy)):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("route", ["spectral", "merged"])
def test_linear_spectral_apply_gradcheck_and_validation(kernels, route):
    d_out, d_in = 5, 7
    idx = frequency_indices(d_out, d_in, 12, 3)
    plan = make_spectral_plan(idx, d_out, d_in)
    w, bias = torch.randn(d_out, d_in, dtype=torch.float64), torch.randn(d_out, dtype=torch.float64)
    x = torch.randn(2, 3, d_in, dtype=torch.float64, requires_grad=True)
    c = torch.randn(12, dtype=torch.float64, requires_grad=True)
    apply = lambda x, c: linear_spectral_apply(x, w, bias, [c], [plan], [1.5], route=route)  # noqa: E731
    assert torch.autograd.gradcheck(apply, (x, c))
    gc, = torch.autograd.grad(apply(x.detach(), c).sum(), [c])
    gx, = torch.autograd.grad(apply(x, c.detach()).sum(), [x])
    ref = torch.nn.functional.linear(x, w, bias) + _dense_reference(x, [c], [idx], [1.5], d_out, d_in)
    for g, r in zip((gx, gc), torch.autograd.grad(ref.sum(), [x, c])):
        torch.testing.assert_close(g, r)
    with pytest.raises(ValueError, match="does not apply"):
        linear_spectral_apply(x, w, bias, [c], [plan], [1.0], route="dense")
    with pytest.raises(ValueError, match="frozen weight"):
        linear_spectral_apply(x, w.clone().requires_grad_(), bias, [c], [plan], [1.0])
    with pytest.raises(ValueError, match="expected d_in=7"):
        linear_spectral_apply(torch.randn(2, 6), w, bias, [c], [plan], [1.0])
    with pytest.raises(ValueError, match=r"weight must be \(5, 7\)"):
        linear_spectral_apply(x, w.t().contiguous(), bias, [c], [plan], [1.0])
