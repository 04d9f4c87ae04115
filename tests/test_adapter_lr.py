"""FourierFT learning rates per layer width, and the warning when a spectrum's learning rate is far too small.

The reference is the dense definition ``dW = scaling * Re(ifft2(S))`` written here with ``torch.fft``, not the
library's own operators.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import VOCAB, build
from torch import nn
from transformers import Trainer, TrainingArguments

import fourierft
from fourierft import AdapterTrainer, BOFTConfig, FourierFTConfig, adapter_param_groups, get_peft_model
from fourierft.integrations.spectrum_lr import SPECTRUM_STEP, spectrum_lr


class Widths(nn.Module):
    """An attention-like square layer and a feed-forward pair four times wider, as in a transformer block."""

    def __init__(self, d: int = 48) -> None:
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.down(self.up(self.attn(x)))


def widths_model(n: int = 200, scaling: float = 150.0):
    torch.manual_seed(0)
    return fourierft.inject_adapter_in_model(
        FourierFTConfig(target_modules=["attn", "up", "down"], n_frequency=n, scaling=scaling), Widths())


def dense_delta(d_out: int, d_in: int, n: int, seed: int, coefficients: torch.Tensor, scaling: float):
    """PEFT's definition: positions from ``randperm(d_out * d_in)[:n]``, ``dW = a * Re(ifft2(S))``."""
    perm = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[:n]
    spectrum = torch.zeros(d_out, d_in, dtype=torch.float64)
    spectrum[perm // d_in, perm % d_in] = coefficients.double()
    return scaling * torch.fft.ifft2(spectrum).real


@pytest.mark.parametrize("d_out,d_in,n,scaling", [(64, 64, 300, 150.0), (256, 64, 300, 150.0),
                                                  (64, 256, 1000, 300.0), (512, 384, 2000, 40.0)])
def test_one_adam_step_changes_every_layer_by_the_same_relative_amount(d_out, d_in, n, scaling):
    # Adam's first step moves each coefficient by exactly lr (times the sign of its gradient).
    layer = fourierft.inject_adapter_in_model(FourierFTConfig(target_modules=["lin"], n_frequency=n, scaling=scaling),
                                              nn.ModuleDict({"lin": nn.Linear(d_in, d_out)}))["lin"]
    lr = spectrum_lr(layer, "default")
    assert lr == pytest.approx(SPECTRUM_STEP * math.sqrt(2) * d_out * math.sqrt(d_in) / (scaling * math.sqrt(n)))
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(1)) * 2.0 - 1.0
    delta = dense_delta(d_out, d_in, n, 777, lr * signs, scaling)
    typical_weight_norm = math.sqrt(d_out)  # entries of size 1/sqrt(d_in)
    assert delta.norm().item() / typical_weight_norm == pytest.approx(SPECTRUM_STEP, rel=0.15)


def test_default_groups_give_each_layer_width_its_own_rate():
    model = widths_model()
    groups = adapter_param_groups(model)
    by_layer = {id(m.fourierft_spectrum["default"]): m for m in (model.attn, model.up, model.down)}
    assert sorted(g["name"] for g in groups) == sorted(
        ["fourierft_spectrum 48x48 n=200 scaling=150", "fourierft_spectrum 192x48 n=200 scaling=150",
         "fourierft_spectrum 48x192 n=200 scaling=150"])
    lrs = {}
    for group in groups:
        (param,) = group["params"]
        assert group["lr"] == spectrum_lr(by_layer[id(param)], "default") and group["weight_decay"] == 0.0
        lrs[by_layer[id(param)]] = group["lr"]
    # d_out * sqrt(d_in): the feed-forward layers need 4x and 2x the attention layer's rate
    assert lrs[model.up] / lrs[model.attn] == pytest.approx(4.0)
    assert lrs[model.down] / lrs[model.attn] == pytest.approx(2.0)
    # n and scaling enter as 1 / (scaling * sqrt(n))
    other = adapter_param_groups(widths_model(n=800, scaling=300.0))
    assert min(g["lr"] for g in other) == pytest.approx(lrs[model.attn] / 4)
    torch.optim.AdamW(groups).step()


