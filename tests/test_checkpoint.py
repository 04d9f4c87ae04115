"""Adapter files: interop with the real peft both ways, Hub cache loading, and files that must not load."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fourierft
from fourierft import CheckpointError, FourierFTConfig, PeftModel
from conftest import build, make_inputs, model_output

INTEROP = [
    ("bert-cls", "bert", dict(task_type="SEQ_CLS", n_frequency=40, modules_to_save=["classifier"]), "default"),
    ("gpt2-conv1d", "gpt2", dict(task_type="CAUSAL_LM", n_frequency=30), "default"),
    ("llama", "llama", dict(task_type="CAUSAL_LM", n_frequency=30, target_modules=["q_proj", "v_proj", "down_proj"]),
     "default"),
    ("llama-named", "llama", dict(task_type="CAUSAL_LM", n_frequency=20), "my-adapter"),
    ("bert-bias", "bert", dict(task_type="SEQ_CLS", n_frequency=30, bias="fourier_only"), "default"),
    ("mlp-bias-all", "mlp", dict(target_modules=["lin0"], n_frequency=12, bias="all", modules_to_save=["lin1"]),
     "default"),
]
IDS = [c[0] for c in INTEROP]


def _trained(model):
    """Give every trainable tensor distinctive values, as training would."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _make(lib, kind, kwargs, adapter_name, seed=3):
    base = build(kind, seed=seed)
    config = (FourierFTConfig if lib is fourierft else peft.FourierFTConfig)(**copy.deepcopy(kwargs))
    return _trained(lib.get_peft_model(base, config, adapter_name=adapter_name)).eval()


def _out(model, kind):
    with torch.no_grad():
        return model_output(model, kind, make_inputs(kind))


def _folder(root, name):
    return root if name == "default" else os.path.join(root, name)


@pytest.mark.parametrize("case", INTEROP, ids=IDS)
@pytest.mark.parametrize("direction", ["ours->peft", "peft->ours", "ours->ours"])
def test_interop(case, direction, tmp_dir):
    _, kind, kwargs, name = case
    writer, reader = {"ours->peft": (fourierft, peft), "peft->ours": (peft, fourierft),
                      "ours->ours": (fourierft, fourierft)}[direction]
    source = _make(writer, kind, kwargs, name)
    expected = _out(source, kind)
    source.save_pretrained(tmp_dir)
    folder = _folder(tmp_dir, name)
    assert sorted(os.listdir(tmp_dir))[:3] == sorted(["README.md", "adapter_config.json",
                                                      "adapter_model.safetensors"]) or name != "default"
    assert not os.path.exists(os.path.join(tmp_dir, "config.json"))
    torch.manual_seed(99)  # a different seed: frequencies must be rebuilt from the config, not the RNG
    loaded = reader.PeftModel.from_pretrained(build(kind, seed=3), tmp_dir, adapter_name=name,
                                              subfolder=None if name == "default" else name)
    torch.testing.assert_close(_out(loaded, kind), expected, atol=1e-5, rtol=1e-5)
    saved_keys = set(load_file(os.path.join(folder, "adapter_model.safetensors")))
    peft_keys = set(peft.get_peft_model_state_dict(_make(peft, kind, kwargs, name), adapter_name=name))
    assert saved_keys == peft_keys


def test_two_adapters_in_one_folder_both_ways(tmp_dir):
    ours = _make(fourierft, "llama", dict(task_type="CAUSAL_LM", n_frequency=20), "default")
    ours.add_adapter("other", FourierFTConfig(task_type="CAUSAL_LM", n_frequency=15, target_modules=["k_proj"]))
    _trained(ours.base_model).eval()
    ours.set_adapter("other")
    _trained(ours).eval()
    out_other = _out(ours, "llama")
    ours.set_adapter("default")
    out_default = _out(ours, "llama")
    ours.save_pretrained(tmp_dir)
    assert sorted(os.listdir(tmp_dir)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "other"]
    for lib in (peft, fourierft):
        model = lib.PeftModel.from_pretrained(build("llama", seed=3), tmp_dir)
        model.load_adapter(os.path.join(tmp_dir, "other"), adapter_name="other")
        torch.testing.assert_close(_out(model, "llama"), out_default, atol=1e-5, rtol=1e-5)
        model.set_adapter("other")
        torch.testing.assert_close(_out(model, "llama"), out_other, atol=1e-5, rtol=1e-5)
    ours.save_pretrained(tmp_dir + "/sel", selected_adapters=["other"])
    assert sorted(os.listdir(tmp_dir + "/sel")) == ["README.md", "other"]
    with pytest.raises(ValueError, match="selected_adapters"):
        ours.save_pretrained(tmp_dir + "/bad", selected_adapters=["nope"])


