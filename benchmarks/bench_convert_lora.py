"""Time FourierFT -> LoRA and BOFT -> LoRA conversion against peft's ``convert_to_lora``, and measure what it keeps.

The adapter is Llama-2-7B-shaped: 32 blocks x ``q_proj``/``v_proj``, each ``Linear(4096, 4096)`` (bf16 base
weights, as the model ships), with FourierFT ``n_frequency=1000`` (PEFT's random start: the spectrum is drawn,
not zero) or BOFT ``boft_block_size=32`` (``init_weights=False``: R ~ N(0, 0.1), s ~ N(1, 0.1)).

* ``ours``: ``fourierft.convert_to_lora(model, 32)`` on all 64 layers (randomised SVD on FFT products for
  FourierFT; on ``dW`` built by one butterfly pass for BOFT).
* ``peft``: ``peft.convert_to_lora`` (a full SVD of every dense ``dW``) on the same adapter saved to disk and
  loaded into peft, for the first ``--peft-blocks`` blocks only; its time is scaled to 64 layers. ``ours`` is
  also timed on that subset, so the per-layer ratio compares like with like, and
  ``max_error_ratio_ours_vs_peft`` is the largest ``||dW - B A||_F`` of ours over peft's on those layers
  (peft's factors are the exact SVD's; with a flat spectrum the two rank-32 subspaces differ while their
  errors agree, so the products themselves are not compared).
* ``quality``: for the first ``q_proj`` of each method, the energy kept and the relative error
  ``||dW - B A||_F / ||dW||_F`` at ranks 8, 32 and 128, ours (randomised) against the exact SVD's
  (``torch.linalg.svdvals`` of the dense ``dW``).

Run: ``python benchmarks/bench_convert_lora.py`` (about 5-10 minutes on 2 cores, 3 GB of memory; peft's
exact SVDs of 4096 x 4096 dominate) or ``--quick`` (width 1024, 4 blocks, one peft block: a smoke test).
Writes ``benchmarks/results/convert_lora.json`` (``convert_lora_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import fourierft
from fourierft.lora_conversion import delta_operator, factorize

RESULTS = Path(__file__).resolve().parent / "results"
RANKS = (8, 32, 128)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=False, device="meta")
        self.v_proj = nn.Linear(d, d, bias=False, device="meta")


class Stack(nn.Module):
    """``layers.{i}.q_proj`` / ``layers.{i}.v_proj``, the names Llama uses."""

    def __init__(self, d: int, blocks: int, dtype: torch.dtype, seed: int = 0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(blocks))
        self.to_empty(device="cpu")
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        self.to(dtype)


def adapter_config(method: str):
    targets = ["q_proj", "v_proj"]
    if method == "fourierft":
        return fourierft.FourierFTConfig(target_modules=targets, n_frequency=1000, scaling=300.0)
    return fourierft.BOFTConfig(target_modules=targets, boft_block_size=32, init_weights=False)


def build(method: str, d: int, blocks: int, dtype: torch.dtype):
    torch.manual_seed(0)
    return fourierft.get_peft_model(Stack(d, blocks, dtype), adapter_config(method))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def time_peft(method: str, d: int, blocks: int, dtype: torch.dtype) -> dict:
    """Ours and peft's conversion of the same ``blocks``-block adapter (peft loads our saved file)."""
    import peft

    model = build(method, d, blocks, dtype)
    (_, ours), ours_s = timed(lambda: fourierft.convert_to_lora(model, 32, min_energy=0))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        theirs_model = peft.PeftModel.from_pretrained(Stack(d, blocks, dtype), folder)
    (_, theirs), peft_s = timed(lambda: peft.convert_to_lora(theirs_model, 32))
    ratios = []
    for key in theirs:
        if key.endswith("lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            dense = delta_operator(model.get_submodule(name), "default").dense().float()
            errors = [float((dense - sd[f"{name}.lora_B.weight"].float() @ sd[f"{name}.lora_A.weight"].float()).norm())
                      for sd in (ours, theirs)]
            ratios.append(errors[0] / errors[1])
    layers = 2 * blocks
    return {"layers": layers, "ours_s": ours_s, "peft_s": peft_s, "ours_per_layer_s": ours_s / layers,
            "peft_per_layer_s": peft_s / layers, "max_error_ratio_ours_vs_peft": max(ratios)}


def quality(model, name: str) -> list[dict]:
    """Energy kept and relative error at each rank: ours (randomised) and the exact SVD's."""
    layer = model.get_submodule(name)
    op = delta_operator(layer, "default")
    exact_s, exact_time = timed(lambda: torch.linalg.svdvals(op.dense().float()).double())
    total = float(exact_s.square().sum())
    rows = []
    method = "fourierft" if isinstance(layer, fourierft.FourierFTLayer) else "boft"
    for rank in RANKS:
        (_, _, _, kept), seconds = timed(lambda: factorize(op, rank, "randomized", method))
        error = math.sqrt(max(0.0, 1 - kept))
        exact_kept = float(exact_s[:rank].square().sum()) / total
        rows.append({"rank": rank, "energy_kept": kept, "relative_error": error,
                     "exact_energy_kept": exact_kept, "exact_relative_error": math.sqrt(max(0.0, 1 - exact_kept)),
                     "error_ratio": error / math.sqrt(max(1e-30, 1 - exact_kept)), "seconds": seconds,
                     "exact_svdvals_seconds": exact_time})
        logging.info("%s rank %d: kept %.4f (exact %.4f), error %.4f (exact %.4f)", name, rank, kept,
                     exact_kept, error, rows[-1]["exact_relative_error"])
    return rows


def run_method(method: str, args, dtype: torch.dtype) -> dict:
    model = build(method, args.width, args.blocks, dtype)
    result, seconds = timed(lambda: fourierft.convert_to_lora(model, 32, min_energy=0))
    logging.info("%s: ours converted %d layers at rank 32 in %.1f s", method, len(result.report), seconds)
    out = {"ours_full_s": seconds, "layers": len(result.report),
           "mean_energy_kept_r32": sum(r.energy_kept for r in result.report) / len(result.report),
           "mean_relative_error_r32": sum(r.relative_error for r in result.report) / len(result.report),
           "quality": quality(model, "base_model.model.layers.0.q_proj")}
    del model, result
    subset = time_peft(method, args.width, args.peft_blocks, dtype)
    subset["peft_scaled_to_full_s"] = subset["peft_per_layer_s"] * out["layers"]
    logging.info("%s: peft %.1f s per layer (x%d layers = %.0f s); ours %.2f s per layer on the same subset",
                 method, subset["peft_per_layer_s"], out["layers"], subset["peft_scaled_to_full_s"],
                 subset["ours_per_layer_s"])
    out["peft_subset"] = subset
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="width 1024, 4 blocks, 1 peft block (a smoke test)")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--blocks", type=int, default=32)
    p.add_argument("--peft-blocks", type=int, default=1, help="blocks (2 layers each) peft converts")
    p.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="base weights")
    p.add_argument("--methods", nargs="+", default=["fourierft", "boft"])
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.blocks, args.peft_blocks = 1024, 4, 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("fourierft").setLevel(logging.WARNING)  # one line per layer and rank is too much here
    warnings.filterwarnings("ignore", module="peft")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    results = {"config": {**vars(args), "torch": torch.__version__, "platform": platform.platform(),
                          "load_before": os.getloadavg()}}
    for method in args.methods:
        results[method] = run_method(method, args, dtype)
    results["config"]["load_after"] = os.getloadavg()
    path = RESULTS / ("convert_lora_quick.json" if args.quick else "convert_lora.json")
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(json.dumps({m: {k: v for k, v in results[m].items() if k != "quality"} for m in args.methods}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
