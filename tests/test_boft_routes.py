"""BOFT's rotation op through the layers: every path against the dense definition, forcing, ``explain_routes``,
the explicit scope that alone reuses ``Q = cayley(R)``, no host reads, the meta device and fake CUDA tensors.

The dense definition (DESIGN.md section 4) is written here from scratch: Cayley by ``torch.linalg.solve``,
permutation matrices of the block-butterfly permutations, ``M = B_{m-1} ... B_0`` and
``y = s * (base(x M) - b) + b``; autograd differentiates it.
"""

from __future__ import annotations

import contextlib
import os
import traceback

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fourierft
from fourierft import BOFTConfig
from fourierft.ops import butterfly as bf
from fourierft.ops.butterfly_routes import ROUTES, RotationChoice, _force_route
from fourierft.ops.scope import active_scope

#: (n, b, m): one factor, several, the widest fused window, a single block (no fused path)
GEOMETRIES = [(32, 4, 1), (32, 4, 2), (48, 2, 3), (64, 8, 3), (16, 16, 1)]


def _perm(n: int, chunks: int, r: int) -> list[int]:
    """In each of ``chunks`` chunks, sub-blocks of length ``r`` reordered even-indexed first, then odd-indexed."""
    c = n // chunks
    order = list(range(0, c // r, 2)) + list(range(1, c // r, 2))
    return [k * c + order[t] * r + j for k in range(chunks) for t in range(c // r) for j in range(r)]


def dense_rotation(R: torch.Tensor) -> torch.Tensor:
    m, num, size, _ = R.shape
    n = num * size
    S = 0.5 * (R - R.mT)
    eye = torch.eye(size, dtype=R.dtype)
    Q = torch.linalg.solve(eye + S, eye - S, left=False)
    M = torch.eye(n, dtype=R.dtype)
    for i in range(m):
        P = torch.zeros(n, n, dtype=R.dtype)
        P[torch.arange(n), torch.tensor(list(range(n)) if i == 0 else _perm(n, num // 2**i, size // 2))] = 1
        M = P @ torch.block_diag(*Q[i]) @ P.T @ M
    return M


def _model(n, size, m, dtype=torch.float64, dropout=0.0):
    torch.manual_seed(n * 10 + size + m)
    base = nn.Sequential(nn.Linear(n, n), nn.Tanh(), nn.Linear(n, n))
    config = BOFTConfig(target_modules=["0", "2"], boft_block_size=size, boft_n_butterfly_factor=m,
                        boft_dropout=dropout, init_weights=False)
    return fourierft.get_peft_model(base, config).to(dtype)


def _reference(model, x):
    """The model's output from the dense definition, differentiable in x and every boft_R / boft_s."""
    layers = [model.base_model.model[0], model.base_model.model[2]]
    h = x
    for i, layer in enumerate(layers):
        base = layer.get_base_layer()
        R, s = layer.boft_R["default"], layer.boft_s["default"].reshape(-1)
        M = dense_rotation(R.double()).to(x.dtype)
        h = s * torch.nn.functional.linear(h @ M, base.weight) + base.bias
        if i == 0:
            h = torch.tanh(h)
    return h


@pytest.mark.parametrize("n,size,m", GEOMETRIES)
def test_every_route_matches_the_dense_definition_with_gradients(n, size, m):
    model = _model(n, size, m)
    inputs = [torch.randn(3, 5, n, dtype=torch.float64, requires_grad=True)]
    inputs += [p for p in model.parameters() if p.requires_grad]
    g = torch.randn(3, 5, n, dtype=torch.float64)
    want = _reference(model, inputs[0])
    want_grads = torch.autograd.grad(want, inputs, g)
    routes = [r for r in ROUTES if r != "fused" or size * 2 ** (m - 1) < n]
    assert len(routes) == (2 if n == size else 3)
    for route in routes:
        records = []
        with _force_route(route), bf_records(records):
            got = model(inputs[0])
        assert {r.route for r in records} == {route} and all(r.forced for r in records)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        for a, b in zip(torch.autograd.grad(got, inputs, g), want_grads):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@contextlib.contextmanager
def bf_records(records):
    from fourierft.ops.butterfly_routes import recording_routes

    with recording_routes(records):
        yield records


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("route", ROUTES)
def test_every_route_in_low_precision(dtype, tol, route):
    """float32, bf16 and fp16 activations: the blocks are computed in float32, the output keeps x's dtype."""
    model = _model(64, 4, 2, dtype=torch.float32)
    x = torch.randn(4, 64)
    want = _reference(model.double(), x.double())
    model = model.to(dtype)
    with torch.no_grad(), _force_route(route):
        got = model(x.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want.detach(), rtol=tol, atol=tol * want.abs().max().item())


def test_merge_goes_through_the_same_op():
    model = _model(32, 4, 2)
    x = torch.randn(6, 32, dtype=torch.float64)
    want = _reference(model, x).detach()
    for route in ROUTES:
        with _force_route(route):
            model.merge_adapter()
            torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-10)
            model.unmerge_adapter()
        torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-10)


def test_forcing_by_argument_and_context_and_what_does_not_apply():
    r = torch.randn(2, 8, 4, 4)
    x = torch.randn(5, 32)
    plan = bf.make_butterfly_plan(8, 4, 2)
    records = []
    with bf_records(records):
        bf.butterfly_rotate(x, r, plan, route="factors")
        with _force_route("dense"):
            bf.butterfly_rotate(x, r, plan)
            bf.butterfly_rotate(x, r, plan, route="fused")  # the argument wins over the context
    assert [(c.route, c.forced) for c in records] == [("factors", True), ("dense", True), ("fused", True)]
    arbitrary = bf.permutation_plan(torch.stack([torch.randperm(32) for _ in range(2)]), 4)
    with pytest.raises(ValueError, match="'fused' does not apply"):
        bf.butterfly_rotate(x, r, arbitrary, route="fused")
    with pytest.raises(ValueError, match="unknown BOFT route"):
        with _force_route("merged"):
            pass
    with _force_route("fused"), bf_records(records):  # a forced route that does not apply: the cheapest instead
        bf.butterfly_rotate(x, r, arbitrary)
    assert records[-1].route != "fused" and not records[-1].forced


def test_explain_routes_lists_boft_layers_with_every_candidate():
    model = _model(32, 4, 2, dtype=torch.float32)
    x = torch.randn(2, 9, 32)
    choices = fourierft.explain_routes(model, x)
    assert [c.layer for c in choices] == ["base_model.model.0", "base_model.model.2"]
    assert all(isinstance(c, RotationChoice) and set(c.costs) == set(ROUTES) for c in choices)
    assert all(c.route == min(c.costs, key=c.costs.get) and not c.forced and c.grad for c in choices)
    assert all(c.tokens == 18 and c.n == 32 and c.block_size == 4 and c.m == 2 for c in choices)
    assert "boft" in str(choices[0]) and "base_model.model.0" in str(choices[0])
    assert not any(c.grad for c in fourierft.explain_routes(model, x, grad=False))
    with _force_route("dense"):
        assert [c.route for c in fourierft.explain_routes(model, x)] == ["dense", "dense"]


def test_no_cache_on_the_layer():
    """A layer holds parameters and plans; a forward adds nothing to it (the old ``_cayley_cache`` is gone)."""
    model = _model(32, 4, 2, dtype=torch.float32).eval()
    layer = model.base_model.model[0]
    before = {k: type(v) for k, v in vars(layer).items()}
    with torch.no_grad():
        model(torch.randn(2, 32))
        model(torch.randn(2, 32))
    assert {k: type(v) for k, v in vars(layer).items()} == before
    assert not [k for k in dir(layer) if "cache" in k.lower()]


class _CountInversions(TorchDispatchMode):
    """Counts Cayley inversions (batched LAPACK inverses of the blocks)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += str(func).startswith("aten.linalg_inv_ex")
        return func(*args, **(kwargs or {}))


def _train_micro_batches(model, xs, g):
    for x in xs:
        model(x).backward(g)
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_scope_computes_q_once_per_step_with_the_same_gradients():
    model = _model(32, 4, 2, dtype=torch.float32)
    xs, g = [torch.randn(4, 32) for _ in range(3)], torch.randn(4, 32)
    with _CountInversions() as outside:
        plain = _train_micro_batches(model, xs, g)
    assert outside.count == 2 * 3  # two layers, three micro-batches: no reuse outside the scope
    model.zero_grad(set_to_none=True)
    with _CountInversions() as inside, fourierft.cached_merged_weights():
        scoped = _train_micro_batches(model, xs, g)
        assert len(active_scope()) == 2  # one entry per layer
        with torch.no_grad():
            model(xs[0])  # inference inside the scope: the same Q
    assert inside.count == 2
    for a, b in zip(scoped, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert active_scope() is None


def test_scope_sees_an_optimizer_step():
    model = _model(32, 4, 2, dtype=torch.float32)
    x = torch.randn(4, 32)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    with _CountInversions() as counter, fourierft.cached_merged_weights():
        model(x).square().sum().backward()
        opt.step()  # in place: the version counters move
        with torch.no_grad():
            got = model(x)
        assert len(active_scope()) == 2  # the newer version replaced each layer's entry
    assert counter.count == 4
    with torch.no_grad():
        torch.testing.assert_close(got, model(x))


class _HostReads(TorchDispatchMode):
    """Ops that read a tensor value back to the host, called from library code."""

    READS = {"aten._local_scalar_dense.default", "aten.equal.default", "aten.is_nonzero.default", "aten.item.default"}
    LIBRARY = os.path.dirname(fourierft.__file__)

    def __init__(self):
        super().__init__()
        self.from_library = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in self.READS:
            frames = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack() if f.filename.startswith(self.LIBRARY)]
            if frames:
                self.from_library.append((str(func), frames))
        return func(*args, **(kwargs or {}))


def test_host_read_counter_catches_a_read_from_the_op(monkeypatch):
    """The counter can fail: a Cayley that asks ``.item()`` inside the op is caught and named."""
    from fourierft.ops import butterfly_op

    real = butterfly_op.cayley
    monkeypatch.setattr(butterfly_op, "cayley", lambda r, **k: (r.sum().item(), real(r, **k))[1])
    model = _model(32, 4, 2, dtype=torch.float32)
    with _HostReads() as mode:
        model(torch.randn(2, 32))
    assert mode.from_library and "butterfly_op.py" in mode.from_library[0][1][-1]


@pytest.mark.parametrize("route", [None, *ROUTES])
def test_no_host_reads_in_a_training_step(route):
    """Forward and backward with multiplicative dropout, inside and outside the scope, and an eval forward: no
    value is read back to the host from library code on any path."""
    model = _model(32, 4, 2, dtype=torch.float32, dropout=0.3)
    x = torch.randn(2, 6, 32, requires_grad=True)
    with _HostReads() as mode, _force_route(route) if route else contextlib.nullcontext():
        model.train()
        model(x).square().mean().backward()
        with fourierft.cached_merged_weights():
            model(x).square().mean().backward()
            model(x).square().mean().backward()
        model.eval()
        with torch.no_grad():
            model(x)
    assert mode.from_library == [], mode.from_library
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("route", ROUTES)
def test_meta_device_training_step(route):
    with torch.device("meta"):
        base = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32))
    model = fourierft.get_peft_model(base, BOFTConfig(target_modules=["0", "2"], boft_block_size=4,
                                                      boft_n_butterfly_factor=2, boft_dropout=0.2))
    x = torch.empty(3, 32, device="meta")
    with _force_route(route), fourierft.cached_merged_weights():
        out = model(x)
        out.sum().backward()
    assert out.device.type == "meta" and out.shape == (3, 32)
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters() if p.requires_grad)


def test_fake_cuda_eval_forward_uses_the_device_rule():
    """CUDA-typed fake tensors on a CPU-only build: injection, plans, the scope and an eval forward on every
    path, decided by the non-CPU rule. (Autograd on fake CUDA tensors aborts this build; see
    tests/test_fourierft_routes.py.)"""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        with torch.device("meta"):
            base = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))
        for module in base.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(torch.empty(p.shape, device="cuda"), p.requires_grad))
        model = fourierft.get_peft_model(base, BOFTConfig(target_modules=["0", "2"], boft_block_size=4,
                                                          boft_n_butterfly_factor=3)).eval()
        x = torch.empty(2, 5, 64, device="cuda")
        for route in (None, *ROUTES):
            with torch.no_grad(), _force_route(route) if route else contextlib.nullcontext(), \
                    fourierft.cached_merged_weights():
                choices = fourierft.explain_routes(model, x, grad=False)
                out = model(x)
            assert isinstance(out, FakeTensor) and out.device.type == "cuda" and out.shape == (2, 5, 64)
            assert [c.device for c in choices] == ["cuda", "cuda"]
            assert all(c.route == (route or min(c.costs, key=c.costs.get)) for c in choices)
