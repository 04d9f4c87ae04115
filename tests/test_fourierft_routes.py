"""The FourierFT op through the layers: every route reachable and equal, the merged-weight scope, the C kernels
behind torch.library, no host reads in either method's hot path, and devices other than the CPU.

Each route is checked against the dense definition (PEFT's ``Re(ifft2(S))``, written in these tests and
differentiated by autograd) on odd, prime and non-square shapes, with the C kernels and with the torch bodies
that every other device runs.
"""

import contextlib
import os
import traceback

import pytest
import torch
import transformers
from packaging.version import Version
from torch.utils._python_dispatch import TorchDispatchMode

import fourierft
from fourierft import BOFTConfig, FourierFTConfig
from fourierft.ops import _native, spectral_op
from fourierft.ops.spectral import frequency_indices, make_spectral_plan
from fourierft.ops.scope import active_scope
from fourierft.ops.spectral_op import cached_merged_weights, fourierft_linear
from fourierft.ops.spectral_routes import _force_route, recording_routes

SHAPES = [  # (d_out, d_in, entry counts per adapter): odd, prime, non-square, tiny, n close to d_out * d_in
    (11, 6, [9, 20]), (13, 17, [50]), (7, 7, [49]), (64, 48, [300, 100]), (5, 1, [3]), (1, 9, [4]), (2, 2, [4]),
    (31, 37, [1000]),
]


@pytest.fixture(params=["native", "torch"])
def kernels(request, monkeypatch):
    """Run a test with the C kernels, then with the torch bodies of the same custom ops."""
    if request.param == "native" and not _native.available():
        pytest.skip(f"native kernels unavailable here: {_native.status()}")
    if request.param == "torch":
        monkeypatch.setitem(_native._STATE, "lib", None)
        monkeypatch.setitem(_native._STATE, "reason", "off for this test")
    return request.param


def _dense(spectrum, idx, d_out, d_in, a):
    s = torch.zeros(d_out, d_in, dtype=torch.float64).index_put((idx[0], idx[1]), spectrum.double())
    return torch.fft.ifft2(s).real * a


def _case(d_out, d_in, ns, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    idx = [frequency_indices(d_out, d_in, n, i) for i, n in enumerate(ns)]
    plans = [make_spectral_plan(i, d_out, d_in) for i in idx]
    w = torch.randn(d_out, d_in, generator=gen, dtype=dtype)
    bias = torch.randn(d_out, generator=gen, dtype=dtype)
    spectra = [torch.randn(n, generator=gen, dtype=dtype, requires_grad=True) for n in ns]
    return idx, plans, w, bias, spectra, [2.0, -3.0][: len(ns)]


def _reference(x, w, bias, spectra, idx, scalings):
    d_out, d_in = w.shape
    dw = sum(_dense(c, i, d_out, d_in, a) for c, i, a in zip(spectra, idx, scalings))
    return torch.nn.functional.linear(x.double(), w.double() + dw, None if bias is None else bias.double())


@pytest.mark.parametrize("route", ["spectral", "merged"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("d_out, d_in, ns", SHAPES)
def test_routes_equal_dense_definition(kernels, route, transposed, d_out, d_in, ns):
    idx, plans, w, bias, spectra, scalings = _case(d_out, d_in, ns)
    x = torch.randn(3, 5, d_in, dtype=torch.float64, requires_grad=True)
    y = fourierft_linear(x, spectra, plans, scalings, weight=w.t().contiguous() if transposed else w, bias=bias,
                         transposed=transposed, route=route)
    ref = _reference(x, w, bias, spectra, idx, scalings)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(y, [x, *spectra], gy), torch.autograd.grad(ref, [x, *spectra], gy)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_float32_many_tokens_every_route_and_kernel(monkeypatch):
    """Enough tokens for several threads and torch token blocks: float32 within float32 rounding of the
    float64 reference (measured error about 1e-6 relative; a 1% gradient error is 1e4 times larger)."""
    d_out, d_in, n = 96, 70, 700
    idx, plans, w, bias, spectra, scalings = _case(d_out, d_in, [n], dtype=torch.float32)
    x = torch.randn(1500, d_in, requires_grad=True)
    ref = _reference(x, w, bias, spectra, idx, scalings)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *spectra])
    impls = (["native"] if _native.available() else []) + ["torch"]
    for impl in impls:
        if impl == "torch":
            monkeypatch.setitem(_native._STATE, "lib", None)
        for route in ("merged", "spectral"):
            y = fourierft_linear(x, spectra, plans, scalings, weight=w, bias=bias, route=route)
            grads = torch.autograd.grad(y.square().sum(), [x, *spectra])
            scale = ref.abs().max().item()
            torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * scale)
            for got, want in zip(grads, ref_grads):
                scale = want.abs().max().item()
                torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=2e-5 * scale)
    assert impls[0] == "native" or not _native.available()