def test_explicit_adapter_lr_is_one_group_and_head_lr_is_required_for_a_head():
    model = get_peft_model(build("bert"), FourierFTConfig(task_type="SEQ_CLS", n_frequency=20))
    groups = adapter_param_groups(model, adapter_lr=0.07, head_lr=1e-3)
    assert [(g["name"], g["lr"]) for g in groups][0] == ("adapter", 0.07)
    with pytest.raises(ValueError, match="head_lr is required"):
        adapter_param_groups(model)
    default = adapter_param_groups(model, head_lr=1e-3)
    names = [g["name"] for g in default]
    assert names[-2:] == ["head", "head_no_decay"] and all(n.startswith("fourierft_spectrum 32x32") for n in names[:-2])


def test_boft_without_adapter_lr_uses_head_lr():
    model = fourierft.inject_adapter_in_model(BOFTConfig(target_modules=["lin0"], boft_block_size=2), build("mlp"))
    ((name, lr),) = [(g["name"], g["lr"]) for g in adapter_param_groups(model, head_lr=3e-3)]
    assert (name, lr) == ("adapter", 3e-3)
    with pytest.raises(ValueError, match="adapter_lr is required"):
        adapter_param_groups(model)


def test_too_small_adapter_lr_warns_once_naming_layer_and_rates():
    model = widths_model()
    needed = spectrum_lr(model.up, "default")
    with pytest.warns(UserWarning) as record:
        adapter_param_groups(model, adapter_lr=1e-4)
    (warning,) = [w for w in record if "FourierFT spectrum learning rate" in str(w.message)]
    message = str(warning.message)
    assert "1e-04" in message or "0.0001" in message
    assert "up" in message and "192x48" in message and f"{needed:.3g}" in message and "2 more" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter_param_groups(model)  # the width rule's own rates
        adapter_param_groups(model, adapter_lr=spectrum_lr(model.up, "default") / 5)  # slower, not far too slow
        adapter_param_groups(model, adapter_lr=1e-4, check_lr=False)


def lm_model():
    from conftest import make_llama

    torch.manual_seed(0)
    return get_peft_model(make_llama(), FourierFTConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"],
                                                        n_frequency=64))


def lm_rows(n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.randint(1, VOCAB, (8,), generator=g)), "labels": ids} for _ in range(n)]


def lr_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "FourierFT spectrum learning rate" in str(w.message)]


def args_for(tmp_path, lr: float) -> TrainingArguments:
    return TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=lr,
                             warmup_steps=1, report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
                             logging_strategy="no")


def test_stock_trainer_with_the_callback_warns_once(tmp_path):
    model = lm_model()
    trainer = Trainer(model=model, args=args_for(tmp_path, 1e-4), train_dataset=lm_rows(),
                      callbacks=[fourierft.SpectrumLRCallback()])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.train()
        trainer.train()
    (message,) = lr_warnings(record)
    assert "q_proj" in message or "v_proj" in message
    assert "0.0001" in message  # the peak rate, not warm-up's 0


def test_adapter_trainer_installs_the_check_and_warns_once(tmp_path):
    model = lm_model()
    trainer = AdapterTrainer(model=model, args=args_for(tmp_path, 1e-3), train_dataset=lm_rows(), adapter_lr=1e-6)
    assert sum(isinstance(c, fourierft.SpectrumLRCallback) for c in trainer.callback_handler.callbacks) == 1
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.train()
    assert len(lr_warnings(record)) == 1

    quiet = AdapterTrainer(model=lm_model(), args=args_for(tmp_path, 1e-3), train_dataset=lm_rows())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        quiet.train()
    assert lr_warnings(record) == []
    spectra = [g for g in quiet.optimizer.param_groups if g["name"].startswith("fourierft_spectrum")]
    assert spectra and all(g["initial_lr"] > 1e-3 for g in spectra)
