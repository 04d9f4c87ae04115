"""BOFT layers and models: parity with the real peft for one factor, the dense definition for several."""

from __future__ import annotations

import copy
import json
import os
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fourierft
from fourierft import BOFTConfig, BOFTConv2d, PeftModel
from conftest import build, make_inputs, model_output

warnings.filterwarnings("ignore", message=".*CUDA extension.*")
warnings.filterwarnings("ignore", message=".*boft_n_butterfly_factor.*")


class ConvNet(nn.Module):
    """PEFT's test Conv2d model: Conv2d(5, 10, 3) on inputs reshaped to (-1, 5, 3, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(5, 10, 3)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, X):
        return self.lin0(self.conv2d(X.float().reshape(-1, 5, 3, 3)).flatten(1))


PARITY = [
    ("mlp-lin0", "mlp", dict(target_modules=["lin0"], boft_block_size=2)),
    ("mlp-save", "mlp", dict(target_modules=["lin0"], boft_block_size=5, modules_to_save=["lin1"])),
    ("mlp-num", "mlp", dict(target_modules=["lin0", "lin1"], boft_block_size=0, boft_block_num=2)),
    ("conv", "conv", dict(target_modules=["conv2d"], boft_block_size=45)),
    ("conv-num", "conv", dict(target_modules=["conv2d"], boft_block_size=0, boft_block_num=1)),
    ("llama", "llama", dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"])),
    ("bert-bias", "bert", dict(task_type="SEQ_CLS", boft_block_size=0, boft_block_num=8, bias="boft_only")),
]


def _build(kind, seed=0):
    if kind == "conv":
        torch.manual_seed(seed)
        return ConvNet().eval()
    return build(kind, seed)


def _inputs(kind):
    return {"X": torch.randn(4, 45, generator=torch.Generator().manual_seed(1))} if kind == "conv" else \
        make_inputs(kind)


def _out(model, kind):
    with torch.no_grad():
        return model_output(model, "mlp" if kind == "conv" else kind, _inputs(kind))


def _pair(kind, kwargs, seed=3):
    base = _build(kind)
    other = copy.deepcopy(base)
    torch.manual_seed(seed)
    ours = fourierft.get_peft_model(base, BOFTConfig(init_weights=False, **copy.deepcopy(kwargs))).eval()
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(other, peft.BOFTConfig(init_weights=False, **copy.deepcopy(kwargs))).eval()
    return ours, theirs


@pytest.mark.parametrize("case", PARITY, ids=[c[0] for c in PARITY])
def test_matches_peft_one_factor(case, tmp_path):
    _, kind, kwargs = case
    ours, theirs = _pair(kind, kwargs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert set(ours.state_dict()) == set(theirs.state_dict())
    expected = _out(theirs, kind)
    torch.testing.assert_close(_out(ours, kind), expected, atol=1e-5, rtol=1e-5)
    # checkpoints both ways
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == \
        set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    loaded_by_peft = peft.PeftModel.from_pretrained(_build(kind), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(_out(loaded_by_peft, kind), expected, atol=1e-5, rtol=1e-5)
    loaded_by_us = PeftModel.from_pretrained(_build(kind), str(tmp_path / "theirs"))
    torch.testing.assert_close(_out(loaded_by_us, kind), expected, atol=1e-5, rtol=1e-5)
    # merges
    merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    torch.testing.assert_close(_out(merged_ours, kind), _out(merged_theirs, kind), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_out(merged_ours, kind), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ independent dense reference (m > 1)
def ref_perm(n: int, b: int, r: int) -> list[int]:
    """Block-butterfly permutation from its definition: in each of ``b`` chunks, the sub-blocks of
    length ``r`` are reordered even-indexed first, then odd-indexed."""
    chunk = n // b
    order = list(range(0, chunk // r, 2)) + list(range(1, chunk // r, 2))
    return [c * chunk + order[t] * r + j for c in range(b) for t in range(chunk // r) for j in range(r)]


def ref_rotation(R: torch.Tensor) -> torch.Tensor:
    """``M = B_{m-1} ... B_0`` built densely: Cayley by matrix inverse, permutation matrices, block_diag."""
    m, num, size, _ = R.shape
    n = num * size
    S = 0.5 * (R - R.transpose(-1, -2))
    eye = torch.eye(size, dtype=R.dtype)
    Q = (eye - S) @ torch.linalg.inv(eye + S)
    M = torch.eye(n, dtype=R.dtype)
    for i in range(m):
        perm = list(range(n)) if i == 0 else ref_perm(n, num // 2 ** i, size // 2)
        P = torch.zeros(n, n, dtype=R.dtype)
        P[torch.arange(n), torch.tensor(perm)] = 1
        B = P @ torch.block_diag(*Q[i]) @ P.T
        M = B @ M
    return M


GEOMETRIES = [(16, 2, 2), (16, 4, 2), (32, 4, 3), (64, 4, 4), (48, 2, 3), (24, 6, 2)]


@pytest.mark.parametrize("n,size,m", GEOMETRIES)
def test_linear_equals_dense_definition(n, size, m):
    torch.manual_seed(n + size + m)
    base = nn.Linear(n, 7).double()
    layer = fourierft.get_peft_model(nn.Sequential(base), BOFTConfig(
        target_modules=["0"], boft_block_size=size, boft_n_butterfly_factor=m, init_weights=False)).double()
    bl = layer.base_model.model[0]
    R, s = bl.boft_R["default"].detach(), bl.boft_s["default"].detach()
    M = ref_rotation(R)
    torch.testing.assert_close(M @ M.T, torch.eye(n, dtype=M.dtype), atol=1e-10, rtol=0)
    x = torch.randn(3, 5, n, dtype=torch.float64)
    expected = ((x @ M) @ base.weight.T) * s.reshape(-1) + base.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=1e-10)
    merged_weight = s * (base.weight @ M.T)
    layer.merge_adapter()
    torch.testing.assert_close(base.weight, merged_weight, atol=1e-10, rtol=1e-10)
    layer.unmerge_adapter()
    torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=1e-10)


CONVS = [
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
    dict(in_channels=4, out_channels=5, kernel_size=(3, 2), dilation=2, padding=(2, 0)),
    dict(in_channels=2, out_channels=3, kernel_size=(1, 4), padding="same", padding_mode="reflect"),
    dict(in_channels=8, out_channels=4, kernel_size=2, stride=(1, 2), padding=(1, 0), padding_mode="circular"),
]


@pytest.mark.parametrize("conv_kwargs", CONVS, ids=range(len(CONVS)))
@pytest.mark.parametrize("m", [1, 2])
def test_conv2d_any_geometry_merged_equals_unmerged(conv_kwargs, m):
    torch.manual_seed(0)
    conv = nn.Conv2d(**conv_kwargs).double()
    pristine = copy.deepcopy(conv)
    model = fourierft.get_peft_model(nn.Sequential(conv), BOFTConfig(
        target_modules=["0"], boft_block_size=2, boft_n_butterfly_factor=m, init_weights=False)).double()
    layer = model.base_model.model[0]
    assert isinstance(layer, BOFTConv2d)
    x = torch.randn(2, conv.in_channels, 9, 8, dtype=torch.float64)
    unmerged = model(x)
    assert unmerged.shape == pristine(x).shape
    M = ref_rotation(layer.boft_R["default"].detach())
    s = layer.boft_s["default"].detach().reshape(-1, 1)
    weight = (s * (pristine.weight.reshape(conv.out_channels, -1) @ M.T)).reshape(pristine.weight.shape)
    torch.testing.assert_close(unmerged, pristine._conv_forward(x, weight, pristine.bias), atol=1e-10, rtol=1e-10)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(x), unmerged, atol=1e-10, rtol=1e-10)


def test_grouped_conv_rejected_and_model_unchanged():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(NotImplementedError, match="groups=2"):
        fourierft.get_peft_model(model, BOFTConfig(target_modules=["0"], boft_block_size=2))
    assert type(model[0]) is nn.Conv2d and not hasattr(model, "peft_config")


def test_conv1d_rejected():
    with pytest.raises(TypeError, match="Conv1D"):
        fourierft.get_peft_model(build("gpt2"), BOFTConfig(task_type="CAUSAL_LM"))


def test_geometry_errors_say_what_works():
    with pytest.raises(ValueError, match="lin0") as info:
        fourierft.get_peft_model(build("mlp"), BOFTConfig(target_modules=["lin0"], boft_block_size=3))
    assert "10" in str(info.value)
    with pytest.raises(ValueError):
        fourierft.get_peft_model(build("mlp"), BOFTConfig(target_modules=["lin0"], boft_block_size=2,
                                                          boft_n_butterfly_factor=4))
    for kwargs in (dict(boft_block_size=-1), dict(boft_block_size=0, boft_block_num=0),
                   dict(boft_block_size=8, boft_block_num=2), dict(boft_n_butterfly_factor=0),
                   dict(boft_dropout=1.0), dict(boft_dropout=-0.1), dict(bias="weird")):
        with pytest.raises(ValueError):
            BOFTConfig(**kwargs)


def test_block_num_alone_is_accepted():
    config = BOFTConfig(boft_block_num=8)
    assert (config.boft_block_size, config.boft_block_num) == (0, 8)
    with pytest.raises(ValueError):
        peft.BOFTConfig(boft_block_num=8)  # PEFT's bug, fixed here


def test_identity_init_and_only_adapter_trains():
    base = build("llama")
    pristine = copy.deepcopy(base)
    model = fourierft.get_peft_model(base, BOFTConfig(task_type="CAUSAL_LM", boft_n_butterfly_factor=2))
    torch.testing.assert_close(_out(model, "llama"), _out(pristine, "llama"))
    model.train()
    ids = make_inputs("llama")["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".boft_R." in n or ".boft_s." in n for n in grads)


def test_multiplicative_dropout_matches_peft_in_training():
    # 0.4 x 5 blocks is a whole number of blocks: there PEFT's count is right and the draws are the same
    ours, theirs = _pair("mlp", dict(target_modules=["lin0"], boft_block_size=2, boft_dropout=0.4))
    ours.train(), theirs.train()
    x = _inputs("mlp")
    torch.manual_seed(7)
    a = ours(**x)
    torch.manual_seed(7)
    b = theirs(**x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ours.eval()
    torch.testing.assert_close(ours(**x), theirs.eval()(**x), atol=1e-5, rtol=1e-5)


def test_several_adapters_equal_sequential_merge():
    model = fourierft.get_peft_model(build("mlp"), BOFTConfig(target_modules=["lin0"], boft_block_size=2,
                                                              init_weights=False))
    model.add_adapter("b", BOFTConfig(target_modules=["lin0"], boft_block_size=5, boft_n_butterfly_factor=1,
                                      init_weights=False))
    model.base_model.set_adapter(["default", "b"])
    x = _inputs("mlp")
    with torch.no_grad():
        both = model(**x)
        model.merge_adapter(["default", "b"])
        torch.testing.assert_close(model(**x), both, atol=1e-5, rtol=1e-5)


class _LargestOutput(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("m", [1, 3])
def test_no_n_by_n_tensor_in_training_step(m):
    n, tokens = 128, 4
    model = fourierft.get_peft_model(nn.Sequential(nn.Linear(n, 8)), BOFTConfig(
        target_modules=["0"], boft_block_size=4, boft_n_butterfly_factor=m, init_weights=False))
    model.train()
    x = torch.randn(tokens, n, requires_grad=True)
    with _LargestOutput() as mode:
        model(x).square().sum().backward()
    assert mode.largest < n * n


def test_checkpoint_factor_count_comes_from_weights(tmp_path, caplog):
    """PEFT on CPU saves one factor whatever the config says; loading follows the weights."""
    torch.manual_seed(0)
    theirs = peft.get_peft_model(build("mlp"), peft.BOFTConfig(target_modules=["lin0"], boft_block_size=2,
                                                                boft_n_butterfly_factor=2, init_weights=False))
    theirs.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "adapter_config.json"))["boft_n_butterfly_factor"] == 2
    loaded = PeftModel.from_pretrained(build("mlp"), str(tmp_path))
    assert loaded.base_model.model.lin0.boft_R["default"].shape[0] == 1
    torch.testing.assert_close(_out(loaded, "mlp"), _out(theirs.eval(), "mlp"), atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(16, 4))
    pristine = copy.deepcopy(wide)
    ours = fourierft.get_peft_model(wide, BOFTConfig(target_modules=["0"], boft_block_size=2,
                                                     boft_n_butterfly_factor=3, init_weights=False)).eval()
    ours.save_pretrained(tmp_path / "three")
    again = PeftModel.from_pretrained(pristine, str(tmp_path / "three"))
    assert again.base_model.model[0].boft_R["default"].shape[0] == 3
    x = torch.randn(5, 16)
    torch.testing.assert_close(again(x), ours(x))


def test_old_peft_file_with_boft_P_loads(tmp_path):
    ours, theirs = _pair("mlp", dict(target_modules=["lin0"], boft_block_size=2))
    theirs.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.lin0.boft_P"] = torch.eye(10).unsqueeze(0)
    save_file(tensors, path, metadata={"format": "pt"})
    result = PeftModel.from_pretrained(_build("mlp"), str(tmp_path))
    torch.testing.assert_close(_out(result, "mlp"), _out(theirs, "mlp"), atol=1e-5, rtol=1e-5)


def test_dinov2_documented_example_runs(tmp_path):
    """PEFT's BOFT guide example, with only the import changed."""
    from transformers import Dinov2Config, Dinov2ForImageClassification

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=28, patch_size=14, num_labels=3)
    model = Dinov2ForImageClassification(cfg)
    config = BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2,
                        target_modules=["query", "value", "key", "output.dense", "mlp.fc1", "mlp.fc2"],
                        boft_dropout=0.1, bias="boft_only", modules_to_save=["classifier"])
    model = fourierft.get_peft_model(model, config)
    model.print_trainable_parameters()
    pixels = torch.randn(4, 3, 28, 28)
    labels = torch.tensor([0, 1, 2, 0])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(pixel_values=pixels, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    fresh = Dinov2ForImageClassification(cfg)
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, expected, atol=1e-5, rtol=1e-5)
    assert os.path.exists(tmp_path / "adapter_model.safetensors")