def test_zero_tokens_and_frozen_spectra():
    idx, plans, w, bias, spectra, scalings = _case(11, 6, [9])
    for route in ("merged", "spectral"):
        x = torch.randn(0, 6, dtype=torch.float64, requires_grad=True)
        y = fourierft_linear(x, spectra, plans, scalings, weight=w, bias=bias, route=route)
        assert y.shape == (0, 11)
        gx, gc = torch.autograd.grad(y.sum(), [x, spectra[0]], allow_unused=True)
        assert gx.shape == x.shape and torch.equal(gc, torch.zeros_like(gc))
        frozen = [s.detach() for s in spectra]
        x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = fourierft_linear(x, frozen, plans, scalings, weight=w, bias=bias, route=route)
        assert all(t.data_ptr() != x.data_ptr() for t in saved)  # x is saved only for a spectrum gradient
        gx, = torch.autograd.grad(y.sum(), [x])
        want, = torch.autograd.grad(_reference(x, w, bias, frozen, idx, scalings).sum(), [x])
        torch.testing.assert_close(gx, want)


# ------------------------------------------------------------------------------------------ the C kernels
def test_kernels_check_every_argument_before_a_pointer_is_used():
    r, g = torch.randn(8, 6), torch.randn(8, 4)
    a, b = torch.tensor([0, 5], dtype=torch.int32), torch.tensor([1, 3], dtype=torch.int32)
    pair, scatter = torch.ops.fourierft.pair_products, torch.ops.fourierft.scatter_products
    w = torch.ones(1, 2)
    bad = [
        (lambda: pair(r.double(), g, a, b, 1), "same dtype"),
        (lambda: pair(r.half(), g.half(), a, b, 1), "float32/float64"),
        (lambda: pair(r.t(), g, a, b, 1), "unit column stride|same dtype, device and rows"),
        (lambda: pair(r, g, a.long(), b, 1), "int32"),
        (lambda: pair(r, g, a, b[:1], 1), "one entry per pair"),
        (lambda: pair(r, g, a, b, 3), "equal runs"),
        (lambda: pair(r, g, a.to("meta"), b, 1), "is on meta"),
        (lambda: scatter(r, a, b, torch.ones(1, 3), 4), "w must be"),
        (lambda: scatter(r, a, b, w.double(), 4), "w must be"),
        (lambda: scatter(r, a, b, w, 0), "cols must be positive"),
    ]
    for call, match in bad:
        with pytest.raises(ValueError, match=match):
            call()
    impls = [True, False] if _native.available() else [False]
    for native in impls:  # out-of-range columns: the C code checks them before the loop, torch's ops too
        state = dict(_native._STATE)
        if not native:
            _native._STATE.update(lib=None)
        try:
            error = IndexError if native else (IndexError, RuntimeError)  # torch's index_select says RuntimeError
            with pytest.raises(error, match="a\\[1\\] = 6 is out of range" if native else None):
                pair(r, g, torch.tensor([0, 6], dtype=torch.int32), b, 1)
            with pytest.raises(error, match="b\\[1\\] = 4 is out of range" if native else None):
                scatter(r, a, torch.tensor([1, 4], dtype=torch.int32), w, 4)
        finally:
            _native._STATE.clear()
            _native._STATE.update(state)


def test_native_kernels_report_why_they_are_off(monkeypatch):
    monkeypatch.setattr(_native, "_STATE", {})
    monkeypatch.setenv("FOURIERFT_NATIVE", "0")
    assert not _native.available() and "FOURIERFT_NATIVE=0" in _native.status()
    monkeypatch.setattr(_native, "_STATE", {})
    monkeypatch.setenv("FOURIERFT_NATIVE", "1")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert not _native.available() and "no C compiler" in _native.status()
    # the ops still work, through their torch bodies
    _, plans, w, bias, spectra, scalings = _case(11, 6, [9])
    fourierft_linear(torch.randn(3, 6, dtype=torch.float64), spectra, plans, scalings, weight=w, bias=bias,
                     route="merged").sum().backward()
    assert spectra[0].grad is not None


