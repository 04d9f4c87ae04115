"""The ``fourierft`` command line on tiny models saved to temporary folders.

Two tests run the real console entry in a subprocess (``python -m fourierft.cli``); the others call
``fourierft.cli.main`` with an argument list, the function the console script runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import peft
import pytest
import safetensors.torch
import torch
import transformers

import fourierft
from fourierft.cli import main

from conftest import VOCAB, assert_visible, make_bert_cls, make_gpt2

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def _save(tmp_path, make, config, name="adapter"):
    """Save a base model and an adapter on it; returns (base dir, adapter dir, the PeftModel)."""
    torch.manual_seed(0)
    base = make().eval()
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    model = fourierft.get_peft_model(base, config).eval()
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(tmp_path / name)
    return str(base_dir), str(tmp_path / name), model


def _run(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fourierft.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_console_script_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fourierft"] == "fourierft.cli:main"


def test_inspect_reports_the_folder(tmp_path):
    _, folder, model = _save(tmp_path, make_gpt2, fourierft.FourierFTConfig(target_modules=["c_attn"], n_frequency=40))
    done = _run("inspect", folder, "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    tensors = safetensors.torch.load_file(os.path.join(folder, "adapter_model.safetensors"))
    assert info["method"] == "FOURIERFT" and info["target_modules"] == ["c_attn"]
    assert info["tensors"] == len(tensors) and info["adapted_layers"] == 2
    assert info["adapter_parameters"] == 2 * 40 == sum(p.numel() for n, p in model.named_parameters()
                                                       if "fourierft_spectrum" in n)
    assert info["settings"]["n_frequency"] == 40
    assert model.peft_config["default"].peft_version in info["written_by"]


def test_inspect_prints_boft_settings_and_lora_folders(tmp_path, capsys):
    config = fourierft.BOFTConfig(target_modules=["query", "value"], boft_block_size=4, init_weights=False,
                                  task_type="SEQ_CLS")
    base_dir, folder, _ = _save(tmp_path, make_bert_cls, config)
    assert main(["inspect", folder]) == 0
    text = capsys.readouterr().out
    assert "BOFT adapter" in text and "boft_block_size     4" in text and "4 x boft_R (1, 8, 4, 4)" in text
    assert main(["to-lora", folder, str(tmp_path / "lora"), "--rank", "4", "--base", base_dir, "-q"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "lora")]) == 0
    assert "LORA adapter" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["gpt2_fourierft", "bert_boft"])
def test_merge_saves_a_plain_transformers_model(tmp_path, kind):
    if kind == "gpt2_fourierft":
        make, auto, config = make_gpt2, transformers.AutoModelForCausalLM, fourierft.FourierFTConfig(
            target_modules=["c_attn", "mlp.c_proj"], n_frequency=60, scaling=300.0, task_type="CAUSAL_LM")
    else:
        make, auto, config = make_bert_cls, transformers.AutoModelForSequenceClassification, fourierft.BOFTConfig(
            target_modules=["query", "value"], boft_block_size=4, init_weights=False, task_type="SEQ_CLS")
    base_dir, folder, model = _save(tmp_path, make, config)
    assert main(["merge", folder, str(tmp_path / "merged"), "-q"]) == 0  # base from the adapter's config
    merged = auto.from_pretrained(tmp_path / "merged").eval()
    assert not any("fourierft" in n or "boft" in n for n, _ in merged.named_parameters())
    plain = auto.from_pretrained(base_dir).eval()
    with torch.no_grad():  # the last hidden states: the untrained head's logits are too small to show much
        expected, got, before = (m(input_ids=IDS, output_hidden_states=True).hidden_states[-1]
                                 for m in (model, merged, plain))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert_visible(expected, before, atol=1e-5, rtol=1e-4)


def test_to_lora_writes_an_adapter_peft_loads(tmp_path):
    config = fourierft.BOFTConfig(target_modules=["query", "value"], boft_block_size=4, init_weights=False,
                                  task_type="SEQ_CLS")
    base_dir, folder, model = _save(tmp_path, make_bert_cls, config)
    assert main(["to-lora", folder, str(tmp_path / "lora"), "--rank", "32", "--base", base_dir]) == 0
    base = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir)
    lora = peft.PeftModel.from_pretrained(base, str(tmp_path / "lora")).eval()
    assert isinstance(lora.base_model, peft.LoraModel)
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-4, rtol=1e-4)


def test_bad_folder_from_the_console_entry(tmp_path):
    done = _run("merge", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert done.returncode == 2 and "is not a folder" in done.stderr and not (tmp_path / "out").exists()


def _broken(tmp_path, what: str) -> tuple[str, list[str]]:
    base_dir, folder, _ = _save(tmp_path, make_gpt2, fourierft.FourierFTConfig(target_modules=["c_attn"], n_frequency=8))
    cfg = os.path.join(folder, "adapter_config.json")
    extra: list[str] = []
    if what == "config":
        os.remove(cfg)
    elif what == "json":
        Path(cfg).write_text("{not json")
    elif what == "weights":
        os.remove(os.path.join(folder, "adapter_model.safetensors"))
    elif what == "method":
        data = json.loads(Path(cfg).read_text())
        Path(cfg).write_text(json.dumps({**data, "peft_type": "LORA"}))
    elif what == "base":
        data = json.loads(Path(cfg).read_text())
        Path(cfg).write_text(json.dumps({**data, "base_model_name_or_path": "org/not-downloaded"}))
    elif what == "base_mismatch":
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2)
                                     ).save_pretrained(tmp_path / "other")
        extra = ["--base", str(tmp_path / "other")]
    return folder, extra


@pytest.mark.parametrize("what,message", [
    ("config", "no adapter_config.json"), ("json", "is not valid JSON"), ("weights", "weights are missing"),
    ("method", "holds a LORA adapter"), ("base", "base model 'org/not-downloaded' not found"),
    ("base_mismatch", "does not fit the base model"),
])
@pytest.mark.parametrize("command", ["merge", "to-lora"])
def test_bad_folders_are_named_and_nothing_is_written(tmp_path, capsys, what, message, command):
    folder, extra = _broken(tmp_path, what)
    out = tmp_path / "out"
    args = [command, folder, str(out), *extra] + (["--rank", "4"] if command == "to-lora" else [])
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_inspect_refuses_a_folder_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    assert "not an adapter folder" in capsys.readouterr().err
