"""torch.compile, reduced precision and gradient checkpointing with FourierFT and BOFT adapters.

* ``torch.compile`` (``aot_eager``: Dynamo + AOTAutograd, the parts that see our layers and their custom
  autograd Functions, without inductor's C++ build) gives the eager loss, gradients and eval outputs, and
  Dynamo traces our layers without graph breaks. An inductor run checks the same (its cold compile takes
  20-75 s on two CPU cores; ``-k inductor`` runs it alone).
* bf16 autocast training stays finite and close to fp32, with fp32 adapter gradients.
* bf16 / fp16 base models: adapters stay fp32 with ``autocast_adapter_dtype=True`` and take the base dtype
  with ``False``; forward and backward work either way; merge / unmerge keep the base dtype.
* Gradient checkpointing (reentrant or not) gives the gradients of a plain backward.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch._dynamo
from torch import nn

from conftest import METHODS as METHOD_TABLE, assert_visible, build, make_inputs
from fourierft import get_peft_model

LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]  # o_proj: BOFT's effect 0.17, 16x the bf16 tolerance
#: Adapters that start away from the identity, so every path carries a non-trivial contribution.
SETTINGS = {
    "fourierft": {"n_frequency": 40, "scaling": 20.0, "init_weights": False},
    # b = 8, m = 2: on 16 features the rotation goes factor by factor, on 32 through the fused blocks
    "boft": {"boft_block_size": 8, "boft_n_butterfly_factor": 2, "init_weights": False},
}


def make_config(method: str, targets: list[str], **kwargs):
    return METHOD_TABLE[method].config_cls(target_modules=targets, **SETTINGS[method], **kwargs)


METHODS = list(METHOD_TABLE)


class Block(nn.Module):
    """A residual MLP block with a head: the adapted ``up``/``down`` see inputs that require grad."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.down(nn.functional.gelu(self.up(x)))
        return self.head(self.norm(h))


def block_input(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(seed))


def adapter_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- compile
def run_compiled(method: str, backend: str) -> dict:
    """Two training steps and one eval forward, compiled and eager, from the same start.

    The compiled model runs first and, for FourierFT, with frequency positions no other test uses, so
    that nothing our layers cache lazily exists yet: the situation right after ``get_peft_model``.
    """
    torch.manual_seed(0)
    seed = {"aot_eager": 4242, "inductor": 4343}[backend]
    extra = {"random_loc_seed": seed} if method == "fourierft" else {}
    eager = get_peft_model(Block(), make_config(method, ["up", "down"], **extra)).train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=backend)
    models = (compiled, eager)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (compiled_model, eager)]
    torch._dynamo.utils.counters.clear()
    steps = []
    for step in range(2):  # the second step follows an optimizer update: no stale values in the graph
        xs = [block_input(step).requires_grad_() for _ in models]
        losses = [m(x).square().mean() for m, x in zip(models, xs)]
        for loss, opt in zip(losses, opts):
            opt.zero_grad()
            loss.backward()
        steps.append(dict(loss=[l.detach() for l in losses], x_grad=[x.grad for x in xs],
                          grads=[adapter_grads(compiled_model), adapter_grads(eager)]))
        for opt in opts:
            opt.step()
    compiled_model.eval()
    eager.eval()
    with torch.no_grad():
        outputs = [m(block_input(7)) for m in models]
    breaks = torch._dynamo.utils.counters["graph_break"]
    return dict(steps=steps, eval=outputs, graph_breaks=[f"{n} x {r}" for r, n in breaks.items()])


@pytest.fixture(scope="module")
def compiled_runs():
    cache = {}

    def get(method: str, backend: str) -> dict:
        if (method, backend) not in cache:
            torch._dynamo.reset()
            cache[method, backend] = run_compiled(method, backend)
        return cache[method, backend]

    return get


