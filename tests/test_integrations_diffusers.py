"""FourierFT and BOFT on diffusers models: add/save/load helpers in PEFT's layout (PEFT as the oracle for
the files), pipeline-level all-or-nothing loading, and the offline diffusion example end to end."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

pytest.importorskip("diffusers")

from fourierft import BOFTConfig, CheckpointError, FourierFTConfig  # noqa: E402
from fourierft.integrations.diffusers import (add_adapter, delete_adapter, load_adapter,  # noqa: E402
                                              load_pipeline_adapters, merge_and_unload, pipeline_components,
                                              save_adapter,
                                              save_pipeline_adapters)
from fourierft.layer import AdapterLayer  # noqa: E402

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "diffusion_boft.py")
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def load_example():
    spec = importlib.util.spec_from_file_location("diffusion_boft", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return load_example()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops: two threads on a busy 2-core machine are up to 80x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe(example, tmp_path_factory):
    return example.build_pipeline(str(tmp_path_factory.mktemp("tok")))


def unet_out(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 32, generator=gen)
    with torch.no_grad():
        return unet(sample, torch.tensor([3, 700]), encoder_hidden_states=text).sample


def perturb(model, adapter_name: str = "default", seed: int = 9) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{adapter_name}" in name and ("boft_" in name or "fourierft_" in name):
                p.add_(0.1 * torch.randn_like(p))


def adapter_layers(model) -> list[str]:
    return [k for k, m in model.named_modules() if isinstance(m, AdapterLayer)]


CONFIGS = {
    "boft": lambda: BOFTConfig(target_modules=ATTENTION, boft_block_size=4),  # PEFT on CPU: 1 factor
    # scaling 20, not the default 150: with 150 this random UNet amplifies float32 rounding to 1e-3 at the output
    # (measured against float64), and the peft comparison below would test summation order, not the file
    "fourierft": lambda: FourierFTConfig(target_modules=ATTENTION, n_frequency=50, init_weights=False, scaling=20.0),
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_unet_adapter_saves_in_peft_layout_and_peft_loads_it(pipe, tmp_path, method):
    import peft

    unet = copy.deepcopy(pipe.unet)
    base = unet_out(unet)
    targets = sorted(k for k, m in unet.named_modules() if isinstance(m, torch.nn.Linear)
                     and any(k == t or k.endswith("." + t) for t in ATTENTION))
    add_adapter(unet, CONFIGS[method]())
    assert sorted(adapter_layers(unet)) == targets and len(targets) > 8 and list(unet.peft_config) == ["default"]
    if method == "boft":
        torch.testing.assert_close(unet_out(unet), base, rtol=1e-5, atol=1e-5)  # identity at init
    perturb(unet)
    tuned = unet_out(unet)
    assert (tuned - base).abs().max() > 1e-3
    save_adapter(unet, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(pipe.unet), str(tmp_path)).eval()
    torch.testing.assert_close(unet_out(theirs), tuned, rtol=1e-4, atol=1e-5)
    mine = copy.deepcopy(pipe.unet)
    load_adapter(mine, str(tmp_path))
    assert torch.equal(unet_out(mine), tuned)
    assert not any(p.requires_grad for p in mine.parameters())


def test_diffusers_add_adapter_rejects_our_config_as_documented(pipe):
    unet = copy.deepcopy(pipe.unet)
    with pytest.raises(ValueError, match="PeftConfig"):
        unet.add_adapter(CONFIGS["boft"]())
    assert not adapter_layers(unet)


def test_second_adapter_switching_and_delete(pipe):
    from fourierft.functional import set_adapter

    unet = copy.deepcopy(pipe.unet)
    base = unet_out(unet)
    add_adapter(unet, CONFIGS["boft"]())
    perturb(unet)
    first = unet_out(unet)
    add_adapter(unet, CONFIGS["boft"](), "second")
    perturb(unet, "second", seed=10)
    second = unet_out(unet)
    assert sorted(unet.peft_config) == ["default", "second"] and not torch.equal(first, second)
    set_adapter(unet, "default")
    assert torch.equal(unet_out(unet), first)
    with pytest.raises(ValueError, match="already exists"):
        add_adapter(unet, CONFIGS["boft"](), "second")
    with pytest.raises(ValueError, match="Cannot add a FOURIERFT"):
        add_adapter(unet, CONFIGS["fourierft"](), "third")
    delete_adapter(unet, "default")
    assert torch.equal(unet_out(unet), second)
    delete_adapter(unet, "second")
    assert not adapter_layers(unet) and unet.peft_config == {}
    assert torch.equal(unet_out(unet), base)


def test_pipeline_save_load_and_all_or_nothing(example, pipe, tmp_path):
    tuned = copy.deepcopy(pipe)
    example.add_boft(tuned)
    perturb(tuned.unet)
    perturb(tuned.text_encoder)
    assert save_pipeline_adapters(tuned, str(tmp_path)) == ["text_encoder", "unet"]
    fresh = copy.deepcopy(pipe)
    assert load_pipeline_adapters(fresh, str(tmp_path)) == ["text_encoder", "unet"]
    assert torch.equal(unet_out(fresh.unet), unet_out(tuned.unet))
    assert sorted(pipeline_components(fresh, "default")) == ["text_encoder", "unet"]
    os.remove(os.path.join(tmp_path, "unet", "adapter_model.safetensors"))
    broken = copy.deepcopy(pipe)
    with pytest.raises((FileNotFoundError, CheckpointError)):
        load_pipeline_adapters(broken, str(tmp_path))  # text_encoder loads first, then unet fails
    assert not adapter_layers(broken.text_encoder) and not adapter_layers(broken.unet)
    assert not getattr(broken.text_encoder, "peft_config", None)
    with pytest.raises(ValueError, match="holds adapter"):
        save_pipeline_adapters(broken, str(tmp_path / "none"))


def test_example_trains_saves_and_reloads_identically(example, tmp_path):
    result = example.run(steps=4, out=str(tmp_path))
    assert len(result["losses"]) == 4 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert result["identical"] == {"text_embeddings": True, "unet": True, "image": True}
    assert min(result["changed_by_training"].values()) > 0  # the adapters did change the outputs
    assert result["saved"] == result["loaded"] == ["text_encoder", "unet"]


def test_merge_and_unload_gives_a_plain_unet_diffusers_saves(pipe, tmp_path):
    from diffusers import UNet2DConditionModel

    unet = copy.deepcopy(pipe.unet)
    add_adapter(unet, BOFTConfig(target_modules=ATTENTION + ["conv1", "conv2"], boft_block_size=4))
    perturb(unet)
    tuned = unet_out(unet)
    assert merge_and_unload(unet) is unet and not adapter_layers(unet) and unet.peft_config == {}
    torch.testing.assert_close(unet_out(unet), tuned, rtol=1e-4, atol=1e-5)
    unet.save_pretrained(str(tmp_path))
    again = UNet2DConditionModel.from_pretrained(str(tmp_path))
    assert torch.equal(unet_out(again), unet_out(unet))
