"""Run by ``tests/test_distributed_engines.py`` under ``torchrun --nproc_per_node 2``: ZeRO-3 "gather or refuse".

Every parameter of the model is partitioned (``stage3_param_persistence_threshold: 0``), so outside a forward
each one is an empty placeholder. Each check compares what fourierft does on the partitioned model with a
plain, unpartitioned copy of the same model in the same process (the reference), or expects a refusal.
Usage: ``zero3_worker.py OUT REPORT_DIR METHOD...`` where ``OUT`` is the ``--out`` folder of a single-process
``examples/train_ddp.py --launcher ddp trainer`` run: its two adapters per method (A: ``OUT/ddp/<method>``,
B: ``OUT/trainer/<method>``) differ. Rank ``r`` writes ``REPORT_DIR/<method>-<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import deepspeed  # noqa: E402
import train_ddp  # noqa: E402

from fourierft import (PeftModel, get_peft_model, get_peft_model_state_dict, hotswap_adapter,  # noqa: E402
                       set_peft_model_state_dict)
from fourierft.hotswap import prepare_model_for_hotswap  # noqa: E402
from fourierft.partitioned import PartitionedError, gathered  # noqa: E402
from fourierft.serialization.folders import load_weights_file  # noqa: E402

CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def plain(folder: str):
    """The reference: the adapter in ``folder`` on an unpartitioned base model."""
    return PeftModel.from_pretrained(train_ddp.build_base_model(None, 0), folder).eval()


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch).logits


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def refusal(fn) -> str:
    """The message of the ``PartitionedError`` / ``KeyError`` that ``fn`` raises, or ``""`` if it does not."""
    try:
        fn()
    except (PartitionedError, KeyError) as err:
        return str(err)
    return ""


def first_weight(model) -> torch.Tensor:
    """The first adapted layer's base weight, gathered (a copy)."""
    layer = next(m for n, m in model.named_modules() if n.endswith("q_proj"))
    weight = (layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer).weight
    with gathered([weight]):
        return weight.detach().clone()


def main() -> None:
    out, report_dir, *methods = sys.argv[1:]
    deepspeed.init_distributed(dist_backend="gloo")
    for method in methods:
        report = check(method, os.path.join(out, "ddp", method), os.path.join(out, "trainer", method))
        with open(os.path.join(report_dir, f"{method}-{dist.get_rank()}.json"), "w") as fh:
            json.dump(report, fh)
    dist.barrier()
    dist.destroy_process_group()


def check(method: str, folder_a: str, folder_b: str) -> dict:
    """Every check on a fresh ZeRO-3 model of ``method``; returns this rank's report."""
    rank = dist.get_rank()
    batch = train_ddp.synthetic_sequences(4, seed=7)
    model = get_peft_model(train_ddp.build_base_model(None, 0), train_ddp.adapter_config(method))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=CONFIG)
    model.eval()
    report = {"partitioned": all(p.numel() == 0 for p in model.parameters())}
    ref_a, ref_b = plain(folder_a), plain(folder_b)
    file_a, _ = load_weights_file(folder_a)

    # loading into placeholders: gathered, written on every rank, partitioned again
    set_peft_model_state_dict(model, file_a)
    report["load_gap"] = gap(logits(model, batch), logits(ref_a, batch))
    # the state dict (and so save_pretrained) gathers whole tensors
    state = get_peft_model_state_dict(model)
    report["state_dict_keys_match"] = sorted(state) == sorted(file_a)
    report["state_dict_gap"] = max(gap(state[k], file_a[k]) for k in file_a)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, is_main_process=rank == 0)
        dist.barrier()
        saved, _ = load_weights_file(tmp) if rank == 0 else (file_a, None)
        report["saved_gap"] = max(gap(saved[k], file_a[k]) for k in file_a)
        # a placeholder state dict (what model.state_dict() holds under ZeRO-3) is refused, nothing written
        report["placeholder_refused"] = refusal(lambda: get_peft_model_state_dict(model, model.state_dict()))
        report["empty_refused"] = refusal(lambda: model.save_pretrained(os.path.join(tmp, "empty"), state_dict={}))
        report["empty_wrote"] = os.path.exists(os.path.join(tmp, "empty", "adapter_model.safetensors"))
    # merging gathers base weights and adapter tensors on every rank
    before, base_weight = logits(model, batch), first_weight(train_ddp.build_base_model(None, 0))
    model.merge_adapter()
    report["merge_gap"] = gap(logits(model, batch), before)
    report["merged_weight_change"] = gap(first_weight(model), base_weight)
    model.unmerge_adapter()
    report["unmerge_gap"] = gap(logits(model, batch), before)
    report["unmerged_weight_gap"] = gap(first_weight(model), base_weight)
    # hot-swapping copies into the gathered adapter tensors
    hotswap_adapter(model, folder_b)
    report["hotswap_gap"] = gap(logits(model, batch), logits(ref_b, batch))
    report["hotswap_changed"] = gap(logits(ref_b, batch), logits(ref_a, batch))
    report["prepare_refused"] = refusal(lambda: prepare_model_for_hotswap(model, target_n_frequency=128,
                                                                          target_n_butterfly_factor=3))
    merged = model.merge_and_unload()
    report["merge_and_unload_gap"] = gap(logits(merged, batch), logits(ref_b, batch))
    del engine
    report.update(best_model_gaps(method))
    return report


def best_model_gaps(method: str) -> dict:
    """``AdapterTrainer(load_best_model_at_end=True)`` under ZeRO-3, the best checkpoint being the first one.

    ``greater_is_better`` on the eval loss makes the earliest checkpoint the best, so loading it must change
    the trained adapter back: the gap to that checkpoint's adapter file is 0, the gap to the last one is not.
    """
    from transformers import TrainingArguments

    from fourierft import AdapterTrainer

    data = [{"input_ids": x, "labels": x} for x in train_ddp.synthetic_sequences(32, seed=1)]
    model = get_peft_model(train_ddp.build_base_model(None, 0), train_ddp.adapter_config(method))
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = [tmp]
        dist.broadcast_object_list(tmp)  # one folder for both ranks
        args = TrainingArguments(output_dir=tmp[0], per_device_train_batch_size=2, max_steps=4, learning_rate=0.5,
                                 optim="sgd", lr_scheduler_type="constant", eval_strategy="steps", eval_steps=2,
                                 save_strategy="steps", save_steps=2, load_best_model_at_end=True,
                                 metric_for_best_model="eval_loss", greater_is_better=True, use_cpu=True,
                                 deepspeed=config, report_to=[], disable_tqdm=True)
        trainer = AdapterTrainer(model=model, args=args, adapter_lr=0.5, train_dataset=data, eval_dataset=data[:4])
        trainer.train()
        now = get_peft_model_state_dict(model)
        best, _ = load_weights_file(trainer.state.best_model_checkpoint)
        last, _ = load_weights_file(os.path.join(tmp[0], "checkpoint-4"))
        dist.barrier()
        return {"best_checkpoint": os.path.basename(trainer.state.best_model_checkpoint),
                "best_gap": max(gap(now[k], best[k]) for k in best), "last_gap": max(gap(now[k], last[k]) for k in last)}


if __name__ == "__main__":
    main()
