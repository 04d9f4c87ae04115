"""Contract tests for `fourierft.ops.butterfly` against PEFT and an independent dense reference."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fourierft.ops import butterfly as bf
from fourierft.ops import butterfly_scale

peft_boft = pytest.importorskip("peft.tuners.boft.layer")


def peft_perm(n, b, r, nbf0):
    # `block_butterfly_perm` is a method that never touches `self`.
    return peft_boft.BOFTLayer.block_butterfly_perm(None, n, b, r, nbf0)


def reference_rotation(q, perms):
    """M = B_{m-1} ... B_0, B_i = P_i blockdiag(Q_i) P_i^T, from explicit permutation matrices."""
    n = perms.shape[1]
    m_total = torch.eye(n, dtype=q.dtype)
    for i in range(q.shape[0]):
        p = torch.zeros(n, n, dtype=q.dtype)
        p[torch.arange(n), perms[i]] = 1.0
        m_total = p @ torch.block_diag(*q[i]) @ p.T @ m_total
    return m_total


def reference_cayley(r):
    eye = torch.eye(r.shape[-1], dtype=r.dtype)
    s = 0.5 * (r - r.mT)
    return torch.linalg.solve(eye + s, eye - s, left=False)


def peft_permutations(n, num, size, m):
    return torch.stack([peft_perm(n, int(num / 2**i), int(size / 2), m - 1) for i in range(m)])


BUTTERFLY_MODULES = ["butterfly", "butterfly_blocks", "butterfly_geometry", "butterfly_op", "butterfly_paths",
                     "butterfly_plan", "butterfly_routes", "butterfly_scale", "scope"]


@pytest.mark.parametrize("name", BUTTERFLY_MODULES)
def test_star_import_gives_every_public_name(name):
    """``from fourierft.ops.butterfly import *`` raised ``AttributeError`` while ``__all__`` listed ``prepare``."""
    import importlib

    namespace: dict = {}
    exec(f"from fourierft.ops.{name} import *", namespace)  # noqa: S102
    module = importlib.import_module(f"fourierft.ops.{name}")
    assert module.__all__ and set(module.__all__) <= set(namespace)


# ---------------------------------------------------------------------------------------------
# Permutations
# ---------------------------------------------------------------------------------------------
def test_permutation_examples():
    assert bf.block_butterfly_perm(16, 2, 2, 1).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert bf.block_butterfly_perm(16, 1, 2, 1).tolist() == [0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15]
    assert bf.block_butterfly_perm(16, 4, 1, 1).tolist()[:8] == [0, 2, 1, 3, 4, 6, 5, 7]
    assert bf.block_butterfly_perm(16, 4, 1, 0).tolist() == list(range(16))


def test_block_butterfly_perm_matches_peft():
    cases = 0
    for n in (4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128):
        for b in range(1, n + 1):
            for r in range(1, n + 1):
                if n % b or (n // b) % r or 2 * b * r > n:
                    continue
                for nbf0 in (0, 1, 3):
                    ours = bf.block_butterfly_perm(n, b, r, nbf0)
                    assert ours.dtype == torch.int64
                    assert torch.equal(ours, peft_perm(n, b, r, nbf0)), (n, b, r, nbf0)
                    cases += 1
    assert cases > 500


def test_block_butterfly_perm_rejects_bad_chunks():
    with pytest.raises(ValueError, match="Invalid number of blocks"):
        bf.block_butterfly_perm(16, 8, 2, 1)
    with pytest.raises(ValueError, match="tile"):
        bf.block_butterfly_perm(14, 2, 3, 1)


@pytest.mark.parametrize("n,size,m", [(16, 2, 2), (32, 4, 3), (64, 4, 4), (96, 6, 2), (4096, 8, 4), (64, 8, 1)])
def test_butterfly_permutations_match_peft_construction(n, size, m):
    perms = bf.butterfly_permutations(n, n // size, size, m)
    assert perms.shape == (m, n)
    assert torch.equal(perms, peft_permutations(n, n // size, size, m))
    assert torch.equal(perms[0], torch.arange(n))


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,expected",
    [
        ((64, 4, 0, 1), (4, 16)),
        ((64, 0, 16, 1), (4, 16)),
        ((64, 4, 16, 3), (4, 16)),
        ((768, 0, 96, 4), (8, 96)),
        ((30, 3, 0, 1), (3, 10)),
    ],
)
def test_block_geometry_valid(args, expected):
    assert bf.block_geometry(*args) == expected


@pytest.mark.parametrize(
    "args,fragments",
    [
        ((64, 0, 0, 1), ["both are 0", "[1, 2, 4, 8, 16, 32, 64]"]),
        ((64, 4, 8, 1), ["boft_block_size=4", "boft_block_num=8", "product", "n=64"]),
        ((64, 6, 0, 1), ["boft_block_size=6", "divide n=64", "valid boft_block_size"]),
        ((64, 0, 5, 1), ["boft_block_num=5", "divide n=64"]),
        ((60, 3, 0, 2), ["boft_block_size=3", "even", "[2, 6, 10, 30]"]),
        ((64, 16, 0, 4), ["boft_block_num=4", "2**(m-1)=8", "[2, 4, 8]"]),
        ((64, 4, 0, 0), ["boft_n_butterfly_factor", ">= 1"]),
        ((64, -4, 0, 1), [">= 0"]),
    ],
)
def test_block_geometry_messages(args, fragments):
    with pytest.raises(ValueError) as info:
        bf.block_geometry(*args)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_block_geometry_agrees_with_permutation_construction():
    # Every geometry it accepts builds valid permutations; PEFT's extra checks are implied.
    for n in (8, 12, 16, 24, 48, 64, 96):
        for size in range(1, n + 1):
            for m in (1, 2, 3, 4):
                try:
                    size_, num = bf.block_geometry(n, size, 0, m)
                except ValueError:
                    continue
                perms = bf.butterfly_permutations(n, num, size_, m)
                assert torch.equal(perms.sort(dim=1).values, torch.arange(n).expand(m, n))
                if m > 1:
                    assert m - 1 <= int(math.log2(num)) and num % 2 == 0 and n % (size_ * 2 ** (m - 1)) == 0


# ---------------------------------------------------------------------------------------------
# Cayley
# ---------------------------------------------------------------------------------------------
def test_cayley_golden():
    q = bf.cayley(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(q, torch.tensor([[0.6, -0.8], [0.8, 0.6]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [1, 2, 4, 7, 8, 13, 16, 32])
def test_cayley_orthogonal_and_matches_solve(dtype, size):
    r = torch.randn(3, 5, size, size, dtype=dtype)
    q = bf.cayley(r)
    assert q.shape == r.shape and q.dtype == dtype
    eye = torch.eye(size, dtype=dtype).expand_as(q)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(q @ q.mT, eye, atol=tol, rtol=0)
    torch.testing.assert_close(q, reference_cayley(r), atol=tol * 10, rtol=0)
    torch.testing.assert_close(bf.cayley(torch.zeros_like(r)), eye)


def test_cayley_low_precision_is_computed_in_float32():
    r = torch.randn(4, 8, 8)
    q = bf.cayley(r.bfloat16())
    assert q.dtype == torch.bfloat16
    torch.testing.assert_close(q, reference_cayley(r.bfloat16().float()).bfloat16())


@pytest.mark.parametrize("size", [3, 8, 12])
def test_cayley_gradcheck(size):
    r = torch.randn(2, size, size, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bf.cayley, (r,))
    g = torch.randn(2, size, size, dtype=torch.float64)
    (ours,) = torch.autograd.grad(bf.cayley(r), r, g)
    (ref,) = torch.autograd.grad(reference_cayley(r), r, g)
    torch.testing.assert_close(ours, ref)


# ---------------------------------------------------------------------------------------------
# Rotation
# ---------------------------------------------------------------------------------------------
@st.composite
def geometries(draw):
    m = draw(st.integers(1, 4))
    size = draw(st.sampled_from([2, 4, 6, 8]) if m > 1 else st.integers(1, 8))
    num = draw(st.integers(1, 3)) * 2 ** (m - 1) * (1 if m > 1 else draw(st.integers(1, 4)))
    lead = draw(st.lists(st.integers(0, 3), min_size=0, max_size=3))
    return m, size, num, tuple(lead)


@settings(max_examples=60, deadline=None)
@given(geometries(), st.integers(0, 2**31 - 1))
def test_rotate_matches_dense_reference(geometry, seed):
    m, size, num, lead = geometry
    n = num * size
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(m, num, size, size, dtype=torch.float64, generator=gen)
    x = torch.randn(*lead, n, dtype=torch.float64, generator=gen)
    perms = peft_permutations(n, num, size, m)
    q = bf.cayley(r)
    dense = reference_rotation(q, perms)
    for plan in (None, bf.permutation_plan(perms, size)):
        torch.testing.assert_close(bf.rotate(x, q, plan), x @ dense, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(bf.rotate_transpose(x, q, plan), x @ dense.T, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(bf.dense_rotation(q, plan=plan), dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(bf.dense_rotation(q, perms), dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dense @ dense.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(geometries(), st.integers(0, 2**31 - 1))
def test_rotate_gradients_match_dense_path(geometry, seed):
    m, size, num, lead = geometry
    n = num * size
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(m, num, size, size, dtype=torch.float64, generator=gen).requires_grad_()
    x = torch.randn(*lead, n, dtype=torch.float64, generator=gen).requires_grad_()
    g = torch.randn(*lead, n, dtype=torch.float64, generator=gen)
    perms = peft_permutations(n, num, size, m)
    ref = torch.autograd.grad(x @ reference_rotation(reference_cayley(r), perms), (x, r), g)
    for plan in (None, bf.permutation_plan(perms, size)):
        ours = torch.autograd.grad(bf.rotate(x, bf.cayley(r), plan), (x, r), g)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("n,size,m", [(512, 32, 3), (1024, 64, 3), (512, 4, 7), (256, 2, 8)])
def test_rotate_wide_rotations(n, size, m):
    # Blocks wider than the chain limit (tiled identity) and beyond the fused limit (factor by factor).
    gen = torch.Generator().manual_seed(n + m)
    q = bf.cayley(torch.randn(m, n // size, size, size, dtype=torch.float64, generator=gen))
    x = torch.randn(2, 3, n, dtype=torch.float64, generator=gen)
    dense = reference_rotation(q, peft_permutations(n, n // size, size, m))
    torch.testing.assert_close(bf.rotate(x, q), x @ dense)
    torch.testing.assert_close(bf.rotate_transpose(x, q), x @ dense.T)


def test_rotate_random_permutations_and_layouts():
    torch.manual_seed(0)
    m, num, size = 3, 5, 4
    n = num * size
    perms = torch.stack([torch.randperm(n) for _ in range(m)])
    q = bf.cayley(torch.randn(m, num, size, size, dtype=torch.float64))
    dense = reference_rotation(q, perms)
    x = torch.randn(n, 7, dtype=torch.float64).T  # non-contiguous
    plan = bf.permutation_plan(perms, size)
    torch.testing.assert_close(bf.rotate(x, q, plan), x @ dense)
    torch.testing.assert_close(bf.rotate_transpose(bf.rotate(x, q, plan), q, plan), x)


def test_rotate_single_factor_is_block_diag():
    q = bf.cayley(torch.randn(1, 6, 4, 4, dtype=torch.float64))
    torch.testing.assert_close(bf.dense_rotation(q), torch.block_diag(*q[0]))


@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64), (64,)])
def test_rotate_degenerate_inputs(shape):
    r = torch.randn(2, 16, 4, 4, requires_grad=True)
    x = torch.randn(*shape, requires_grad=True)
    y = bf.rotate(x, bf.cayley(r))
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and r.grad.shape == r.shape


def test_rotate_low_precision_input_keeps_dtype():
    q = bf.cayley(torch.randn(2, 16, 4, 4))
    x = torch.randn(3, 64)
    y = bf.rotate(x.bfloat16(), q)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), bf.rotate(x, q), atol=0.1, rtol=0.05)


def test_merge_identity_with_rotate_transpose():
    # W' = diag(s) W M^T (PEFT's merge) equals rotate_transpose on the weight rows.
    torch.manual_seed(1)
    q = bf.cayley(torch.randn(2, 8, 4, 4, dtype=torch.float64))
    w, s = torch.randn(5, 32, dtype=torch.float64), torch.rand(5, 1, dtype=torch.float64) + 0.5
    merged = s * bf.rotate_transpose(w, q)
    torch.testing.assert_close(merged, s * (w @ bf.dense_rotation(q).T))
    torch.testing.assert_close(bf.rotate(merged, q) / s, w)


def test_matches_peft_boft_linear_forward():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(32, 12))
    config = peft.BOFTConfig(target_modules=["0"], boft_block_size=4, init_weights=False)
    model = peft.get_peft_model(base, config)
    layer = model.base_model.model[0]
    x = torch.randn(3, 5, 32)
    lin = layer.base_layer
    q = bf.cayley(layer.boft_R["default"])
    s = layer.boft_s["default"].squeeze(-1)
    ours = (lin(bf.rotate(x, q)) - lin.bias) * s + lin.bias
    torch.testing.assert_close(model(x), ours)


# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------
def test_dropout_eval_and_zero_p_are_identity_without_rng():
    q = bf.cayley(torch.randn(2, 8, 4, 4))
    state = torch.get_rng_state()
    assert bf.multiplicative_dropout(q, 0.5, training=False) is q
    assert bf.multiplicative_dropout(q, 0.0, training=True) is q
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("p,num,counts", [(0.5, 8, {4}), (0.1, 8, {0, 1}), (0.26, 8, {2, 3}), (0.6, 4, {2, 3})])
def test_dropout_drops_floor_or_ceil_p_num_blocks_in_one_factor(p, num, counts):
    torch.manual_seed(3)
    q = bf.cayley(torch.randn(3, num, 4, 4) + 1.0)
    seen = set()
    for _ in range(40):
        out = bf.multiplicative_dropout(q, p, training=True)
        dropped = int((out == torch.eye(4)).flatten(2).all(-1).sum())
        changed = (out != q).flatten(1).any(-1)
        assert dropped in counts
        assert int(changed.sum()) == (1 if dropped else 0)  # one factor at most
        seen.add(dropped)
    assert seen == counts  # both roundings happen when p * N is fractional


@pytest.mark.parametrize("p,num", [(0.1, 8), (0.3, 4), (0.05, 16)])
def test_dropout_drops_each_block_with_probability_p(p, num):
    """PEFT drops int(p N) blocks, so 0.1 over 8 blocks drops none; each block must go with probability p."""
    torch.manual_seed(0)
    q = bf.cayley(torch.randn(1, num, 4, 4) + 1.0)
    trials = 4000
    drops = torch.zeros(num)
    for _ in range(trials):
        drops += (bf.multiplicative_dropout(q, p, training=True) == torch.eye(4)).flatten(2).all(-1)[0].float()
    rate = drops / trials
    sd = (p * (1 - p) / trials) ** 0.5
    assert (rate - p).abs().max() < 5 * sd, rate  # every block, not only on average


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_dropout_matches_peft_with_same_seed(seed):
    q = bf.cayley(torch.randn(3, 10, 4, 4, generator=torch.Generator().manual_seed(seed)))
    layer = peft_boft.MultiplicativeDropoutLayer(p=0.3).train()
    torch.manual_seed(seed)
    ref = layer(q)
    ref_state = torch.get_rng_state()
    torch.manual_seed(seed)
    ours = bf.multiplicative_dropout(q, 0.3, training=True)
    torch.testing.assert_close(ours, ref)
    assert torch.equal(torch.get_rng_state(), ref_state)


# ---------------------------------------------------------------------------------------------
# Cost contract: no n x n tensor in forward or backward
# ---------------------------------------------------------------------------------------------
class _RecordSizes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.sizes += [(str(func), t.numel()) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


@pytest.mark.parametrize("size,m,explicit,route", [
    (size, m, False, route) for size, m in [(4, 1), (4, 3), (8, 3), (2, 5)] for route in ("fused", "factors")
] + [(4, 3, True, "factors")])  # arbitrary permutations have no fused path
def test_no_dense_matrix_in_forward_or_backward(size, m, explicit, route):
    """The fused and factor paths never hold an ``n x n`` tensor (only the ``"dense"`` path builds ``M``)."""
    n, t = 64, 4
    num = n // size
    r = torch.randn(m, num, size, size, requires_grad=True)
    x = torch.randn(t, n, requires_grad=True)
    plan = bf.permutation_plan(bf.butterfly_permutations(n, num, size, m), size) if explicit else None
    with _RecordSizes() as rec:
        y = bf.rotate(x, bf.multiplicative_dropout(bf.cayley(r), 0.5, True), plan, route=route)
        y.backward(torch.randn_like(y))
    assert rec.sizes, "dispatch mode recorded nothing"
    biggest = max(rec.sizes, key=lambda item: item[1])
    assert biggest[1] < n * n, biggest


# ---------------------------------------------------------------------------------------------
# Output scale
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("chunk", [16, 1 << 18])
def test_scale_output_matches_peft_formula(monkeypatch, with_bias, chunk):
    monkeypatch.setattr(butterfly_scale, "_SCALE_CHUNK", chunk)
    monkeypatch.setattr(butterfly_scale, "_SINGLE_PASS", chunk * 4)  # 16: row chunks; 2**18: one pass
    gen = torch.Generator().manual_seed(5)
    y = torch.randn(4, 9, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    s = (torch.rand(7, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    b = torch.randn(7, dtype=torch.float64, generator=gen).requires_grad_() if with_bias else None
    g = torch.randn(4, 9, 7, dtype=torch.float64, generator=gen)
    ref = (y - b) * s + b if with_bias else y * s
    ours = bf.scale_output(y, s, b)
    torch.testing.assert_close(ours, ref)
    inputs = (y, s, b) if with_bias else (y, s)
    expected = torch.autograd.grad(ref, inputs, g)
    for a, r in zip(torch.autograd.grad(ours, inputs, g), expected):
        torch.testing.assert_close(a, r)
    # Only the scale trains (frozen input path): no gradient for y is computed.
    (gs,) = torch.autograd.grad(bf.scale_output(y.detach(), s, b.detach() if with_bias else None), s, g)
    torch.testing.assert_close(gs, expected[1])


@settings(max_examples=40, deadline=None)
@given(geometries(), st.integers(1, 3), st.integers(1, 5), st.booleans(), st.integers(0, 2**31 - 1))
def test_rotate_per_sample_matches_dense_per_sample(geometry, k, samples, mixed_geometry, seed):
    """Each sample rotated by its own adapter's dense M (identity for slot k), with gradients."""
    m, size, num, lead = geometry
    n = num * size
    gen = torch.Generator().manual_seed(seed)
    shapes = [(m, num, size, size)] * k
    if mixed_geometry and k > 1 and m > 1:  # a second geometry forces the per-adapter path
        shapes[-1] = (1, num, size, size)
    rs = [torch.randn(shape, dtype=torch.float64, generator=gen, requires_grad=True) for shape in shapes]
    x = torch.randn(samples, *lead, n, dtype=torch.float64, generator=gen, requires_grad=True)
    slots = torch.randint(0, k + 1, (samples,), generator=gen)
    qs = [bf.cayley(r) for r in rs]
    got = bf.rotate_per_sample(x, qs, slots)
    dense = [reference_rotation(q, peft_permutations(n, num, size, q.shape[0])) for q in qs]
    dense.append(torch.eye(n, dtype=torch.float64))
    want = torch.stack([x[s] @ dense[int(slots[s])] for s in range(samples)]) if samples else x
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    gy = torch.randn(want.shape, dtype=torch.float64, generator=gen)
    for a, b in zip(torch.autograd.grad(got, [x, *rs], gy, allow_unused=True, retain_graph=True),
                    torch.autograd.grad(want, [x, *rs], gy, allow_unused=True)):
        if a is None or b is None:
            assert (a is None or not a.abs().sum()) and (b is None or not b.abs().sum())
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
