"""Multi-process training of FourierFT / BOFT adapters: DDP, FSDP1/2, DeepSpeed ZeRO, Trainer, accelerate.

The adapter's gradients are averaged across processes every step, so all copies stay identical; the frozen
base model is replicated (DDP) or sharded (FSDP, ZeRO-3). Only rank 0 writes the checkpoint.

Launch (two CPU processes with gloo; with CUDA available and no ``--cpu``, nccl and one GPU per process)::

    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --method fourierft boft --out runs
    accelerate launch --multi_gpu --num_processes 2 examples/train_ddp.py --launcher accelerate --cpu --out runs
    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --launcher fsdp --out runs
    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --launcher trainer --out runs
    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --launcher fsdp1 --out runs
    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --launcher deepspeed trainer \
        --deepspeed examples/ds_zero3.json --out runs      # or ds_zero2.json; accelerate alone, next line
    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --launcher accelerate --deepspeed \
        examples/ds_zero3.json --cpu --out runs

``--launcher`` picks how the model is made data parallel: ``ddp`` (``DistributedDataParallel``),
``accelerate`` (``Accelerator.prepare``), ``fsdp`` (FSDP2 ``fully_shard``), ``fsdp1``
(``FullyShardedDataParallel``, one unit per decoder layer), ``deepspeed`` (``deepspeed.initialize`` with the
``--deepspeed`` config) or ``trainer`` (fourierft's ``AdapterTrainer``, a ``transformers.Trainer``); with
``--deepspeed CONFIG``, ``trainer`` and ``accelerate`` run DeepSpeed too. Several launchers and methods run one
after the other in the same processes (accelerate with DeepSpeed alone: its state is per process). Each
adapter is saved to ``<out>/<launcher>/<method>``; after saving, the trained adapter is merged
(``merge_and_unload``) and its outputs compared.

Without ``--model`` a tiny Llama is built from a config (random weights, no download) and trained on a
synthetic task an adapter can learn: continue the sequence ``t, t + k, t + 2k, ...`` (mod vocab). Every
rank sees different sequences. With ``--report DIR`` each rank writes ``<launcher>-<method>-rank<r>.json``
(adapter hash, losses, its first batch, the files it wrote) for the tests to check.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from fourierft import BOFTConfig, FourierFTConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from fourierft.partitioned import PartitionedError

logger = logging.getLogger("train_ddp")
VOCAB, SEQ = 64, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_LR = {"fourierft": 0.05, "boft": 0.02}
SGD_LR = {"fourierft": 0.02, "boft": 0.5}  # stable: a larger FourierFT step amplifies rounding differences
LAUNCHERS = ["ddp", "accelerate", "fsdp", "fsdp1", "deepspeed", "trainer"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", nargs="+", choices=["fourierft", "boft"], default=["fourierft"],
                   help="one or several methods, trained one after the other")
    p.add_argument("--launcher", nargs="+", choices=LAUNCHERS, default=["ddp"],
                   help="ddp: torch DistributedDataParallel; accelerate: Accelerator.prepare; fsdp: FSDP2 "
                        "fully_shard on each decoder layer and the root; trainer: AdapterTrainer (a transformers.Trainer)")
    p.add_argument("--model", default=None, help="a Hugging Face causal LM id or folder (default: tiny Llama)")
    p.add_argument("--out", required=True, help="rank 0 saves each adapter to <out>/<launcher>/<method>")
    p.add_argument("--report", default=None, help="folder for per-rank JSON reports (used by the tests)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4, help="per process")
    p.add_argument("--lr", type=float, default=None, help="default: 0.05 (FourierFT), 0.02 (BOFT); "
                   "with --optimizer sgd 0.02 and 0.5")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                   help="sgd: plain SGD, whose result follows the gradients smoothly (Adam turns float-rounding "
                        "noise in near-zero gradients into lr-sized steps); the tests compare engines with it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="stay on the CPU (gloo) even if CUDA is available")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config (examples/ds_zero2.json, ds_zero3.json) "
                   "for the deepspeed launcher; trainer and accelerate use DeepSpeed too when it is given")
    p.add_argument("--resume", action="store_true", help="trainer: also stop at step steps/2 (a checkpoint), "
                   "resume from it in a fresh trainer and report how far the result is from the uninterrupted one")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ data, model
def synthetic_sequences(count: int, seed: int) -> torch.Tensor:
    """``count`` arithmetic sequences mod ``VOCAB`` with a random start and a step in 1..3."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (count, 1), generator=g)
    step = torch.randint(1, 4, (count, 1), generator=g)
    return (start + step * torch.arange(SEQ)) % VOCAB