def test_native_kernels_run_on_torchs_openmp_runtime():
    """The kernel library binds to the libgomp that torch loaded: no second thread pool. (Other packages may
    bring their own copy, scikit-learn does; what counts is where the kernels' OpenMP symbols resolve.)"""
    import ctypes

    if not _native.available():
        pytest.skip(f"native kernels unavailable here: {_native.status()}")

    class DlInfo(ctypes.Structure):
        _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p), ("sname", ctypes.c_char_p),
                    ("saddr", ctypes.c_void_p)]

    symbol = ctypes.cast(_native._STATE["lib"].omp_get_num_threads, ctypes.c_void_p)
    info = DlInfo()
    assert ctypes.CDLL(None).dladdr(symbol, ctypes.byref(info)), "dladdr found no library"
    where = os.path.realpath(info.fname.decode())
    assert where == os.path.realpath(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")), where


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_native_kernels_work_in_a_forked_child():
    """A child forked after the parent ran the kernels on several threads (a DataLoader worker) still runs them."""
    if not _native.available():
        pytest.skip(f"native kernels unavailable here: {_native.status()}")
    r, g = torch.randn(2048, 10), torch.randn(2048, 10)
    a, b = torch.tensor([0, 3, 9], dtype=torch.int32), torch.tensor([1, 1, 2], dtype=torch.int32)
    want = (r[:, a.long()] * g[:, b.long()]).sum(0)
    torch.testing.assert_close(_native.pair_products(r, g, a, b, 1)[0], want, rtol=1e-5, atol=1e-4)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: a hang here would time the test out instead of passing
        ok = torch.allclose(_native.pair_products(r, g, a, b, 1)[0], want, rtol=1e-5, atol=1e-4)
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"


def test_compiled_training_step_traces_the_custom_ops():
    """torch.compile sees the kernels as ops (fake implementations): no graph break, same values, both routes."""
    import torch._dynamo

    idx, plans, w, bias, spectra, scalings = _case(24, 20, [50], dtype=torch.float32)
    x = torch.randn(300, 20, requires_grad=True)
    for route in ("merged", "spectral"):
        def step(x):
            return fourierft_linear(x, spectra, plans, scalings, weight=w, bias=bias, route=route).square().sum()

        torch._dynamo.reset()
        assert torch._dynamo.explain(step)(x).graph_break_count == 0
        loss = torch.compile(step, backend="aot_eager", fullgraph=True)(x)
        got = torch.autograd.grad(loss, [x, *spectra])
        want = torch.autograd.grad(step(x), [x, *spectra])
        torch.testing.assert_close(loss, step(x), rtol=1e-6, atol=0)
        for g, v in zip(got, want):
            torch.testing.assert_close(g, v, rtol=1e-6, atol=1e-6 * v.abs().max().item())


# ------------------------------------------------------------------------------------------ layers
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
    return torch.nn.functional.linear(x, w + layer.get_delta_weight("default").detach(), layer.base_layer.bias)


@pytest.mark.parametrize("conv1d", [False, True])
def test_every_route_is_reachable_through_the_layer_and_agrees(conv1d):
    model = _model(conv1d=conv1d)
    spectrum = _layer(model).fourierft_spectrum["default"]
    x = torch.randn(4, 300, 48, requires_grad=True)
    assert [r.route for r in fourierft.explain_routes(model, x)] == ["merged"]  # 1200 tokens at width 48
    results = {}
    for route in ("merged", "spectral"):
        with _force_route(route):
            assert [r.route for r in fourierft.explain_routes(model, x)] == [route]
            y = model(x)
        torch.testing.assert_close(y, _dense_output(model, x), rtol=1e-5, atol=1e-5)
        results[route] = torch.autograd.grad(y.square().sum(), [x, spectrum])
    for g, w in zip(results["merged"], results["spectral"]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())
    handle = _layer(model).base_layer.register_forward_hook(lambda *a: None)  # unfused: base runs as a module
    try:
        with torch.no_grad(), _force_route("dense"):
            assert [r.route for r in fourierft.explain_routes(model, x, grad=False)] == ["dense"]
            torch.testing.assert_close(model(x), _dense_output(model, x), rtol=1e-5, atol=1e-5)
    finally:
        handle.remove()


def test_explain_routes_names_layers_and_costs():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = fourierft.get_peft_model(LlamaForCausalLM(cfg), FourierFTConfig(target_modules=["q_proj", "v_proj"],
                                                                           n_frequency=100))
    ids = torch.randint(0, 64, (2, 9))
    choices = fourierft.explain_routes(model, input_ids=ids)
    names = [c.layer for c in choices]
    assert names == [f"base_model.model.model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"]
    for c in choices:
        assert c.tokens == 18 and c.grad and c.route in c.costs and c.costs[c.route] == min(c.costs.values())
        assert c.layer in str(c) and c.route in str(c)
    assert all(not c.grad for c in fourierft.explain_routes(model, input_ids=ids, grad=False))


def test_layer_forward_never_reads_a_spectrum_kept_from_before(monkeypatch):
    """No hidden state: without a scope each forward builds W + dW from the current spectra, so any write
    (an optimizer step, ``.data``, ``load_state_dict``) is seen at once."""
    model = _model()
    x = torch.randn(2, 400, 48)
    with _force_route("merged"):
        model(x)
        with torch.no_grad():
            _layer(model).fourierft_spectrum["default"].data.mul_(3.0)  # bypasses the version counter
        torch.testing.assert_close(model(x), _dense_output(model, x), rtol=1e-5, atol=1e-5)
    assert not any(k.startswith("_merged") for k in vars(_layer(model)))


def _count_builds(monkeypatch):
    builds = []
    real = spectral_op.delta_weight
    monkeypatch.setattr(spectral_op, "delta_weight", lambda *a, **k: builds.append(1) or real(*a, **k))
    return builds


def test_scope_builds_once_per_optimizer_step_and_frees_on_exit(monkeypatch):
    import gc
    import weakref

    model = _model()
    builds = _count_builds(monkeypatch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    xs = [torch.randn(2, 400, 48) for _ in range(3)]
    with _force_route("merged"):
        for x in xs:  # no scope: one build per forward
            model(x).square().mean().backward()
        assert len(builds) == 3
        with cached_merged_weights():
            for x in xs:  # three micro-batches, one build
                model(x).square().mean().backward()
            assert len(builds) == 4
            opt.step()  # the spectrum's version changes: the next forward builds anew (and replaces the entry)
            opt.zero_grad()
            y = model(xs[0])
            assert len(builds) == 5
            torch.testing.assert_close(y, _dense_output(model, xs[0]), rtol=1e-5, atol=1e-5)
            kept = weakref.ref(next(iter(active_scope().values()))[-1])
            assert len(active_scope()) == 1  # one entry per layer, not per version
        del y
        gc.collect()
        assert kept() is None and active_scope() is None


def test_scope_in_inference_takes_the_merged_route_from_one_token(monkeypatch):
    model = _model(d=64, n=500).eval()
    builds = _count_builds(monkeypatch)
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        assert [r.route for r in fourierft.explain_routes(model, x, grad=False)] == ["spectral"]
        with cached_merged_weights():
            for _ in range(4):  # generation-style: one token per forward, one build
                torch.testing.assert_close(model(x), _dense_output(model, x), rtol=1e-5, atol=1e-5)
    assert len(builds) == 1
    with torch.inference_mode(), cached_merged_weights():  # the parameters still have version counters
        for _ in range(2):
            model(torch.randn(1, 1, 64))
    assert len(builds) == 2
    frozen = model.base_model.model[0]
    frozen.base_layer.weight = torch.nn.Parameter(frozen.base_layer.weight.detach().clone(), requires_grad=False)
    with torch.inference_mode():
        inference_weight = frozen.base_layer.weight.clone()  # an inference tensor: no version counter
    frozen.base_layer.weight = torch.nn.Parameter(inference_weight, requires_grad=False)
    with torch.inference_mode(), cached_merged_weights():  # never cached: built per forward
        for _ in range(2):
            model(torch.randn(1, 1, 64))
    assert len(builds) == 4


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recompute_in_a_scope_gives_the_same_gradients(reentrant):
    from torch.utils.checkpoint import checkpoint

    model = _model()
    spectrum = _layer(model).fourierft_spectrum["default"]
    x = torch.randn(2, 400, 48, requires_grad=True)

    def loss(fn):  # .backward(): reentrant checkpointing does not support autograd.grad
        x.grad = spectrum.grad = None
        fn(x).square().sum().backward()
        return x.grad.clone(), spectrum.grad.clone()

    want = loss(model)
    with cached_merged_weights():
        got = loss(lambda t: checkpoint(model, t, use_reentrant=reentrant))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())


def test_adapter_trainer_opens_one_scope_per_optimizer_step(monkeypatch, tmp_path):
    from torch.utils.data import Dataset
    from transformers import TrainingArguments

    class Data(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"x": torch.randn(200, 48, generator=g)}

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(48, 48))

        def forward(self, x):
            return {"loss": self.net(x).square().mean()}

    torch.manual_seed(0)
    model = fourierft.get_peft_model(Wrapped(), FourierFTConfig(target_modules=["net.0"], n_frequency=100))
    builds = _count_builds(monkeypatch)
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=100)
    with _force_route("merged"):
        fourierft.AdapterTrainer(model=model, args=args, train_dataset=Data()).train()
    assert len(builds) == 2  # 4 micro-batches in 2 optimizer steps
    assert active_scope() is None  # closed after the last step


