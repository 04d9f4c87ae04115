"""The demo's test accuracy after converting its FourierFT adapter to LoRA at ranks 8, 32 and 128.

Loads the adapter ``examples/rotten_tomatoes.py`` saved (all-MiniLM-L6-v2, FourierFT on every linear layer of
the encoder, the classifier in ``modules_to_save``), scores it on the demo's test split, then for each rank
writes it as LoRA with :func:`fourierft.save_as_lora`, loads that folder with ``peft.PeftModel.from_pretrained``
into a fresh base model and scores the LoRA model the same way (the demo's own data and evaluation
functions, imported from ``examples/``).

Run::

    python examples/rotten_tomatoes.py                 # trains and saves runs/rotten_tomatoes/fourierft/saved/
    python benchmarks/convert_quality.py               # about 2 minutes on 2 cores (4 evaluations of 2,000 snippets)
    python benchmarks/convert_quality.py --quick       # 128 test snippets, rank 8 only: a smoke test

Writes ``benchmarks/results/convert_quality.json`` (``convert_quality_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
import rotten_tomatoes as demo  # noqa: E402
from classification import EncodedDataset, evaluate, load_tokenizer  # noqa: E402

import fourierft  # noqa: E402


def base_model(path: str):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(demo.LABELS))


def score_lora(adapter, path: str, rank, tokenizer, test_ds) -> dict:
    """Convert at ``rank``, load the LoRA folder with peft into a fresh base model, score it."""
    import peft

    with tempfile.TemporaryDirectory() as folder:
        report = fourierft.save_as_lora(folder, adapter, rank, min_energy=0)
        lora = peft.PeftModel.from_pretrained(base_model(path), folder)
        if not isinstance(lora.base_model, peft.LoraModel):
            raise SystemExit(f"peft did not load {folder} as LoRA")
        size = os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))
        accuracy = evaluate(lora, tokenizer, test_ds)
    kept = [row.energy_kept for row in report]
    errors = [row.relative_error for row in report]
    return {"rank": rank, "accuracy": accuracy, "layers": len(report), "file_bytes": size,
            "energy_kept_mean": sum(kept) / len(kept), "energy_kept_min": min(kept),
            "relative_error_mean": sum(errors) / len(errors), "relative_error_max": max(errors),
            "convert_seconds": sum(row.seconds for row in report)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", default="runs/rotten_tomatoes/fourierft/saved", help="the demo's saved adapter")
    p.add_argument("--ranks", nargs="+", type=int, default=[8, 32, 128])
    p.add_argument("--test-size", type=int, default=demo.TEST_SIZE)
    p.add_argument("--max-length", type=int, default=64, help="as the demo (its default)")
    p.add_argument("--quick", action="store_true", help="128 test snippets, rank 8 only")
    args = p.parse_args(argv)
    if args.quick:
        args.test_size, args.ranks = 128, [8]
    if not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        raise SystemExit(f"no adapter in {args.adapter}: run python examples/rotten_tomatoes.py first")
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the load report says the new classifier is untrained; the adapter has it
    warnings.filterwarnings("ignore", module="peft")
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    path = demo.model_path()
    _, test = demo.load_snippets()
    test = test[: args.test_size]
    tokenizer = load_tokenizer(path)
    test_ds = EncodedDataset(tokenizer, [t for t, _ in test], [l for _, l in test], args.max_length)
    start = time.perf_counter()
    adapter = fourierft.PeftModel.from_pretrained(base_model(path), args.adapter)
    original = evaluate(adapter, tokenizer, test_ds)
    print(f"FourierFT adapter {args.adapter}: test accuracy {100 * original:.2f}% on {len(test)} snippets")
    rows = []
    for rank in args.ranks:
        rows.append(score_lora(adapter, path, rank, tokenizer, test_ds))
        r = rows[-1]
        print(f"LoRA rank {rank:>3}: test accuracy {100 * r['accuracy']:.2f}%, energy kept {r['energy_kept_mean']:.1%} "
              f"(lowest layer {r['energy_kept_min']:.1%}), relative error {r['relative_error_mean']:.3f} mean")
    result = {"adapter": args.adapter, "test_size": len(test), "fourierft_accuracy": original, "lora": rows,
              "seconds": time.perf_counter() - start, "load": os.getloadavg(), "torch": torch.__version__}
    out = HERE / "results" / ("convert_quality_quick.json" if args.quick else "convert_quality.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