def build_base_model(name: str | None, seed: int):
    """The frozen base model; seeded, so every rank (and a later reload) builds the same weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if name:
        return AutoModelForCausalLM.from_pretrained(name)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                      initializer_range=0.2)  # large enough that a frozen random model is not ~uniform
    return LlamaForCausalLM(cfg)


def adapter_config(method: str):
    if method == "fourierft":
        return FourierFTConfig(task_type="CAUSAL_LM", target_modules=TARGETS, n_frequency=64, scaling=100.0)
    return BOFTConfig(task_type="CAUSAL_LM", target_modules=TARGETS, boft_block_size=4, boft_n_butterfly_factor=2)


def adapter_digest(model, state_dict=None) -> str:
    """SHA-256 over the adapter tensors as they are saved (file keys and exact bytes)."""
    digest = hashlib.sha256()
    for key, value in sorted(get_peft_model_state_dict(model, state_dict).items()):
        digest.update(key.encode())
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def eval_loss(model, batch: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    loss = model(input_ids=batch, labels=batch).loss.item()
    model.train(was_training)
    return loss


# ------------------------------------------------------------------------------------------ file audit
class WriteAudit:
    """Records this process's file-system writes below ``root`` (open for writing, mkdir, rename, remove).

    safetensors writes from Rust, invisible to Python's audit events, but the library's atomic save goes
    through ``mkdtemp`` and ``os.replace``, which are visible, and writes the JSON config from Python.
    """

    EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree"}
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def __init__(self, root: str) -> None:
        self.root, self.events, self.active = os.path.abspath(root), [], False
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if not self.active:
            return
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & self.WRITE_FLAGS)
            paths = [path] if writes and isinstance(path, str) else []
        elif event in self.EVENTS:
            paths = [a for a in args if isinstance(a, str)]
        else:
            return
        inside = [os.path.abspath(p) for p in paths if os.path.abspath(p).startswith(self.root)]
        if inside:
            self.events.append([event] + [os.path.relpath(p, self.root) for p in inside])


# ------------------------------------------------------------------------------------------ training
def setup(args):
    """Process group and device; returns ``(rank, world, device, accelerator or None)``."""
    acc = None
    use_cuda = torch.cuda.is_available() and not args.cpu
    if args.deepspeed or "deepspeed" in args.launcher:
        import deepspeed

        # before Trainer / Accelerator: otherwise, on a CPU, they see one process and reject the batch sizes
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    if "accelerate" in args.launcher:
        acc = make_accelerator(args)  # initialises the process group
        expected = int(os.environ.get("WORLD_SIZE", 1))
        if acc.num_processes != expected:  # accelerate on a CPU-only host without cpu=True: no gradient sync
            raise RuntimeError(f"accelerate set up {acc.num_processes} process(es) but {expected} were launched; "
                               "on CPU pass --cpu (Accelerator(cpu=True)) or set ACCELERATE_USE_CPU=1")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device, acc


def make_accelerator(args):
    """The process's first ``Accelerator`` (it holds the DeepSpeed plugin with ``--deepspeed``)."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DeepSpeedPlugin

    if not args.deepspeed:
        return Accelerator(cpu=args.cpu)
    PartialState(cpu=args.cpu)  # first: Accelerator() alone sees one process on a CPU; cpu=True drops DeepSpeed
    return Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=resolved_ds_config(args)))


def resolved_ds_config(args, world: int = 0) -> dict:
    """The ``--deepspeed`` JSON with its ``"auto"`` entries filled as Trainer would (batch, no accumulation,
    no clipping: this script's own loop does not clip). Trainer fills them itself from TrainingArguments."""
    with open(args.deepspeed) as fh:
        config = json.load(fh)
    auto = {"train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0}
    config.update({k: v for k, v in auto.items() if config.get(k) == "auto"})
    if world:
        config["train_batch_size"] = args.batch_size * world
    return config


def make_optimizer(module, lr: float, kind: str = "adamw"):
    params = [p for p in module.parameters() if p.requires_grad]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def wrap(args, launcher: str, model, lr: float, device, acc):
    """Make the model data parallel; returns ``(train_model, optimizer)``.

    The optimizer is built after wrapping: ``fully_shard`` replaces the parameters by sharded ones.
    """
    if launcher == "accelerate":
        return acc.prepare(model, make_optimizer(model, lr, args.optimizer))
    if launcher == "deepspeed":  # ZeRO-3 partitions every parameter here; the engine steps the optimizer
        import deepspeed

        config = resolved_ds_config(args, dist.get_world_size())
        optimizer = make_optimizer(model, lr, args.optimizer)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        return engine, optimizer
    if launcher == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        layers = getattr(model.get_base_model().model, "layers", [])
        policy = ModuleWrapPolicy({type(layer) for layer in layers})
        root = FullyShardedDataParallel(model, device_id=device, use_orig_params=True, auto_wrap_policy=policy)
        return root, make_optimizer(root, lr, args.optimizer)
    if launcher == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in getattr(model.get_base_model().model, "layers", []):
            fully_shard(layer)
        fully_shard(model)
        return model, make_optimizer(model, lr, args.optimizer)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids), make_optimizer(model, lr, args.optimizer)