# ------------------------------------------------------------------------------------------ host reads
class _HostReads(TorchDispatchMode):
    """Records the ops that read a tensor value back to the host, with the library frames that called them."""

    READS = {"aten._local_scalar_dense.default", "aten.equal.default", "aten.is_nonzero.default",
             "aten.item.default"}
    LIBRARY = os.path.dirname(fourierft.__file__)

    def __init__(self):
        super().__init__()
        self.reads, self.from_library = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in self.READS:
            frames = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack() if f.filename.startswith(self.LIBRARY)]
            self.reads.append(str(func))
            if frames:
                self.from_library.append((str(func), frames))
        return func(*args, **(kwargs or {}))


def _bert(config):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32)
    return fourierft.get_peft_model(BertModel(cfg), config)


#: transformers 4.x's BERT itself reads the attention mask back to the host in every forward (seen with plain
#: BertModel on 4.45.2), inside the adapted model's forward, so the counter cannot tell those reads from the library's
needs_transformers_5_bert = pytest.mark.skipif(
    Version(transformers.__version__).major < 5,
    reason=f"transformers {transformers.__version__} < 5: its BERT forward reads tensor values on the host itself")


@needs_transformers_5_bert
def test_host_read_counter_sees_a_read_from_library_code(monkeypatch):
    """The counter below can fail: an adapter forward that asks ``.item()`` is caught and named."""
    from fourierft.methods import fourierft as method

    model = _bert(FourierFTConfig(target_modules=["query"], n_frequency=64))
    real = method.fourierft_linear
    monkeypatch.setattr(method, "fourierft_linear", lambda x, *a, **k: (x.sum().item(), real(x, *a, **k))[1])
    with _HostReads() as mode:
        model(input_ids=torch.randint(0, 50, (2, 8)))
    assert mode.from_library and "fourierft.py" in mode.from_library[0][1][-1]


