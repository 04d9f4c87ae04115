"""Serving many adapters from one base model: mixed-adapter batches, resident memory, loading speed.

For K = 1, 8, 64 adapters on a Llama-shaped model (built from a config, random weights) it times, in one
process and on the same batch:

* ``single``: the whole batch through one adapter (``set_adapter``);
* ``mixed``: the same batch with ``adapter_names`` cycling over K adapters (one forward);
* ``separate``: K forwards, one per adapter, each over that adapter's samples.

and reports ``mixed / single`` (the cost of mixing) and ``separate / mixed``, the memory each resident
adapter adds, and how long loading K adapters from disk takes. Prints a table and writes JSON.

Run: ``python benchmarks/bench_serving.py`` (``--quick`` for a smaller model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

import fourierft
from fourierft import BOFTConfig, FourierFTConfig, PeftModel
from fourierft.methods import fourierft as fourierft_method

from bench_models import median_time  # same folder: one timing rule for every benchmark


def build_base(hidden: int, layers: int, vocab: int = 2048):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      max_position_embeddings=512)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def make_config(method: str, i: int):
    if method == "fourierft":
        return FourierFTConfig(task_type="CAUSAL_LM", n_frequency=1000, scaling=150.0, init_weights=False)
    return BOFTConfig(task_type="CAUSAL_LM", boft_block_size=8, boft_n_butterfly_factor=2, init_weights=False)


def adapter_bytes(model, name: str) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.endswith("." + name))


def bench_method(method: str, args) -> list[dict]:
    model = fourierft.get_peft_model(build_base(args.hidden, args.layers), make_config(method, 0), adapter_name="a0")
    ks = [k for k in (1, 8, 64) if k <= args.max_k]
    for i in range(1, max(ks)):
        torch.manual_seed(i)
        model.add_adapter(f"a{i}", make_config(method, i))
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2048, (args.batch, args.tokens), generator=g)
    rows = []
    with torch.inference_mode():
        model.set_adapter("a0")
        single = median_time(lambda: model(input_ids=ids), args.repeats)
        for k in ks:
            names = [f"a{i % k}" for i in range(args.batch)]
            mixed = median_time(lambda: model(input_ids=ids, adapter_names=names), args.repeats)

            def separate():
                for j in range(k):
                    model.set_adapter(f"a{j}")
                    model(input_ids=ids[j::k])

            sep = median_time(separate, args.repeats)
            rows.append({"method": method, "K": k, "single_ms": 1e3 * single, "mixed_ms": 1e3 * mixed,
                         "separate_ms": 1e3 * sep, "mixed_over_single": mixed / single,
                         "separate_over_mixed": sep / mixed})
    per_adapter = adapter_bytes(model, "a1" if max(ks) > 1 else "a0")
    plan_bytes = sum(sum(t.numel() * t.element_size() for t in p.tensors().values())
                     for p in fourierft_method._PLANS.values()) if method == "fourierft" else 0
    load = time_loading(model, method, min(max(ks), args.load_k))
    for row in rows:
        row.update(adapter_bytes=per_adapter, shared_plan_bytes=plan_bytes, **load)
    return rows


def time_loading(model, method: str, k: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, selected_adapters=[f"a{i}" for i in range(k)])
        base = model.get_base_model()
        fresh = build_base(base.config.hidden_size, base.config.num_hidden_layers)
        start = time.perf_counter()
        loaded = PeftModel.from_pretrained(fresh, tmp, adapter_name="a0", subfolder="a0")
        for i in range(1, k):
            loaded.load_adapter(tmp, adapter_name=f"a{i}", subfolder=f"a{i}")
        elapsed = time.perf_counter() - start
    return {"load_adapters": k, "load_ms_per_adapter": 1e3 * elapsed / max(k, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model and batch")
    parser.add_argument("--methods", default="fourierft,boft")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch threads; use 1 on a shared machine, where waiting threads distort timings")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "serving.json"))
    args = parser.parse_args()
    args.hidden, args.layers, args.batch, args.tokens = (256, 2, 64, 32) if args.quick else (768, 4, 64, 64)
    args.repeats, args.max_k, args.load_k = (3, 64, 16) if args.quick else (5, 64, 64)
    torch.set_num_threads(args.threads)
    rows = []
    for method in args.methods.split(","):
        rows += bench_method(method, args)
    print(f"Llama-shaped model: hidden {args.hidden}, {args.layers} layers; batch {args.batch} x {args.tokens} "
          f"tokens; torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = f"{'method':10} {'K':>3} {'single ms':>10} {'mixed ms':>9} {'separate ms':>12} {'mixed/single':>13} " \
             f"{'separate/mixed':>15} {'KiB/adapter':>12} {'load ms/adapter':>16}"
    print(header)
    for r in rows:
        print(f"{r['method']:10} {r['K']:>3} {r['single_ms']:>10.1f} {r['mixed_ms']:>9.1f} {r['separate_ms']:>12.1f} "
              f"{r['mixed_over_single']:>13.2f} {r['separate_over_mixed']:>15.2f} {r['adapter_bytes'] / 1024:>12.1f} "
              f"{r['load_ms_per_adapter']:>16.1f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"config": vars(args), "torch": torch.__version__, "rows": rows}, fh, indent=2)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