def test_files_and_metadata(tmp_dir):
    model = _make(fourierft, "bert", dict(task_type="SEQ_CLS", n_frequency=10), "default")
    model.save_pretrained(tmp_dir)
    with safe_open(os.path.join(tmp_dir, "adapter_model.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "pt" and len(meta["fourierft_derived_sha256"]) == 64
    config = json.load(open(os.path.join(tmp_dir, "adapter_config.json")))
    assert config["inference_mode"] is True and config["peft_type"] == "FOURIERFT"
    card = open(os.path.join(tmp_dir, "README.md")).read()
    assert card.startswith("---\n") and "library_name: peft" in card
    assert model.peft_config["default"].inference_mode is False
    model.save_pretrained(tmp_dir + "/bin", safe_serialization=False)
    assert os.path.exists(tmp_dir + "/bin/adapter_model.bin")
    loaded = PeftModel.from_pretrained(build("bert", seed=3), tmp_dir + "/bin")
    torch.testing.assert_close(_out(loaded, "bert"), _out(model, "bert"))
    model.save_pretrained(tmp_dir + "/none", is_main_process=False)
    assert os.listdir(tmp_dir + "/none") == []


def test_trainable_flags_after_load(tmp_dir):
    _make(fourierft, "llama", dict(task_type="CAUSAL_LM", n_frequency=10), "default").save_pretrained(tmp_dir)
    frozen = PeftModel.from_pretrained(build("llama", seed=3), tmp_dir)
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    trainable = PeftModel.from_pretrained(build("llama", seed=3), tmp_dir, is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names and all(n.endswith("fourierft_spectrum.default") for n in names)
    trainable.load_adapter(tmp_dir, adapter_name="other")
    assert not any(p.requires_grad for n, p in trainable.named_parameters() if n.endswith(".other"))
    assert type(trainable).__name__ == "PeftModelForCausalLM"


def test_low_cpu_mem_usage(tmp_dir):
    model = _make(fourierft, "llama", dict(task_type="CAUSAL_LM", n_frequency=10), "default")
    model.save_pretrained(tmp_dir)
    loaded = PeftModel.from_pretrained(build("llama", seed=3), tmp_dir, low_cpu_mem_usage=True)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    torch.testing.assert_close(_out(loaded, "llama"), _out(model, "llama"))
    raw = fourierft.inject_adapter_in_model(FourierFTConfig(target_modules=["q_proj"], n_frequency=5), build("llama", seed=3),
                                            low_cpu_mem_usage=True)
    assert any(p.device.type == "meta" for n, p in raw.named_parameters() if "fourierft" in n)


def test_load_by_repo_id_from_hub_cache_offline(tmp_dir):
    """An adapter in huggingface_hub's cache layout loads by repo id with no network (HF_HUB_OFFLINE=1)."""
    model = _make(fourierft, "bert", dict(task_type="SEQ_CLS", n_frequency=10), "default")
    model.save_pretrained(tmp_dir + "/src")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = os.path.join(tmp_dir, "cache", "models--someone--tiny-adapter")
    os.makedirs(os.path.join(repo, "refs"))
    shutil.copytree(tmp_dir + "/src", os.path.join(repo, "snapshots", commit))
    with open(os.path.join(repo, "refs", "main"), "w") as fh:
        fh.write(commit)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    loaded = PeftModel.from_pretrained(build("bert", seed=3), "someone/tiny-adapter", cache_dir=tmp_dir + "/cache")
    torch.testing.assert_close(_out(loaded, "bert"), _out(model, "bert"))
    with pytest.raises(FileNotFoundError):
        PeftModel.from_pretrained(build("bert", seed=3), "someone/not-cached", cache_dir=tmp_dir + "/cache")


def test_auto_peft_model(tmp_dir):
    torch.manual_seed(0)
    base = build("llama", seed=3)
    base.save_pretrained(tmp_dir + "/base")
    base = type(base).from_pretrained(tmp_dir + "/base")
    model = _trained(fourierft.get_peft_model(base, FourierFTConfig(task_type="CAUSAL_LM", n_frequency=10))).eval()
    model.save_pretrained(tmp_dir + "/adapter")
    assert json.load(open(tmp_dir + "/adapter/adapter_config.json"))["base_model_name_or_path"] == tmp_dir + "/base"
    loaded = fourierft.AutoPeftModelForCausalLM.from_pretrained(tmp_dir + "/adapter")
    torch.testing.assert_close(_out(loaded, "llama"), _out(model, "llama"))
    with pytest.raises(ValueError, match="task type"):
        fourierft.AutoPeftModelForSequenceClassification.from_pretrained(tmp_dir + "/adapter")


# ------------------------------------------------------------------------------------------ bad files
def _saved(tmp_dir):
    model = _make(fourierft, "llama", dict(task_type="CAUSAL_LM", n_frequency=10), "default")
    model.save_pretrained(tmp_dir)
    return model


def _assert_load_fails_cleanly(tmp_dir, error, match):
    base = build("llama", seed=3)
    pristine = copy.deepcopy(base.state_dict())
    structure = [(n, type(m)) for n, m in base.named_modules()]
    with pytest.raises(error, match=match):
        PeftModel.from_pretrained(base, tmp_dir)
    assert [(n, type(m)) for n, m in base.named_modules()] == structure
    assert all(torch.equal(v, pristine[k]) for k, v in base.state_dict().items())
    assert not hasattr(base, "peft_config")


def test_truncated_safetensors(tmp_dir):
    _saved(tmp_dir)
    path = os.path.join(tmp_dir, "adapter_model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    _assert_load_fails_cleanly(tmp_dir, CheckpointError, "Cannot read adapter weights")


def test_wrong_peft_type(tmp_dir):
    _saved(tmp_dir)
    path = os.path.join(tmp_dir, "adapter_config.json")
    config = json.load(open(path)) | {"peft_type": "LORA"}
    json.dump(config, open(path, "w"))
    _assert_load_fails_cleanly(tmp_dir, ValueError, "LORA")


def test_wrong_shapes_and_missing_and_unexpected(tmp_dir):
    _saved(tmp_dir)
    path = os.path.join(tmp_dir, "adapter_model.safetensors")
    good = load_file(path)
    key = sorted(good)[0]
    save_file({**good, key: torch.zeros(3)}, path)
    _assert_load_fails_cleanly(tmp_dir, CheckpointError, "has shape")
    save_file({k: v for k, v in good.items() if k != key}, path)
    _assert_load_fails_cleanly(tmp_dir, CheckpointError, "missing key")
    save_file({**good, "base_model.model.model.layers.0.mlp.up_proj.fourierft_spectrum": torch.zeros(10)}, path)
    _assert_load_fails_cleanly(tmp_dir, CheckpointError, "unexpected key")
    save_file({**good, key: torch.zeros(10, dtype=torch.int64)}, path)
    _assert_load_fails_cleanly(tmp_dir, CheckpointError, "dtype")


def test_config_weight_disagreement(tmp_dir):
    _saved(tmp_dir)
    path = os.path.join(tmp_dir, "adapter_config.json")
    json.dump(json.load(open(path)) | {"n_frequency": 11}, open(path, "w"))
    _assert_load_fails_cleanly(tmp_dir, CheckpointError, "has shape")


def test_fingerprint_mismatch(tmp_dir):
    _saved(tmp_dir)
    path = os.path.join(tmp_dir, "adapter_config.json")
    json.dump(json.load(open(path)) | {"random_loc_seed": 1}, open(path, "w"))
    _assert_load_fails_cleanly(tmp_dir, CheckpointError, "fingerprint")


def test_peft_file_without_fingerprint_loads(tmp_dir):
    source = _make(peft, "llama", dict(task_type="CAUSAL_LM", n_frequency=10), "default")
    source.save_pretrained(tmp_dir)
    with safe_open(os.path.join(tmp_dir, "adapter_model.safetensors"), "pt") as fh:
        assert fh.metadata() == {"format": "pt"}
    loaded = PeftModel.from_pretrained(build("llama", seed=3), tmp_dir)
    torch.testing.assert_close(_out(loaded, "llama"), _out(source, "llama"))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/fourierft-pwned",))


def test_malicious_pickle_is_not_run(tmp_dir):
    _saved(tmp_dir)
    os.remove(os.path.join(tmp_dir, "adapter_model.safetensors"))
    if os.path.exists("/tmp/fourierft-pwned"):
        os.remove("/tmp/fourierft-pwned")
    with open(os.path.join(tmp_dir, "adapter_model.bin"), "wb") as fh:
        pickle.dump({"x": _Exploit()}, fh)
    _assert_load_fails_cleanly(tmp_dir, CheckpointError, "Cannot read adapter weights")
    assert not os.path.exists("/tmp/fourierft-pwned")


def test_legacy_peft_020_file_without_head_loads(tmp_dir, caplog):
    """peft <= 0.20 saved only fourierft_ keys and no peft_version: the head is missing, with a warning."""
    source = _make(fourierft, "bert", dict(task_type="SEQ_CLS", n_frequency=10), "default")
    source.save_pretrained(tmp_dir)
    path = os.path.join(tmp_dir, "adapter_model.safetensors")
    save_file({k: v for k, v in load_file(path).items() if "fourierft_" in k}, path, metadata={"format": "pt"})
    config_path = os.path.join(tmp_dir, "adapter_config.json")
    config = json.load(open(config_path))
    config.pop("peft_version")
    json.dump(config, open(config_path, "w"))
    loaded = PeftModel.from_pretrained(build("bert", seed=3), tmp_dir)
    spectra = [k for k in loaded.state_dict() if "fourierft_spectrum" in k]
    for key in spectra:
        torch.testing.assert_close(loaded.state_dict()[key], source.state_dict()[key])
    config["peft_version"] = "0.21.2"
    json.dump(config, open(config_path, "w"))
    with pytest.raises(CheckpointError, match="classifier"):
        PeftModel.from_pretrained(build("bert", seed=3), tmp_dir)


def test_interrupted_save_keeps_previous_adapter(tmp_dir, monkeypatch):
    model = _saved(tmp_dir)
    before = {n: open(os.path.join(tmp_dir, n), "rb").read() for n in os.listdir(tmp_dir) if n != "README.md"}
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.q_proj.fourierft_spectrum["default"].add_(1.0)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr("fourierft.config.PeftConfig.save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_dir)
    after = {n: open(os.path.join(tmp_dir, n), "rb").read() for n in os.listdir(tmp_dir) if n != "README.md"}
    assert after == before
    monkeypatch.undo()
    loaded = PeftModel.from_pretrained(build("llama", seed=3), tmp_dir)
    assert loaded is not None


def test_load_adapter_failure_removes_it(tmp_dir):
    _saved(tmp_dir)
    model = _make(fourierft, "llama", dict(task_type="CAUSAL_LM", n_frequency=10), "default")
    path = os.path.join(tmp_dir, "adapter_model.safetensors")
    good = load_file(path)
    save_file({k: v[:5] for k, v in good.items()}, path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError):
        model.load_adapter(tmp_dir, adapter_name="other")
    assert list(model.peft_config) == ["default"]
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("lib", [fourierft, peft], ids=["ours", "peft"])
def test_load_adapter_under_existing_name_reloads_weights(lib, tmp_dir):
    """As in PEFT: load_adapter(path, existing_name) puts the file's weights back into that adapter."""
    kwargs = dict(task_type="SEQ_CLS", n_frequency=40, modules_to_save=["classifier"])
    model = _make(lib, "bert", kwargs, "default")
    model.save_pretrained(tmp_dir)
    saved_out = _out(model, "bert")
    _trained(model)  # the weights move on after the checkpoint
    assert not torch.allclose(_out(model, "bert"), saved_out)
    model.load_adapter(tmp_dir, adapter_name="default")
    torch.testing.assert_close(_out(model, "bert"), saved_out)
    assert list(model.peft_config) == ["default"]


def test_load_adapter_under_existing_name_failures_keep_weights(tmp_dir):
    kwargs = dict(task_type="SEQ_CLS", n_frequency=40, modules_to_save=["classifier"])
    model = _make(fourierft, "bert", kwargs, "default")
    model.save_pretrained(tmp_dir)
    _trained(model)
    path = os.path.join(tmp_dir, "adapter_model.safetensors")
    good = load_file(path)
    broken = dict(good)
    key = sorted(k for k in good if "classifier" not in k)[-1]
    broken[key] = good[key][:5]  # a later key fails after earlier ones may have been copied
    save_file(broken, path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError):
        model.load_adapter(tmp_dir, adapter_name="default")
    save_file(good, path)
    other = _make(fourierft, "bert", dict(kwargs, n_frequency=30), "default")
    other.save_pretrained(os.path.join(tmp_dir, "n30"))
    with pytest.raises(ValueError, match="different config \\(n_frequency differ\\)"):
        model.load_adapter(os.path.join(tmp_dir, "n30"), adapter_name="default")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