@pytest.mark.parametrize("method, route", [("fourierft", "spectral"), ("fourierft", "merged"), ("fourierft", "dense"),
                                           ("fourierft", None), ("boft", None)])
@needs_transformers_5_bert
def test_no_host_reads_in_the_hot_path(method, route):
    """A training step (forward and backward) and an eval forward, through every FourierFT route and through
    BOFT, read no tensor value back to the host from library code (``aten.item``/``equal``/``is_nonzero``/
    ``_local_scalar_dense`` with a fourierft frame on the stack). Plans are built at injection."""
    targets = ["query", "value", "intermediate.dense"]
    config = (FourierFTConfig(target_modules=targets, n_frequency=64, init_weights=False) if method == "fourierft"
              else BOFTConfig(target_modules=targets, boft_block_size=4, boft_n_butterfly_factor=2,
                              init_weights=False))
    model = _bert(config)
    ids = torch.randint(0, 50, (2, 16))
    handles = []
    if route == "dense":  # the dense route is the unfused one without gradients: the base runs as a module
        handles = [m.base_layer.register_forward_hook(lambda *a: None) for m in model.modules()
                   if isinstance(m, fourierft.FourierFTLinear)]
    records = []
    force = _force_route(route) if route else contextlib.nullcontext()
    with force, recording_routes(records), _HostReads() as mode:
        model.train()
        if route != "dense":
            model(input_ids=ids).last_hidden_state.square().mean().backward()
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
    for h in handles:
        h.remove()
    assert mode.from_library == [], mode.from_library
    if method == "fourierft":
        assert records and {r.route for r in records} == ({route} if route else {r.route for r in records})
    else:
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------ other devices
def _tiny_llama(device=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    with torch.device(device) if device else torch.device("cpu"):
        return LlamaForCausalLM(cfg)


CONFIGS = {
    "fourierft": lambda: FourierFTConfig(target_modules=["q_proj", "v_proj"], n_frequency=40, init_weights=False),
    "boft": lambda: BOFTConfig(target_modules=["q_proj", "v_proj"], boft_block_size=4, boft_n_butterfly_factor=2,
                               init_weights=False),
}


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.skipif(Version(transformers.__version__).major < 5,
                    reason=f"transformers {transformers.__version__} < 5: a plain LlamaForCausalLM cannot run on the "
                           "meta device (RuntimeError: unsupported scalarType, seen on 4.45.2)")
def test_meta_device_workflow_as_in_peft(method):
    """Inject on meta, forward and backward on meta, ``to_empty``, load the weights: the CPU-built outputs."""
    torch.manual_seed(0)
    ref = fourierft.get_peft_model(_tiny_llama(), CONFIGS[method]())
    model = fourierft.get_peft_model(_tiny_llama("meta"), CONFIGS[method]())
    assert all(p.device.type == "meta" for p in model.parameters())
    ids = torch.randint(0, 64, (2, 7))
    out = model(input_ids=ids.to("meta")).logits
    out.float().sum().backward()
    assert out.device.type == "meta" and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.to_empty(device="cpu")
    model.load_state_dict(ref.state_dict())
    for (name, buf), (_, want) in zip(model.named_buffers(), ref.named_buffers()):
        buf.copy_(want)  # non-persistent buffers (rotary frequencies) are the base model's to rebuild, as in peft
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)


