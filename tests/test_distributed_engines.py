"""Sharding engines on the CPU: DeepSpeed ZeRO-2/3 (own loop, ``AdapterTrainer``, accelerate) and FSDP1.

Each launch runs ``examples/train_ddp.py`` with two processes over gloo and plain SGD (Adam would turn
float-rounding noise in near-zero gradients into lr-sized steps, hiding a real difference among false ones);
one single-process launch with the two ranks' batches together (``--batch-size 8``) is the reference. The
checks, per engine and method:

* trains: the held-out loss goes down, both ranks end with the same adapter;
* equals single-process: the saved adapter matches the reference's within float tolerance;
* saves and reloads: the file holds whole tensors and reproduces the trained outputs on a fresh base model;
* merges: ``merge_and_unload`` gives the trained outputs (ZeRO: gathered), or FSDP1 refuses and says how;
* resumes: ``AdapterTrainer`` resumed from its halfway checkpoint ends where the uninterrupted run did.

``tests/zero3_worker.py`` checks each ZeRO-3 "gather or refuse" guarantee on its own (load, state dict,
save, merge, unmerge, hot-swap, merge_and_unload): it would fail if fourierft stopped gathering.
The DeepSpeed tests skip only where ``deepspeed`` is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from test_distributed import METHODS, SCRIPT, free_port, launch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
COMMON = ["--cpu", "--optimizer", "sgd", "--method", *METHODS, "--out", "out", "--report", "rep"]
TOLERANCE = 1e-4  # adapters: rounding of other reduction orders over 12 SGD steps (seen: 3e-5); values O(1)
OUTPUT_TOLERANCE = 5e-4  # logits O(10): under ZeRO-3 FourierFT runs its spectral route, a plain model W + dW
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason='deepspeed is not installed (pip install -e ".[deepspeed]" from a clone, '
                                            'pip install "fourierft[deepspeed]" from an index)')
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def torchrun(tmp: Path, nproc: int, *args: str) -> Path:
    launch([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
            "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}", *map(str, args)], tmp)
    return tmp


def example(tmp_path_factory, name: str, nproc: int, *args: str) -> Path:
    return torchrun(tmp_path_factory.mktemp(name), nproc, SCRIPT, *COMMON, *args)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, both ranks' batches at once."""
    return example(tmp_path_factory, "single", 1, "--launcher", "ddp", "trainer", "--batch-size", "8", "--resume")


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return example(tmp_path_factory, "zero3", 2, "--launcher", "deepspeed", "trainer", "--resume",
                   "--deepspeed", EXAMPLES / "ds_zero3.json")


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return example(tmp_path_factory, "zero2", 2, "--launcher", "deepspeed", "trainer",
                   "--deepspeed", EXAMPLES / "ds_zero2.json")