def check_matches_eager(run: dict) -> None:
    for step in run["steps"]:
        got, want = step["loss"]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        got, want = step["x_grad"]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        got, want = step["grads"]
        assert got.keys() == want.keys() and len(want) >= 2
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(*run["eval"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_compiled_training_and_eval_match_eager(compiled_runs, method):
    check_matches_eager(compiled_runs(method, "aot_eager"))


# Inductor warns once per process that it cannot generate code for complex operators: FourierFT's spectral route
# takes complex FFTs, which inductor hands to the same kernels eager mode calls (docs/performance.md says so to
# users). The test checks the numbers, not that warning.
@pytest.mark.filterwarnings("ignore:Torchinductor does not support code generation for complex operators:UserWarning")
@pytest.mark.parametrize("method", METHODS)
def test_inductor_training_and_eval_match_eager(compiled_runs, method):
    check_matches_eager(compiled_runs(method, "inductor"))


@pytest.mark.parametrize("method", METHODS)
def test_no_graph_breaks_in_adapter_layers(compiled_runs, method):
    """The only modules in ``Block`` with Python logic are our adapter layers: any break is ours."""
    breaks = compiled_runs(method, "aot_eager")["graph_breaks"]
    assert not breaks, "\n".join(breaks)


# ---------------------------------------------------------------------------------------------- precision
def llama_batch() -> dict:
    inputs = make_inputs("llama")
    return dict(inputs, labels=inputs["input_ids"])


def base_logits_dtype(dtype: torch.dtype = torch.float32, autocast: bool = False) -> torch.dtype:
    """The logits dtype of the plain base model: its own dtype (or autocast's) in transformers 5, float32 in 4.x,
    whose Llama upcasts its logits; the adapted model must give the same."""
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context, torch.no_grad():
        return build("llama").to(dtype)(**llama_batch()).logits.dtype


def adapted_llama(method: str, dtype: torch.dtype = torch.float32, **kwargs):
    base = build("llama").to(dtype)
    torch.manual_seed(3)
    return get_peft_model(base, make_config(method, LLAMA_TARGETS, task_type="CAUSAL_LM"), **kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_training_is_finite_and_close_to_fp32(method):
    models = [adapted_llama(method).train() for _ in range(2)]
    start = {n: p.detach().clone() for n, p in models[0].named_parameters() if p.requires_grad}
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in models]
    batch = llama_batch()
    autocast_dtype = base_logits_dtype(autocast=True)
    for _ in range(3):
        fp32 = models[0](**batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = models[1](**batch)
        assert bf16.logits.dtype == autocast_dtype
        torch.testing.assert_close(bf16.loss.float(), fp32.loss, atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(bf16.logits.float(), fp32.logits, atol=5e-2, rtol=5e-2)
        for out, opt in zip((fp32, bf16), opts):
            opt.zero_grad()
            out.loss.backward()
        grads32, grads16 = adapter_grads(models[0]), adapter_grads(models[1])
        for name, g in grads16.items():
            assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
            cos = nn.functional.cosine_similarity(g.flatten(), grads32[name].flatten(), dim=0)
            assert cos > 0.99, (name, float(cos))
        for opt in opts:
            opt.step()
    for (name, p16), p32 in zip(models[1].named_parameters(), models[0].parameters()):
        if name in start:  # the updates agree: training under autocast follows fp32 training
            assert p16.dtype == torch.float32 and torch.isfinite(p16).all(), name
            step16, step32 = p16.detach() - start[name], p32.detach() - start[name]
            assert step32.norm() > 0 and (step16 - step32).norm() <= 0.05 * step32.norm(), name


#: Half-precision logits against fp32 (measured max error: bf16 3e-3, fp16 3.5e-4, both methods); fp16's is tight
#: enough to see a 10% error in BOFT's contribution.
HALF_TOL = {torch.bfloat16: dict(atol=1e-2, rtol=0.0), torch.float16: dict(atol=1.5e-3, rtol=0.0)}


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", METHODS)
def test_half_base_model_forward_backward(method, dtype, autocast_adapter_dtype):
    model = adapted_llama(method, dtype, autocast_adapter_dtype=autocast_adapter_dtype).train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    adapter_dtype = torch.float32 if autocast_adapter_dtype else dtype
    assert {p.dtype for p in trainable.values()} == {adapter_dtype}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {dtype}  # the base model is not upcast
    out = model(**llama_batch())
    assert out.logits.dtype == base_logits_dtype(dtype) and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.dtype == adapter_dtype, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    reference = adapted_llama(method).eval()  # same weights in fp32
    model.eval()
    with torch.no_grad():
        ref = reference(**llama_batch()).logits
        with reference.disable_adapter():
            assert_visible(ref, reference(**llama_batch()).logits, **HALF_TOL[dtype])
        torch.testing.assert_close(model(**llama_batch()).logits.float(), ref, **HALF_TOL[dtype])


@pytest.mark.parametrize("method", METHODS)
def test_merge_unmerge_in_bf16(method):
    model = adapted_llama(method, torch.bfloat16).eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    base = layer.get_base_layer()
    weight = base.weight.detach().clone()
    inputs = make_inputs("llama")
    with torch.no_grad():
        unmerged = model(**inputs).logits.float()
        model.merge_adapter()
        assert base.weight.dtype == torch.bfloat16 and layer.merged
        merged_weight = base.weight.detach().float()
        torch.testing.assert_close(model(**inputs).logits.float(), unmerged, atol=2e-2, rtol=2e-2)
        model.unmerge_adapter()
    assert base.weight.dtype == torch.bfloat16 and not layer.merged
    # merge and unmerge each round to bf16 once: allow two bf16 ulps of the merged weight
    ulp = merged_weight.abs().max() * 2.0 ** -7
    torch.testing.assert_close(base.weight.float(), weight.float(), atol=float(2 * ulp), rtol=0)
    plain = model.merge_and_unload()
    assert all(p.dtype == torch.bfloat16 for p in plain.parameters())
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits.float(), unmerged, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------------------- checkpointing
def enable_checkpointing(model, kwargs: dict) -> None:
    """transformers >= 5 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("how", ["base-first", "peft-gradient", "peft-activation"])
@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_gives_plain_gradients(method, use_reentrant, how):
    batch = llama_batch()
    plain = adapted_llama(method).train()
    plain(**batch).loss.backward()
    want = adapter_grads(plain)

    kwargs = {"use_reentrant": use_reentrant}
    if how == "base-first":  # PEFT's documented order: enable on the base model, then wrap
        base = build("llama")
        enable_checkpointing(base, kwargs)
        torch.manual_seed(3)
        model = get_peft_model(base, make_config(method, LLAMA_TARGETS, task_type="CAUSAL_LM"))
    else:
        model = adapted_llama(method)
        if how == "peft-gradient":  # PEFT's PeftModel API
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        elif hasattr(model.get_base_model(), "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            pytest.skip("this transformers has no activation_checkpointing_enable")
    model.train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    model(**batch).loss.backward()
    got = adapter_grads(model)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_checkpointing_enable_uses_current_transformers_api():
    import warnings

    model = adapted_llama("fourierft")
    if not hasattr(model.get_base_model(), "activation_checkpointing_enable"):
        pytest.skip("transformers < 5")
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model.gradient_checkpointing_enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