class _Block(torch.nn.Module):
    """Attention-shaped projections without transformers' rotary code (which a CPU-only build cannot fake on CUDA)."""

    def __init__(self, d=32):
        super().__init__()
        self.q_proj, self.v_proj, self.out = torch.nn.Linear(d, d), torch.nn.Linear(d, d), torch.nn.Linear(d, 16)

    def forward(self, x):
        return self.out(torch.relu(self.q_proj(x)) * self.v_proj(x))


@pytest.mark.parametrize("method", list(CONFIGS))
def test_injection_and_eval_forward_on_fake_cuda_tensors(method, monkeypatch):
    """CUDA-typed fake tensors on this CPU-only build: injection, plans and an eval forward run, and no C code
    is ever asked for. torch cannot simulate here: random initialisers and autograd on fake CUDA tensors (the
    latter aborts the process), nor transformers' rotary embeddings (they call into CUDA)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    monkeypatch.setattr(_native, "_lib", lambda: pytest.fail("C kernels asked for on a CUDA tensor"))
    with FakeTensorMode():
        with torch.device("meta"):
            base = _Block()
        for module in base.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, torch.nn.Parameter(torch.empty(p.shape, device="cuda"), p.requires_grad))
        model = fourierft.get_peft_model(base, CONFIGS[method]()).eval()
        adapters = [p for p in model.parameters() if p.requires_grad]
        assert adapters and all(isinstance(p, FakeTensor) and p.device.type == "cuda" for p in adapters)
        x = torch.empty(2, 5, 32, device="cuda")
        routes = [None] + (["spectral", "merged"] if method == "fourierft" else [])
        for route in routes:
            with torch.no_grad(), _force_route(route) if route else contextlib.nullcontext():
                out = model(x)
            assert isinstance(out, FakeTensor) and out.device.type == "cuda" and out.shape == (2, 5, 16)
