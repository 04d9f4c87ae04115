"""Sequence classification with every method on one code path (used by rotten_tomatoes.py and glue.py).

``run(cfg, data)`` builds the model for ``cfg.method``, trains it with ``transformers.Trainer`` (fourierft
methods with :class:`fourierft.AdapterTrainer`, which gives the adapter and the head their own learning
rates), evaluates it, saves what the method trains and returns one row of the comparison table.

Methods: ``fourierft`` and ``boft`` (this library), ``lora`` (peft, r=8), ``head`` (only the classifier
trains), ``full`` (every weight trains).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments, set_seed)

import fourierft

logger = logging.getLogger("classification")
HEAD_NAMES = ("classifier", "score")


@dataclass
class RunConfig:
    """One training run. Learning rates: ``adapter_lr`` for adapter tensors, ``head_lr`` for the head
    (and, for ``full``, every weight)."""

    method: str
    model: str
    num_labels: int = 2
    metric: str = "accuracy"  # accuracy | matthews | pearson
    epochs: float = 3.0
    batch_size: int = 32
    max_length: int = 64
    adapter_lr: float = 5e-2
    head_lr: float = 1e-3
    n_frequency: int = 1000
    scaling: float = 150.0
    init_weights: bool = False  # FourierFT: True starts the spectrum at zero (PEFT's default: random)
    target_modules: Optional[list[str]] = None
    boft_block_size: int = 4
    boft_n_butterfly_factor: int = 2
    warmup: float = 0.06
    sampling: str = "group_by_length"  # batches of similar lengths: about half the padding of random batches
    weight_decay: float = 0.0
    seed: int = 0
    out_dir: str = "runs"
    extra: dict = field(default_factory=dict)


class EncodedDataset(torch.utils.data.Dataset):
    """Tokenised texts (or text pairs) with labels, as dicts the Trainer's collator pads."""

    def __init__(self, tokenizer, texts: Sequence, labels: Sequence, max_length: int, pairs: Sequence = None):
        enc = tokenizer(list(texts), list(pairs) if pairs is not None else None, truncation=True,
                        max_length=max_length)
        self.rows = [{k: enc[k][i] for k in enc} | {"labels": labels[i]} for i in range(len(labels))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def metric_fn(kind: str):
    """``compute_metrics`` for Trainer: accuracy, Matthews correlation (CoLA) or Pearson r (STS-B)."""

    def compute(pred) -> dict:
        logits, labels = pred.predictions, pred.label_ids
        if kind == "pearson":
            return {"pearson": float(np.corrcoef(logits.reshape(-1), labels.reshape(-1))[0, 1])}
        guess = logits.argmax(-1)
        if kind == "matthews":
            tp, tn = float(((guess == 1) & (labels == 1)).sum()), float(((guess == 0) & (labels == 0)).sum())
            fp, fn = float(((guess == 1) & (labels == 0)).sum()), float(((guess == 0) & (labels == 1)).sum())
            denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) or 1.0
            return {"matthews": (tp * tn - fp * fn) / denom}
        return {"accuracy": float((guess == labels).mean())}

    return compute


def base_model(cfg: RunConfig):
    set_seed(cfg.seed)  # the classifier's initial weights
    return AutoModelForSequenceClassification.from_pretrained(cfg.model, num_labels=cfg.num_labels)


def build_model(cfg: RunConfig):
    """The model for ``cfg.method``, with exactly the tensors that method trains left trainable."""
    model = base_model(cfg)
    if cfg.method == "fourierft":
        config = fourierft.FourierFTConfig(task_type="SEQ_CLS", n_frequency=cfg.n_frequency, scaling=cfg.scaling,
                                           target_modules=cfg.target_modules, init_weights=cfg.init_weights)
        return fourierft.get_peft_model(model, config)
    if cfg.method == "boft":
        config = fourierft.BOFTConfig(task_type="SEQ_CLS", boft_block_size=cfg.boft_block_size,
                                      boft_n_butterfly_factor=cfg.boft_n_butterfly_factor,
                                      target_modules=cfg.target_modules)
        return fourierft.get_peft_model(model, config)
    if cfg.method == "lora":
        import peft

        config = peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1,
                                 target_modules=cfg.target_modules)
        return peft.get_peft_model(model, config)
    if cfg.method == "head":
        model.requires_grad_(False)
        for name in HEAD_NAMES:
            if hasattr(model, name):
                getattr(model, name).requires_grad_(True)
        return model
    if cfg.method == "full":
        return model
    raise ValueError(f"unknown method {cfg.method!r}")


