"""FourierFT on tiny models, checked against the real ``peft`` and against the model's own invariants.

Each row of ``CASES`` is (id, model kind, config kwargs); every check below runs on every row.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fourierft
from fourierft import FourierFTConfig, FourierFTLinear
from conftest import assert_visible, build, make_inputs, model_output

CASES = [
    ("mlp-str", "mlp", dict(target_modules="lin0", n_frequency=10)),
    ("mlp-list", "mlp", dict(target_modules=["lin0"], n_frequency=10)),
    ("mlp-lin1", "mlp", dict(target_modules=["lin1"], n_frequency=10)),
    ("mlp-save", "mlp", dict(target_modules=["lin0"], n_frequency=10, modules_to_save=["lin1"])),
    ("mlp-both-save", "mlp", dict(target_modules=["lin0", "lin1"], n_frequency=10, modules_to_save=["lin1"])),
    ("mlp-pattern", "mlp", dict(target_modules=["lin0", "lin1"], n_frequency_pattern={"lin0": 5, "lin1": 30})),
    ("mlp-regex", "mlp", dict(target_modules=r"lin\d", n_frequency=7, scaling=20.0, random_loc_seed=3)),
    ("bert-default", "bert", dict(task_type="SEQ_CLS", n_frequency=50)),
    ("bert-bias", "bert", dict(task_type="SEQ_CLS", n_frequency=50, bias="fourier_only")),
    # BERT's output hardly moves with query/key alone (tiny attention scores at init): a dense layer makes the
    # adapter visible to the merge and peft comparisons (see assert_visible)
    ("bert-all-bias", "bert", dict(task_type="SEQ_CLS", n_frequency=20, bias="all",
                                   target_modules=["query", "dense"])),
    ("bert-exclude", "bert", dict(task_type="SEQ_CLS", n_frequency=20, target_modules=["query", "value", "dense"],
                                  exclude_modules=["output.dense"])),
    ("gpt2-conv1d", "gpt2", dict(task_type="CAUSAL_LM", n_frequency=40)),
    ("gpt2-attn", "gpt2", dict(task_type="CAUSAL_LM", n_frequency=40, target_modules=["c_attn", "c_proj"])),
    ("llama-default", "llama", dict(task_type="CAUSAL_LM", n_frequency=30)),
    ("llama-layers", "llama", dict(task_type="CAUSAL_LM", n_frequency=30, target_modules=["q_proj", "o_proj"],
                                   layers_to_transform=[1], layers_pattern="layers")),
    ("llama-cls", "llama_cls", dict(task_type="SEQ_CLS", n_frequency=30)),
    ("t5-seq2seq", "t5", dict(task_type="SEQ_2_SEQ_LM", n_frequency=30)),
    ("bert-features", "bert", dict(task_type="FEATURE_EXTRACTION", n_frequency=25, target_modules=["key", "dense"])),
]
IDS = [c[0] for c in CASES]
PEFT_TOL = dict(atol=2e-4, rtol=1e-3)
MERGE_TOL = dict(atol=1e-4, rtol=1e-4)


def make_pair(kind: str, kwargs: dict, seed: int = 11, init_weights: bool = False):
    """The same base model adapted by fourierft and by peft from the same seed."""
    base = build(kind)
    base_copy = copy.deepcopy(base)
    kwargs = dict(kwargs, init_weights=init_weights)
    torch.manual_seed(seed)
    ours = fourierft.get_peft_model(base, FourierFTConfig(**copy.deepcopy(kwargs)))
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(base_copy, peft.FourierFTConfig(**copy.deepcopy(kwargs)))
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_peft(case):
    _, kind, kwargs = case
    ours, theirs = make_pair(kind, kwargs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert set(ours.state_dict()) == set(theirs.state_dict())
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in theirs.named_parameters() if p.requires_grad}
    x = make_inputs(kind)
    with torch.no_grad():
        out = model_output(ours, kind, x)
        assert_visible(out, _base_output(ours, kind, x), **PEFT_TOL)
        torch.testing.assert_close(out, model_output(theirs, kind, x), **PEFT_TOL)
    ours_sd = fourierft.get_peft_model_state_dict(ours)
    theirs_sd = peft.get_peft_model_state_dict(theirs)
    assert set(ours_sd) == set(theirs_sd)
    for key in ours_sd:
        torch.testing.assert_close(ours_sd[key], theirs_sd[key], atol=0, rtol=0)
    our_layers = [n for n, m in ours.named_modules() if isinstance(m, FourierFTLinear)]
    assert our_layers and our_layers == [n for n, m in theirs.named_modules()
                                         if type(m).__name__ == "FourierFTLinear"]
    assert ours.peft_config["default"].to_dict().keys() >= {"target_modules", "n_frequency", "scaling"}
    assert sorted(ours.peft_config["default"].target_modules) == sorted(theirs.peft_config["default"].target_modules)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_equals_unmerged(case):
    _, kind, kwargs = case
    ours, theirs = make_pair(kind, kwargs)
    x = make_inputs(kind)
    with torch.no_grad():
        base_out = _base_output(ours, kind, x)
        unmerged = model_output(ours, kind, x)
        assert_visible(unmerged, base_out, **MERGE_TOL)
        ours.merge_adapter()
        torch.testing.assert_close(model_output(ours, kind, x), unmerged, **MERGE_TOL)
        ours.unmerge_adapter()
        torch.testing.assert_close(model_output(ours, kind, x), unmerged, **MERGE_TOL)
        merged_model = ours.merge_and_unload(safe_merge=True)
        assert not any(isinstance(m, FourierFTLinear) for m in merged_model.modules())
        assert not hasattr(merged_model, "peft_config")
        torch.testing.assert_close(model_output(merged_model, kind, x), unmerged, **MERGE_TOL)
        theirs_merged = theirs.merge_and_unload()
        torch.testing.assert_close(model_output(theirs_merged, kind, x), unmerged, **MERGE_TOL)


def _base_output(model, kind, x):
    with model.disable_adapter():
        return model_output(model, kind, x)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_disabled_equals_base_and_only_adapters_train(case):
    _, kind, kwargs = case
    pristine = build(kind)
    ours, _ = make_pair(kind, kwargs)
    x = make_inputs(kind)
    with torch.no_grad():
        expected = model_output(pristine, kind, x)
        if kwargs.get("bias", "none") == "none":
            torch.testing.assert_close(_base_output(ours, kind, x), expected)
    ours.train()
    out = model_output(ours, kind, x)
    out.float().pow(2).mean().backward()
    with_grad = {n for n, p in ours.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert with_grad <= trainable
    assert any("fourierft_spectrum" in n for n in with_grad)
    for name in trainable:
        ok = "fourierft_spectrum" in name or ".modules_to_save." in name
        ok = ok or (kwargs.get("bias", "none") != "none" and name.endswith("bias"))
        assert ok, name


def test_identity_init_is_base_output():
    base = build("llama")
    pristine = copy.deepcopy(base)
    model = fourierft.get_peft_model(base, FourierFTConfig(task_type="CAUSAL_LM", n_frequency=10, init_weights=True))
    x = make_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(model_output(model, "llama", x), model_output(pristine, "llama", x))


def test_training_changes_only_adapter():
    ours, _ = make_pair("bert", dict(task_type="SEQ_CLS", n_frequency=20))
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    ours.train()
    x = make_inputs("bert")
    for _ in range(3):
        opt.zero_grad()
        ours(**x, labels=torch.tensor([0, 2])).loss.backward()
        opt.step()
    for name, param in ours.named_parameters():
        changed = not torch.allclose(param, before[name], atol=1e-6)
        assert changed == param.requires_grad, name


def test_multiple_adapters_add_set_delete():
    base = build("mlp")
    x = make_inputs("mlp")
    torch.manual_seed(0)
    model = fourierft.get_peft_model(base, FourierFTConfig(target_modules=["lin0"], n_frequency=10))
    out_default = model(**x)
    model.add_adapter("other", FourierFTConfig(target_modules=["lin0", "lin1"], n_frequency=8))
    assert model.active_adapters == ["default"]
    torch.testing.assert_close(model(**x), out_default)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".other"))
    model.set_adapter("other")
    out_other = model(**x)
    assert not torch.allclose(out_other, out_default)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.endswith(".other"))
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".default"))
    # two active adapters at the tuner level add their changes
    model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default", "other"]
    with model.disable_adapter():
        base_out = model(**x)
    both = model(**x)
    lin0 = model.base_model.model.lin0
    layer_in = x["X"]
    expected = lin0.base_layer(layer_in) + sum(
        layer_in @ lin0.get_delta_weight(name).T for name in ("default", "other"))
    torch.testing.assert_close(lin0(layer_in), expected, atol=1e-5, rtol=1e-4)
    # merging both equals running both
    model.merge_adapter(["default", "other"])
    torch.testing.assert_close(model(**x), both, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="merged"):
        model.delete_adapter("other")
    model.unmerge_adapter()
    model.delete_adapter("other")
    assert model.active_adapters == ["default"]
    assert "other" not in model.peft_config
    assert not any(".other" in n for n in model.state_dict())
    torch.testing.assert_close(model(**x), out_default)
    with pytest.raises(ValueError, match="does not exist"):
        model.delete_adapter("unknown-adapter")
    with pytest.raises(ValueError, match="not found"):
        model.set_adapter("unknown-adapter")
    model.delete_adapter("default")
    assert model.active_adapters == []
    torch.testing.assert_close(model(**x), base_out)


def test_add_adapter_failure_leaves_model_unchanged():
    model, _ = make_pair("mlp", dict(target_modules=["lin0"], n_frequency=10))
    model.add_adapter("biased", FourierFTConfig(target_modules=["lin1"], n_frequency=4, bias="fourier_only"))
    model.delete_adapter("biased")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    structure = [(n, type(m)) for n, m in model.named_modules()]
    bad = [
        FourierFTConfig(target_modules=["lin0", "lin1"], n_frequency=41),  # lin1 is 2x20=40 < 41
        FourierFTConfig(target_modules=["nope"]),
        FourierFTConfig(target_modules=["relu"]),
        FourierFTConfig(target_modules=["lin0"], bias="all"),
    ]
    for config in bad:
        snapshot = config.to_dict()
        with pytest.raises((ValueError, TypeError)):
            model.add_adapter("new", config)
        assert config.to_dict() == snapshot
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", FourierFTConfig(target_modules=["lin0"], n_frequency=4))
    with pytest.raises(ValueError, match="Invalid adapter name"):
        model.add_adapter("../evil", FourierFTConfig(target_modules=["lin0"], n_frequency=4))
    assert list(model.peft_config) == ["default"]
    assert [(n, type(m)) for n, m in model.named_modules()] == structure
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_second_bias_adapter_rejected():
    model, _ = make_pair("mlp", dict(target_modules=["lin0"], n_frequency=10, bias="fourier_only"))
    with pytest.raises(ValueError, match="only 1 adapter with bias"):
        model.add_adapter("b", FourierFTConfig(target_modules=["lin1"], n_frequency=4, bias="all"))
    assert list(model.peft_config) == ["default"]


def test_disable_adapter_restores_frozen_state():
    """PEFT bug 15: leaving disable_adapter() made a frozen adapter trainable; here it stays frozen."""
    model, _ = make_pair("mlp", dict(target_modules=["lin0"], n_frequency=10))
    model.base_model.set_adapter("default", inference_mode=True)
    with model.disable_adapter():
        assert not any(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())
    model.set_adapter("default")
    with model.disable_adapter():
        with model.disable_adapter():
            pass
        assert model._adapters_disabled
    assert model.base_model.model.lin0.fourierft_spectrum["default"].requires_grad


def test_unload_restores_base_and_inject_without_wrapper():
    base = build("llama")
    pristine = copy.deepcopy(base)
    model = fourierft.get_peft_model(base, FourierFTConfig(task_type="CAUSAL_LM", n_frequency=10))
    x = make_inputs("llama")
    restored = model.unload()
    assert set(restored.state_dict()) == set(pristine.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model_output(restored, "llama", x), model_output(pristine, "llama", x))
    raw = fourierft.inject_adapter_in_model(FourierFTConfig(target_modules=["q_proj"], n_frequency=5), build("llama"))
    sd = fourierft.get_peft_model_state_dict(raw)
    assert sd and all(k.endswith("q_proj.fourierft_spectrum") and not k.startswith("base_model") for k in sd)
    again = fourierft.inject_adapter_in_model(FourierFTConfig(n_frequency=5), build("llama"), state_dict=sd)
    assert set(fourierft.get_peft_model_state_dict(again)) == set(sd)


def test_generate_and_gradient_checkpointing():
    base = build("llama")
    model = fourierft.get_peft_model(base, FourierFTConfig(task_type="CAUSAL_LM", n_frequency=10))
    ids = make_inputs("llama")["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, ids.shape[1] + 3)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "fourierft_spectrum" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_attribute_delegation_and_summary(capsys):
    model, theirs = make_pair("bert", dict(task_type="SEQ_CLS", n_frequency=20))
    assert model.config.model_type == "bert"
    assert model.get_base_model() is model.base_model.model
    model.print_trainable_parameters()
    theirs.print_trainable_parameters()
    ours_line, theirs_line = capsys.readouterr().out.strip().splitlines()
    assert ours_line == theirs_line
    with pytest.raises(ValueError, match="mixed"):
        fourierft.get_peft_model(build("mlp"), FourierFTConfig(target_modules=["lin0"]), mixed=True)


def test_safe_merge_rejects_nan_and_keeps_weights():
    model, _ = make_pair("mlp", dict(target_modules=["lin0", "lin1"], n_frequency=5))
    with torch.no_grad():
        model.base_model.model.lin1.fourierft_spectrum["default"][0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        model.merge_adapter(safe_merge=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) or before[k].isnan().any() for k in before)
    assert not any(m.merged for m in model.modules() if isinstance(m, FourierFTLinear))


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any op allocates (views of existing storage, like ``W.t()``, are not new)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs \
                    and t.numel() > self.largest:
                self.largest, self.op = t.numel(), func
        return out


@pytest.mark.parametrize("conv1d", [False, True])
def test_spectral_training_step_never_builds_the_weight_change(conv1d):
    """The spectral (activation-side) route, which the rule picks for few tokens, holds no d_out x d_in tensor."""
    from transformers.pytorch_utils import Conv1D

    d_in, d_out, tokens = 96, 80, 4
    layer = Conv1D(d_out, d_in) if conv1d else torch.nn.Linear(d_in, d_out)
    model = fourierft.get_peft_model(torch.nn.Sequential(layer), FourierFTConfig(target_modules=["0"], n_frequency=500))
    model.train()
    x = torch.randn(2, tokens // 2, d_in, requires_grad=True)
    assert [r.route for r in fourierft.explain_routes(model, x)] == ["spectral"]
    with _LargestOutput() as mode:
        model(x).square().sum().backward()
    assert mode.largest < d_out * d_in, mode.op
    assert model.base_model.model[0].fourierft_spectrum["default"].grad is not None


@pytest.mark.parametrize("conv1d", [False, True])
def test_fused_training_path_equals_separate_base(conv1d, monkeypatch):
    """Training a frozen Linear/Conv1D runs base and adapter in one autograd node; with a hook on the base
    layer (which must then run as a module) the separate path runs: both give the same values and grads."""
    from transformers.pytorch_utils import Conv1D

    from fourierft.methods import fourierft as method

    torch.manual_seed(0)
    d_in, d_out = 24, 18
    layer = Conv1D(d_out, d_in) if conv1d else torch.nn.Linear(d_in, d_out)
    config = FourierFTConfig(target_modules=["0"], n_frequency=60, init_weights=False)
    model = fourierft.get_peft_model(torch.nn.Sequential(layer), config).train()
    wrapped, spectrum = model.base_model.model[0], model.base_model.model[0].fourierft_spectrum["default"]
    x = torch.randn(3, 5, d_in, requires_grad=True)
    calls = []
    real = method.fourierft_linear  # counts the calls that fuse the base product in
    monkeypatch.setattr(method, "fourierft_linear",
                        lambda *a, **k: (k.get("weight") is not None and calls.append(1)) or real(*a, **k))

    def run():
        y = model(x)
        return (y, *torch.autograd.grad(y.square().sum(), [x, spectrum]))

    fused = run()
    assert calls == [1]
    handle = wrapped.base_layer.register_forward_hook(lambda m, i, o: None)
    separate = run()
    handle.remove()
    assert calls == [1]
    seen = []  # a global module hook must see the base layer run as well
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m)))
    run()
    handle.remove()
    assert calls == [1] and type(wrapped.base_layer) in seen
    for a, b in zip(fused, separate):  # float32; the fused op may take the merged path (one GEMM on W + dW)
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)
    with torch.no_grad():  # inference fuses too (the merged route is then one GEMM on W + dW)
        torch.testing.assert_close(model(x), fused[0], atol=1e-5, rtol=1e-5)
    assert calls == [1, 1]