@pytest.fixture(scope="module")
def accelerate_zero3(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return example(tmp_path_factory, "accelerate_zero3", 2, "--launcher", "accelerate",
                   "--deepspeed", EXAMPLES / "ds_zero3.json")


@pytest.fixture(scope="module")
def accelerate_zero2(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return example(tmp_path_factory, "accelerate_zero2", 2, "--launcher", "accelerate",
                   "--deepspeed", EXAMPLES / "ds_zero2.json")


@pytest.fixture(scope="module")
def fsdp1(tmp_path_factory):
    return example(tmp_path_factory, "fsdp1", 2, "--launcher", "fsdp1")


RUNS = [  # (fixture, launcher in it, launcher of the single-process reference)
    pytest.param("zero3", "deepspeed", "ddp", marks=needs_deepspeed, id="zero3-deepspeed"),
    pytest.param("zero3", "trainer", "trainer", marks=needs_deepspeed, id="zero3-trainer"),
    pytest.param("zero2", "deepspeed", "ddp", marks=needs_deepspeed, id="zero2-deepspeed"),
    pytest.param("zero2", "trainer", "trainer", marks=needs_deepspeed, id="zero2-trainer"),
    pytest.param("accelerate_zero3", "accelerate", "ddp", marks=needs_deepspeed, id="zero3-accelerate"),
    pytest.param("accelerate_zero2", "accelerate", "ddp", marks=needs_deepspeed, id="zero2-accelerate"),
    pytest.param("fsdp1", "fsdp1", "ddp", id="fsdp1"),
]


def reports(folder: Path, launcher: str, method: str) -> list[dict]:
    return [json.loads((folder / "rep" / f"{launcher}-{method}-rank{r}.json").read_text()) for r in range(2)]


def adapter(folder: Path, launcher: str, method: str) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "out" / launcher / method / "adapter_model.safetensors"))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fixture,launcher,reference", RUNS)
def test_engine_trains_to_the_single_process_adapter(request, single, fixture, launcher, reference, method):
    run = request.getfixturevalue(fixture)
    rank0, rank1 = reports(run, launcher, method)
    assert rank0["engine"] == ("FullyShardedDataParallel" if fixture == "fsdp1" else "DeepSpeedEngine")
    # ZeRO-3 and FSDP1 leave empty placeholders / shards outside a forward, else the test would prove little
    assert rank0["partitioned"] == (fixture in ("zero3", "accelerate_zero3", "fsdp1"))
    assert rank0["world"] == 2 and rank0["first_batch"] != rank1["first_batch"]
    assert rank0["digest"] == rank1["digest"] != rank0["initial_digest"]
    assert rank0["loss_after"] < rank0["loss_before"] - 0.03, rank0  # FourierFT's stable SGD step is small
    got, want = adapter(run, launcher, method), adapter(single, reference, method)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].shape == want[key].shape and got[key].numel() > 0
        torch.testing.assert_close(got[key], want[key], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fixture,launcher,reference", RUNS)
def test_engine_saves_reloads_and_merges(request, fixture, launcher, reference, method):
    run = request.getfixturevalue(fixture)
    for report in reports(run, launcher, method):
        assert report["reload_max_abs_diff"] <= OUTPUT_TOLERANCE
        assert all(e == ["os.mkdir", "."] for e in report["writes"]) or report["rank"] == 0
        if fixture == "fsdp1":  # shards: refused with the way out, the weights untouched
            assert report["merge_max_abs_diff"] is None and "summon_full_params" in report["merge_refused"]
        else:
            assert report["merge_refused"] is None and report["merge_max_abs_diff"] <= OUTPUT_TOLERANCE


@pytest.mark.parametrize("fixture,launcher,reference", RUNS)
def test_fourierft_file_loads_in_peft(request, fixture, launcher, reference):
    """peft 0.21.2 loads each engine's FourierFT file and gives our reloaded outputs.

    BOFT files are not tried: on a machine without its CUDA extension peft forces ``m = 1`` and refuses these
    ``m = 2`` tensors with a size mismatch (docs/migrating.md); test_boft_model.py compares BOFT with peft at ``m = 1``.
    """
    peft = pytest.importorskip("peft")
    folder = str(request.getfixturevalue(fixture) / "out" / launcher / "fourierft")
    sys.path.insert(0, str(EXAMPLES))
    import train_ddp

    from fourierft import PeftModel

    batch = train_ddp.synthetic_sequences(16, seed=2)
    ours = PeftModel.from_pretrained(train_ddp.build_base_model(None, 0), folder).eval()
    theirs = peft.PeftModel.from_pretrained(train_ddp.build_base_model(None, 0), folder).eval()
    with torch.no_grad():
        gap = (ours(input_ids=batch).logits - theirs(input_ids=batch).logits).abs().max().item()
    assert gap <= OUTPUT_TOLERANCE


@needs_deepspeed
@pytest.mark.parametrize("method", METHODS)
def test_zero3_trainer_resumes_from_its_checkpoint(zero3, single, method):
    for report in reports(zero3, "trainer", method):
        assert report["resume_max_abs_diff"] <= TOLERANCE
    checkpoint = zero3 / "out" / "trainer_output" / "checkpoint-6"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in checkpoint.iterdir()}
    assert not (checkpoint / "model.safetensors").exists()  # adapter-only, whatever the 16-bit-gather flag says
    tensors = load_file(str(checkpoint / "adapter_model.safetensors"))
    assert tensors and all(t.numel() > 0 and torch.isfinite(t).all() for t in tensors.values())


@pytest.fixture(scope="module")
def zero3_checks(single, tmp_path_factory):
    pytest.importorskip("deepspeed")
    tmp = tmp_path_factory.mktemp("zero3_checks")
    # two different adapters of the same geometry per method: the single-process DDP and Trainer results
    return torchrun(tmp, 2, ROOT / "tests" / "zero3_worker.py", single / "out", tmp, *METHODS)


@needs_deepspeed
@pytest.mark.parametrize("method", METHODS)
def test_zero3_gathers_or_refuses(zero3_checks, method):
    """Each guarantee against an unpartitioned copy in the same process; fails if the gathering is removed."""
    for rank in range(2):
        report = json.loads((zero3_checks / f"{method}-{rank}.json").read_text())
        assert report["partitioned"], "the worker's model is not partitioned: the checks would prove nothing"
        assert report["state_dict_keys_match"]
        for key in ("state_dict_gap", "saved_gap", "unmerged_weight_gap"):
            assert report[key] <= 1e-6, (key, report)
        for key in ("load_gap", "merge_gap", "unmerge_gap", "hotswap_gap", "merge_and_unload_gap"):
            assert report[key] <= OUTPUT_TOLERANCE, (key, report)
        assert report["merged_weight_change"] > 1e-3 and report["hotswap_changed"] > 1e-2, report
        assert "shape (0,)" in report["placeholder_refused"] and "every rank" in report["placeholder_refused"]
        assert "ZeRO-3" in report["empty_refused"] and not report["empty_wrote"]
        assert "deepspeed.initialize" in report["prepare_refused"]
        # load_best_model_at_end: the first checkpoint (the best by construction) comes back
        assert report["best_checkpoint"] == "checkpoint-2" and report["best_gap"] <= 1e-6
        assert report["last_gap"] > 1e-3, report