def full_state_dict(model, launcher: str):
    """``None`` (the model's own state dict is complete, or fourierft gathers it: ZeRO-3) except under FSDP,
    where the shards are gathered (FSDP1: ``model`` is the root ``FullyShardedDataParallel``).

    Gathering is a collective: every rank must call this, not only the one that saves.
    """
    if launcher == "fsdp1":
        return model.state_dict()  # FULL_STATE_DICT, FSDP1's default: every rank gets the whole tensors
    if launcher != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def train_loop(args, launcher: str, model, data, rank: int, world: int, lr: float, device, acc):
    """Our own loop (ddp, fsdp, accelerate); returns ``(losses, first batch)``."""
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, seed=args.seed)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler)
    if launcher == "accelerate" and getattr(acc, "deepspeed_engine_wrapped", None) is not None:
        from accelerate import Accelerator

        acc = Accelerator()  # one DeepSpeed engine per Accelerator; a second one shares the first one's plugin
    train_model, optimizer = wrap(args, launcher, model, lr, device, acc)
    train_model.train()
    losses, first_batch = [], None
    for step, (batch,) in enumerate(loader):
        batch = batch.to(device)
        first_batch = batch.tolist() if first_batch is None else first_batch
        loss = train_model(input_ids=batch, labels=batch).loss
        if launcher == "deepspeed":
            train_model.backward(loss)
            train_model.step()  # the engine steps and zeroes the gradients
        else:
            acc.backward(loss) if launcher == "accelerate" else loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        if step % 4 == 0:
            logger.info("%s rank %d step %d loss %.4f", launcher, rank, step, losses[-1])
    return losses, first_batch, train_model


def make_trainer(args, model, data, lr: float, output_dir: str):
    """An ``AdapterTrainer`` (a ``transformers.Trainer``): DDP under torchrun, DeepSpeed with ``--deepspeed``.

    With ``--resume`` it also writes a checkpoint (adapter files + Trainer and DeepSpeed state) halfway.
    """
    from transformers import TrainingArguments

    from fourierft import AdapterTrainer

    targs = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=args.batch_size,
        max_steps=args.steps, learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0,
        optim="sgd" if args.optimizer == "sgd" else "adamw_torch",
        use_cpu=args.cpu, report_to=[], save_strategy="steps" if args.resume else "no",
        save_steps=max(1, args.steps // 2), logging_steps=1, seed=args.seed, deepspeed=args.deepspeed,
        disable_tqdm=True, ddp_find_unused_parameters=False)  # every adapter tensor is used in each step
    return AdapterTrainer(model=model, args=targs, adapter_lr=lr,
                          train_dataset=[{"input_ids": x, "labels": x} for (x,) in data])


def train_with_trainer(args, model, data, lr: float):
    """Train with :func:`make_trainer`; returns ``(losses, first batch, trainer)``.

    ``trainer.save_model`` writes adapter files from rank 0 (under DeepSpeed every rank gathers them first).
    """
    seen = []
    hook = model.register_forward_pre_hook(
        lambda mod, a, kw: seen.append(kw["input_ids"].tolist()) if not seen else None, with_kwargs=True)
    trainer = make_trainer(args, model, data, lr, os.path.join(args.out, "trainer_output"))
    trainer.train()
    hook.remove()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return losses, seen[0], trainer


def resume_gap(args, model, data, lr: float, method: str) -> float:
    """Train a fresh model from the halfway checkpoint to the end; the largest difference to ``model``'s adapter.

    Every rank calls it (gathering the adapters is a collective under ZeRO-3).
    """
    folder = os.path.join(args.out, "trainer_output")
    checkpoint = os.path.join(folder, f"checkpoint-{max(1, args.steps // 2)}")
    fresh = get_peft_model(build_base_model(args.model, args.seed), adapter_config(method)).to(model.device)
    trainer = make_trainer(args, fresh, data, lr, folder + "-resumed")
    trainer.train(resume_from_checkpoint=checkpoint)
    want, got = get_peft_model_state_dict(model), get_peft_model_state_dict(fresh)
    return max((want[k] - got[k]).abs().max().item() for k in want)