def training_args(cfg: RunConfig, out: str, learning_rate: float) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out, num_train_epochs=cfg.epochs, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=128, learning_rate=learning_rate, weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup, lr_scheduler_type="linear", eval_strategy="no", save_strategy="no",
        train_sampling_strategy=cfg.sampling,
        logging_steps=50, report_to="none", seed=cfg.seed, dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=False,  # Trainer hides its progress bars when transformers' logging is quieter than WARNING
        **cfg.extra,
    )


def make_trainer(cfg: RunConfig, model, tokenizer, train_ds, out: str) -> Trainer:
    collator = DataCollatorWithPadding(tokenizer)
    common = dict(model=model, train_dataset=train_ds, data_collator=collator,
                  compute_metrics=metric_fn(cfg.metric), processing_class=tokenizer)
    if cfg.method in ("fourierft", "boft"):
        return fourierft.AdapterTrainer(args=training_args(cfg, out, cfg.head_lr), adapter_lr=cfg.adapter_lr,
                                        **common)
    lr = cfg.adapter_lr if cfg.method == "lora" else cfg.head_lr
    return Trainer(args=training_args(cfg, out, lr), **common)


def save_trained(cfg: RunConfig, model, out: str) -> str:
    """Save what the method trains; return the weights file."""
    shutil.rmtree(out, ignore_errors=True)
    if cfg.method in ("fourierft", "boft", "lora"):
        model.save_pretrained(out)
        return os.path.join(out, "adapter_model.safetensors")
    if cfg.method == "head":
        from safetensors.torch import save_file

        os.makedirs(out, exist_ok=True)
        tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, os.path.join(out, "head.safetensors"))
        return os.path.join(out, "head.safetensors")
    model.save_pretrained(out)
    return os.path.join(out, "model.safetensors")


def count_parameters(model) -> tuple[int, int]:
    """(trainable, of which outside the head) parameter counts."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = sum(p.numel() for n, p in trainable if any(f"{h}." in n or n.startswith(h) for h in HEAD_NAMES))
    total = sum(p.numel() for _, p in trainable)
    return total, total - head


def run(cfg: RunConfig, tokenizer, train_ds, test_ds) -> dict:
    """Train and evaluate one method; return a table row (and keep the trained model in ``row['model']``)."""
    out = os.path.join(cfg.out_dir, cfg.method)
    model = build_model(cfg)
    trainable, adapter = count_parameters(model)
    trainer = make_trainer(cfg, model, tokenizer, train_ds, os.path.join(out, "trainer"))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    score = trainer.evaluate(test_ds, metric_key_prefix="test")[f"test_{cfg.metric}"]
    weights = save_trained(cfg, model, os.path.join(out, "saved"))
    return {"method": cfg.method, "trainable": trainable, "adapter": adapter, "file_bytes": os.path.getsize(weights),
            "score": score, "seconds": seconds, "saved": os.path.dirname(weights), "model": model,
            "trainer": trainer}


def score_text(score: float, metric: str) -> str:
    return f"{100 * score:.2f}%" if metric == "accuracy" else f"{score:.4f}"


def format_table(rows: list[dict], metric: str, split: str = "test") -> str:
    """A Markdown table of the rows."""
    names = {"fourierft": "FourierFT (fourierft)", "boft": "BOFT (fourierft)", "lora": "LoRA r=8 (peft)",
             "head": "head only", "full": "full fine-tuning"}
    lines = [f"| method | trainable params | of which adapter | saved file | {split} {metric} | train time |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        size = r["file_bytes"] / 1024
        size_text = f"{size:,.0f} KiB" if size < 10240 else f"{size / 1024:,.1f} MiB"
        score = score_text(r["score"], metric)
        if len(r.get("scores", [])) > 1:  # several seeds: mean ± sample standard deviation
            scores = np.array(r["scores"])
            spread = scores.std(ddof=1)
            score += f" ± {100 * spread:.2f} ({len(scores)} seeds)" if metric == "accuracy" else f" ± {spread:.4f}"
        lines.append(f"| {names.get(r['method'], r['method'])} | {r['trainable']:,d} | {r['adapter']:,d} | "
                     f"{size_text} | {score} | {r['seconds']:.0f} s |")
    return "\n".join(lines)


@torch.no_grad()
def evaluate(model, tokenizer, dataset, metric: str = "accuracy", batch_size: int = 128) -> float:
    """Score ``model`` on ``dataset`` with a plain loop (independent of the Trainer that trained it)."""
    from tqdm.auto import tqdm

    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=DataCollatorWithPadding(tokenizer))
    logits, labels = [], []
    for batch in tqdm(loader, desc="Evaluating", leave=False):
        labels.append(batch.pop("labels"))
        logits.append(model(**batch).logits.float())
    pred = type("Pred", (), {"predictions": torch.cat(logits).numpy(), "label_ids": torch.cat(labels).numpy()})
    return metric_fn(metric)(pred)[metric]


def load_tokenizer(path: str):
    return AutoTokenizer.from_pretrained(path)
