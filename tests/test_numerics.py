"""Numerics: every float dtype, empty and single-token batches, non-contiguous inputs, very large values.

For both methods, forward and backward, merged and unmerged. The reference is the same model in float64
(adapter included); tolerances are relative to the largest output or gradient and follow the dtype.
``docs/guarantees.md`` lists the promises these tests hold.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import METHODS as METHOD_TABLE
from fourierft import get_peft_model

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
TOL = {torch.float16: 2e-2, torch.bfloat16: 8e-2, torch.float32: 1e-5, torch.float64: 1e-10}
#: Per method: settings for the 16 -> 24 -> 8 layers below (a method missing here fails loudly).
SETTINGS = {
    "fourierft": {"n_frequency": 20, "scaling": 20.0},
    "boft": {"init_weights": False, "boft_block_size": 4, "boft_n_butterfly_factor": 2},
}
METHODS = list(METHOD_TABLE)
D_IN = 16


def make(method: str, dtype: torch.dtype = torch.float32, seed: int = 0, **kwargs) -> nn.Module:
    """Linear 16->24, tanh, Linear 24->8, both adapted, in ``dtype``."""
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(D_IN, 24), nn.Tanh(), nn.Linear(24, 8)).to(dtype)
    config = METHOD_TABLE[method].config_cls(target_modules=["0", "2"], **{**SETTINGS[method], **kwargs})
    return get_peft_model(base, config).eval()


def adapter_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def magnitude(t: torch.Tensor) -> float:
    return max(1.0, t.detach().abs().max().item()) if t.numel() else 1.0


def assert_near(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    torch.testing.assert_close(got.detach().double(), want.detach().double(), atol=tol * magnitude(want), rtol=tol)


def forward_backward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
    x = x.detach().clone().requires_grad_() if x.is_contiguous() else x.detach().requires_grad_()
    y = model(x)
    weights = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape).to(y.dtype)
    (y * weights).float().sum().backward()
    grads = {n: p.grad for n, p in adapter_params(model).items()}
    for p in adapter_params(model).values():
        p.grad = None
    return y, grads, x.grad


# ---------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_in_every_dtype(method, dtype):
    model = make(method, dtype).train()
    reference = copy.deepcopy(model).double()
    params = adapter_params(model)
    assert params
    for p in params.values():  # fp16/bf16 adapters are kept in fp32 (autocast_adapter_dtype)
        assert p.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    x = torch.randn(3, 5, D_IN, dtype=torch.float64)
    y, grads, x_grad = forward_backward(model, x.to(dtype))
    y_ref, grads_ref, x_grad_ref = forward_backward(reference, x)
    assert y.dtype == dtype and y.shape == (3, 5, 8) and torch.isfinite(y).all()
    assert_near(y, y_ref, TOL[dtype])
    assert x_grad.dtype == dtype and torch.isfinite(x_grad).all()
    assert_near(x_grad, x_grad_ref, TOL[dtype])
    for name, grad in grads.items():
        assert grad is not None and grad.dtype == params[name].dtype and torch.isfinite(grad).all(), name
        assert_near(grad, grads_ref[name], 3 * TOL[dtype])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_and_unmerge_in_every_dtype(method, dtype):
    model = make(method, dtype)
    weights = [m.weight.detach().clone() for m in model.get_base_model() if isinstance(m, nn.Linear)]
    x = torch.randn(4, D_IN, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter(safe_merge=True)
        merged = model(x)
        model.unmerge_adapter()
        again = model(x)
    assert merged.dtype == dtype and torch.isfinite(merged).all()
    assert_near(merged, unmerged, 2 * TOL[dtype])
    assert_near(again, unmerged, 2 * TOL[dtype])
    layers = [m.get_base_layer() for m in model.modules() if hasattr(m, "merged_adapters")]
    for layer, before in zip(layers, weights):
        assert layer.weight.dtype == dtype
        assert_near(layer.weight, before, 2 * TOL[dtype])


# ---------------------------------------------------------------------------------------------- batch shapes
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(0, D_IN), (0, 5, D_IN), (3, 0, D_IN), (0, 0, D_IN)], ids=str)
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_empty_batches(method, shape, merged):
    model = make(method).train()
    if merged:
        model.merge_adapter()
    y, grads, x_grad = forward_backward(model, torch.randn(shape))
    assert y.shape == (*shape[:-1], 8) and x_grad.shape == shape
    for name, grad in grads.items():
        assert grad is None or (torch.isfinite(grad).all() and not grad.any()), name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_single_tokens_equal_their_row_of_a_batch(method, dtype):
    model = make(method, dtype)
    batch = torch.randn(6, D_IN, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        full = model(batch)
        for i in range(batch.shape[0]):
            for x, squeeze in ((batch[i], ()), (batch[i:i + 1], (0,)), (batch[i][None, None], (0, 1))):
                y = model(x)
                for dim in reversed(squeeze):
                    y = y.squeeze(dim)
                assert_near(y, full[i], TOL[dtype])


def _non_contiguous(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if kind == "transposed":
        return torch.randn(D_IN, 7, generator=g).T
    if kind == "sliced":
        return torch.randn(7, 2 * D_IN, generator=g)[:, ::2]
    if kind == "expanded":
        return torch.randn(1, D_IN, generator=g).expand(7, D_IN)
    if kind == "permuted":
        return torch.randn(D_IN, 3, 4, generator=g).permute(1, 2, 0)
    return torch.randn(3, 7, D_IN, generator=g)[:, 1:6:2]  # "strided-3d"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["transposed", "sliced", "expanded", "permuted", "strided-3d"])
def test_non_contiguous_inputs(method, kind):
    model = make(method).train()
    x = _non_contiguous(kind)
    assert not x.is_contiguous()
    y, grads, x_grad = forward_backward(model, x)
    y_ref, grads_ref, x_grad_ref = forward_backward(model, x.contiguous())
    assert_near(y, y_ref, 1e-6)
    assert_near(x_grad, x_grad_ref, 1e-6)
    for name in grads:
        assert_near(grads[name], grads_ref[name], 1e-5)
    with torch.no_grad():
        model.merge_adapter()
        assert_near(model(x), y_ref, 1e-5)


# ---------------------------------------------------------------------------------------------- large values
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_fourierft_scaling_1e6_stays_finite(dtype):
    model = make("fourierft", dtype, scaling=1e6).train()
    x = torch.randn(4, D_IN, dtype=torch.float64).to(dtype)
    y, grads, x_grad = forward_backward(model, x)
    assert torch.isfinite(y).all() and torch.isfinite(x_grad).all()
    assert all(torch.isfinite(g).all() for g in grads.values())
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        assert_near(model(x), reference(x.double()), TOL[dtype])
        unmerged = model(x)
        model.merge_adapter(safe_merge=True)
        assert_near(model(x), unmerged, 4 * TOL[dtype])


def test_fourierft_scaling_1e6_in_float16_overflows_only_where_float16_must():
    """fp16 tops out at 65504: the forward gives inf exactly where the exact result is out of range (as the
    base layer would), and safe_merge refuses a merged weight that does not fit, with a clear message."""
    model = make("fourierft", torch.float16, scaling=1e6)
    reference = copy.deepcopy(model).double()
    x = torch.randn(64, D_IN, dtype=torch.float64)
    with torch.no_grad():
        y = model(x.half()).double()
        first = reference.get_base_model()[0](x)
        y_first = model.get_base_model()[0](x.half()).double()
    fits = first.abs() < 60000
    assert torch.isfinite(y_first[fits]).all() and not torch.isfinite(y_first[first.abs() > 70000]).any()
    assert_near(y_first[fits], first[fits], TOL[torch.float16])
    deltas = [m.get_delta_weight("default") + m.get_base_layer().weight.double()
              for m in model.modules() if hasattr(m, "get_delta_weight")]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if max(d.abs().max().item() for d in deltas) > 65504:
        with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
            model.merge_adapter(safe_merge=True)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    else:
        model.merge_adapter(safe_merge=True)
        assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert y.shape == (64, 8)


def test_fourierft_scaling_too_large_for_float16_is_refused_by_safe_merge():
    model = make("fourierft", torch.float16, scaling=1e9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default"):
        model.merge_adapter(safe_merge=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("magnitude_R", [1e3, 1e6])
def test_boft_huge_rotation_parameters_stay_finite_and_orthogonal(dtype, magnitude_R):
    model = make("boft", dtype).train()
    with torch.no_grad():
        for name, p in adapter_params(model).items():
            if "boft_R" in name:
                p.mul_(magnitude_R / 0.1)
            else:
                p.mul_(1e3)
    x = torch.randn(5, D_IN, dtype=torch.float64).to(dtype)
    y, grads, x_grad = forward_backward(model, x)
    assert torch.isfinite(y).all() and torch.isfinite(x_grad).all()
    assert all(torch.isfinite(g).all() for g in grads.values())
    layer = model.get_base_model()[0]
    blocks = layer.rotation_blocks("default")
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype)
    torch.testing.assert_close(blocks @ blocks.mT, eye.expand_as(blocks), atol=1e-5, rtol=0)
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter(safe_merge=True)
        assert_near(model(x), unmerged, 1e-4 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_training_step_updates_adapters(method, dtype):
    """A step of plain SGD on a half-precision base model changes the fp32 adapters, and only them."""
    model = make(method, dtype).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = adapter_params(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.SGD(params.values(), lr=1e-2)
    model(torch.randn(4, D_IN).to(dtype)).float().square().mean().backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in params.values())
    assert any(not torch.equal(p, before[n]) for n, p in params.items())
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