def train(args, launcher: str, method: str, rank: int, world: int, device, acc) -> dict:
    """Train one adapter, save it from rank 0, reload it on every rank; returns this rank's report."""
    out = os.path.join(args.out, launcher, method)
    audit = WriteAudit(out)
    model = get_peft_model(build_base_model(args.model, args.seed), adapter_config(method)).to(device)
    if rank == 0:
        model.print_trainable_parameters()
    initial_digest = adapter_digest(model)
    data = TensorDataset(synthetic_sequences(world * args.batch_size * args.steps, seed=args.seed + 1))
    eval_batch = synthetic_sequences(16, seed=args.seed + 2).to(device)  # the same on every rank
    lr = args.lr or (SGD_LR if args.optimizer == "sgd" else DEFAULT_LR)[method]

    loss_before, start = eval_loss(model, eval_batch), time.perf_counter()
    trainer, runner = None, model
    if launcher == "trainer":
        losses, first_batch, trainer = train_with_trainer(args, model, data, lr)
    else:
        losses, first_batch, runner = train_loop(args, launcher, model, data, rank, world, lr, device, acc)
    engine = type(trainer.model_wrapped if trainer is not None else runner).__name__
    partitioned = any(p.numel() == 0 for p in model.parameters())  # ZeRO-3 placeholders outside a forward
    runner = runner if launcher == "fsdp1" else model  # FSDP1 shards the root's own tensors: run the root
    loss_after = eval_loss(runner, eval_batch)
    logger.info("%s/%s rank %d: eval loss %.4f -> %.4f (%d steps, %.1fs)", launcher, method, rank, loss_before,
                loss_after, len(losses), time.perf_counter() - start)

    state = full_state_dict(runner, launcher)
    digest = adapter_digest(model, state)
    audit.active = True
    if trainer is not None:
        trainer.save_model(out)  # writes on the main process only (TrainingArguments.should_save)
    else:
        model.save_pretrained(out, is_main_process=rank == 0, state_dict=state)
    audit.active = False
    dist.barrier()

    # every rank loads rank 0's files onto a fresh base model and compares with its own trained model
    reloaded = PeftModel.from_pretrained(build_base_model(args.model, args.seed), out).to(device)
    with torch.no_grad():
        runner.eval()
        trained = runner(input_ids=eval_batch).logits
        diff = (trained - reloaded(input_ids=eval_batch).logits).abs().max()
    digests = [None] * world
    dist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        logger.error("%s/%s: the adapters differ across ranks: %s", launcher, method, digests)
    resumed = resume_gap(args, model, data, lr, method) if trainer is not None and args.resume else None
    merge_diff, merge_refused = merge_gap(model, trained, eval_batch)
    return dict(rank=rank, world=world, launcher=launcher, method=method, initial_digest=initial_digest,
                digest=digest, all_digests=digests, loss_before=loss_before, loss_after=loss_after, losses=losses,
                first_batch=first_batch, reload_max_abs_diff=diff.item(), writes=audit.events,
                resume_max_abs_diff=resumed, merge_max_abs_diff=merge_diff, merge_refused=merge_refused,
                engine=engine, partitioned=partitioned)


def merge_gap(model, trained: torch.Tensor, eval_batch: torch.Tensor):
    """``merge_and_unload`` the trained model; ``(largest output change, None)`` or ``(None, why it refused)``.

    Under ZeRO-3 every rank gathers and merges each layer; FSDP1's shards are refused (merge a reloaded
    copy on an unsharded base model instead).
    """
    try:
        merged = model.merge_and_unload()
    except PartitionedError as err:
        return None, str(err)
    with torch.no_grad():
        return (merged(input_ids=eval_batch).logits - trained).abs().max().item(), None


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rank, world, device, acc = setup(args)
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    for launcher in args.launcher:
        for method in args.method:
            report = train(args, launcher, method, rank, world, device, acc)
            if args.report:
                os.makedirs(args.report, exist_ok=True)
                with open(os.path.join(args.report, f"{launcher}-{method}-rank{rank}.json"), "w") as fh:
                    json.dump(report, fh)
    dist.barrier()
    if acc is not None:
        acc.end_training()
    else:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
