"""Multi-process training on the CPU: two ``torchrun`` / ``accelerate launch`` processes with gloo.

Two launches of ``examples/train_ddp.py`` train FourierFT and BOFT (``m = 2``) adapters in turn, in the
same processes to pay the start-up once: ``torchrun`` with DDP, FSDP2 and ``AdapterTrainer`` (a
``transformers.Trainer``), and ``accelerate launch`` with ``Accelerator.prepare``. Every rank writes a JSON
report; the checks:

* the ranks saw different data, and their adapters are identical afterwards (and differ from the start);
* the held-out loss went down;
* rank 0 alone wrote the checkpoint (Python audit hooks record every file-system write of each rank);
* every rank reloads the saved files onto a fresh base model and gets its trained outputs back exactly;
* FSDP2 (``fully_shard``) trains to the same adapter bytes as DDP.

The launches are shared through module-scoped fixtures; the file takes about 25 s of wall time on two
idle cores (about 50 s when other jobs share them).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_ddp.py"
from conftest import METHODS as METHOD_TABLE  # noqa: E402

METHODS = tuple(METHOD_TABLE)  # each one a --method of examples/train_ddp.py
TORCHRUN_LAUNCHERS = ("ddp", "fsdp", "trainer")
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}
TIMEOUT = 240  # per launch: a hung collective must fail the test, not the CI job

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], cwd: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT / "src")])))
    env.pop("ACCELERATE_USE_CPU", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"


def reports(folder: Path, launcher: str) -> dict[str, list[dict]]:
    """``{method: [rank 0 report, rank 1 report]}``."""
    return {m: [json.loads((folder / f"{launcher}-{m}-rank{r}.json").read_text()) for r in range(2)]
            for m in METHODS}


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchrun")
    launch([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
            "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}", str(SCRIPT), "--cpu",
            "--launcher", *TORCHRUN_LAUNCHERS, "--method", *METHODS, "--out", "out", "--report", "rep"], tmp)
    return tmp


@pytest.fixture(scope="module")
def accelerate_run(tmp_path_factory):
    # `accelerate launch --cpu --num_processes 2` starts ONE process (its simple launcher; multi-CPU needs
    # --mpirun_hostfile), so use the torchrun-based launcher and ask the Accelerator for the CPU (--cpu).
    pytest.importorskip("accelerate")
    tmp = tmp_path_factory.mktemp("accelerate")
    launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), str(SCRIPT), "--launcher", "accelerate", "--cpu",
            "--method", *METHODS, "--out", "out", "--report", "rep"], tmp)
    return tmp


@pytest.fixture(params=[*TORCHRUN_LAUNCHERS, "accelerate"])
def run(request):
    """``(adapter folder of each method, reports of each method)`` for one launcher."""
    launcher = request.param
    tmp = request.getfixturevalue("accelerate_run" if launcher == "accelerate" else "torchrun_run")
    return {m: tmp / "out" / launcher / m for m in METHODS}, reports(tmp / "rep", launcher)


# ---------------------------------------------------------------------------------------------- checks
@pytest.mark.parametrize("method", METHODS)
def test_ranks_see_different_data_and_end_with_equal_adapters(run, method):
    rank0, rank1 = run[1][method]
    assert rank0["world"] == rank1["world"] == 2
    assert rank0["first_batch"] != rank1["first_batch"]
    assert rank0["digest"] == rank1["digest"] == rank0["all_digests"][1]
    assert rank0["initial_digest"] == rank1["initial_digest"] != rank0["digest"]


@pytest.mark.parametrize("method", METHODS)
def test_held_out_loss_decreases(run, method):
    for report in run[1][method]:
        assert report["loss_after"] < report["loss_before"] - 0.1, report
        assert report["losses"] and all(map(torch.isfinite, torch.tensor(report["losses"])))


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_written_by_rank0_only(run, method):
    folders, by_method = run
    rank0, rank1 = by_method[method]
    files = {p.name for p in folders[method].iterdir()}
    assert files - {"training_args.bin"} == ADAPTER_FILES  # no leftover temporary folder (Trainer adds its args)
    # rank 1 at most creates the (shared) folder itself, as PEFT does; never a file
    assert all(event == ["os.mkdir", "."] for event in rank1["writes"]), rank1["writes"]
    renamed = {e[-1] for e in rank0["writes"] if e[0] == "os.rename"}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= renamed


@pytest.mark.parametrize("method", METHODS)
def test_saved_adapter_reloads_to_trained_outputs(run, method):
    folders, by_method = run
    for report in by_method[method]:
        assert report["reload_max_abs_diff"] <= 1e-6
    from safetensors.torch import load_file

    tensors = load_file(str(folders[method] / "adapter_model.safetensors"))
    assert tensors and all(k.startswith("base_model.model.") for k in tensors)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    if method == "boft":
        assert {t.shape[0] for k, t in tensors.items() if k.endswith("boft_R")} == {2}  # m = 2 kept


@pytest.mark.parametrize("method", METHODS)
def test_trained_model_merges_or_refuses(run, method):
    """``merge_and_unload`` after training gives the trained outputs; FSDP2's DTensor weights are refused."""
    for report in run[1][method]:
        if report["launcher"] == "fsdp":
            assert report["merge_max_abs_diff"] is None and "DTensor" in report["merge_refused"], report
        else:
            assert report["merge_refused"] is None and report["merge_max_abs_diff"] <= 5e-4, report


@pytest.mark.parametrize("method", METHODS)
def test_fsdp_trains_to_the_same_adapter_as_ddp(torchrun_run, method):
    from safetensors.torch import load_file

    ddp = load_file(str(torchrun_run / "out" / "ddp" / method / "adapter_model.safetensors"))
    fsdp = load_file(str(torchrun_run / "out" / "fsdp" / method / "adapter_model.safetensors"))
    assert ddp.keys() == fsdp.keys()
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], atol=1e-6, rtol=1e-5)


@pytest.fixture
def single_process_group(tmp_path):
    """A one-rank gloo group in this process (enough for FSDP2 to shard into DTensors)."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", METHODS)
def test_fsdp_save_pretrained_without_state_dict(single_process_group, tmp_path, method):
    from torch.distributed.fsdp import fully_shard

    sys.path.insert(0, str(SCRIPT.parent))
    import train_ddp

    from fourierft import PeftModel, get_peft_model

    model = get_peft_model(train_ddp.build_base_model(None, 0), train_ddp.adapter_config(method))
    want = train_ddp.adapter_digest(model)
    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.save_pretrained(str(tmp_path / "plain"))  # what a PEFT user writes
    reloaded = PeftModel.from_pretrained(train_ddp.build_base_model(None, 0), str(tmp_path / "plain"))
    assert train_ddp.adapter_digest(reloaded) == want


def test_fsdp_model_card_matches_ddp(torchrun_run):
    for method in METHODS:
        ddp = (torchrun_run / "out" / "ddp" / method / "README.md").read_text()
        assert (torchrun_run / "out" / "fsdp" / method / "README.md").read_text() == ddp
