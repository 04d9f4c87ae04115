"""Benchmark the BOFT rotation op against a frozen nn.Linear, PEFT's BOFT layer and PEFT's LoRA.

One training step is ``y = f(x); y.backward(g)`` with ``x`` requiring grad (as an activation would),
all in one process with the same shapes. Variants:

* ``frozen``: ``nn.Linear(d, d)`` with frozen weights (the floor).
* ``ours``: ``Q = cayley(R)``; ``y = scale_output(base(rotate(x, Q)), s, bias)``, i.e. PEFT's BOFT
  forward ``(base(x M) - bias) * s + bias``, Cayley and scale included, for block sizes 4 and 8 and
  ``m = 1..4`` butterfly factors. ``ours_plain`` (b=4, m=1 and b=8, m=4) writes the scale as PEFT's
  three elementwise ops instead of ``scale_output``.
* ``peft_boft``: ``peft.get_peft_model`` with ``BOFTConfig`` on a one-layer model; ``m = 1`` only,
  since PEFT forces ``m = 1`` without its CUDA extension.
* ``peft_lora``: LoRA ``r = 8`` on the same layer.

Timing: variants are interleaved round-robin, so machine noise hits all alike; we report the median
and the min wall time and both ratios to ``frozen`` (``xfrozen`` of medians, ``xfrz min`` of minima:
on a shared machine the minima are closest to the uncontended cost). On a machine where other
processes hold cores, prefer ``--threads 1``: with more threads than free cores every small parallel
op waits for a descheduled thread, which penalises many-kernel methods (BOFT, LoRA) far more than the
single GEMM of ``frozen``. The load average is recorded in the JSON.

Memory: ``saved`` is the bytes of distinct tensor storages that autograd saves for backward during one
forward (``torch.autograd.graph.saved_tensors_hooks``), excluding module parameters and buffers: the
activation memory a step keeps alive until backward.

Run: ``python benchmarks/bench_butterfly_op.py [--quick] [--threads 1]``; writes
``benchmarks/results/butterfly_op.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from fourierft.ops.butterfly import block_geometry, cayley, rotate, scale_output

logger = logging.getLogger("bench_butterfly_op")
RESULTS = Path(__file__).resolve().parent / "results" / "butterfly_op.json"


class OursBOFT(torch.nn.Module):
    """Minimal BOFT layer on top of the ops (bench-only; the library layer lives elsewhere)."""

    def __init__(self, base: torch.nn.Linear, block_size: int, m: int, plain_scale: bool = False):
        super().__init__()
        self.plain_scale = plain_scale
        size, num = block_geometry(base.in_features, block_size, 0, m)
        self.base = base
        self.boft_R = torch.nn.Parameter(0.1 * torch.randn(m, num, size, size))
        self.boft_s = torch.nn.Parameter(1 + 0.1 * torch.randn(base.out_features, 1))

    def forward(self, x):
        y = self.base(rotate(x, cayley(self.boft_R)))
        s, bias = self.boft_s.squeeze(-1), self.base.bias
        return (y - bias) * s + bias if self.plain_scale else scale_output(y, s, bias)


def peft_model(base: torch.nn.Linear, kind: str, block_size: int = 4):
    import peft

    model = torch.nn.Sequential(base)
    if kind == "boft":
        config = peft.BOFTConfig(target_modules=["0"], boft_block_size=block_size, init_weights=False)
    else:
        config = peft.LoraConfig(target_modules=["0"], r=8, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)


def saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct non-parameter storages saved for backward by one forward."""
    skip = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    del y
    return sum(seen.values())


def make_step(module, x, grad):
    def step():
        module(x).backward(grad)
        x.grad = None
        for p in module.parameters():
            p.grad = None

    return step


def time_interleaved(steps: dict, reps: int, slow: dict) -> dict:
    """Round-robin timing; variants in ``slow`` run only on their listed rounds."""
    times = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up
    for rep in range(reps):
        for name, step in steps.items():
            if name in slow and rep >= slow[name]:
                continue
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def bench_shape(d: int, tokens: int, reps: int, peft_reps: int) -> list[dict]:
    torch.manual_seed(0)
    base = torch.nn.Linear(d, d).requires_grad_(False)
    x = torch.randn(tokens, d, requires_grad=True)
    grad = torch.randn(tokens, d)
    modules = {("frozen", 0, 0): base}
    for size in (4, 8):
        for m in (1, 2, 3, 4):
            try:
                modules[("ours", size, m)] = OursBOFT(base, size, m)
            except ValueError:
                logger.info("skip b=%d m=%d for d=%d", size, m, d)
        modules[("peft_boft", size, 1)] = peft_model(base, "boft", size)
        plain_m = 1 if size == 4 else 4
        if ("ours", size, plain_m) in modules:
            modules[("ours_plain", size, plain_m)] = OursBOFT(base, size, plain_m, plain_scale=True)
    modules[("peft_lora", 0, 0)] = peft_model(base, "lora")
    steps = {key: make_step(mod, x, grad) for key, mod in modules.items()}
    slow = {key: peft_reps for key in steps if key[0] == "peft_boft"}
    times = time_interleaved(steps, reps, slow)
    frozen = statistics.median(times[("frozen", 0, 0)])
    frozen_min = min(times[("frozen", 0, 0)])
    rows = []
    for (method, size, m), ts in times.items():
        med = statistics.median(ts)
        peft_ref = times.get(("peft_boft", size, 1)) if method.startswith("ours") else None
        rows.append(
            {
                "d": d,
                "T": tokens,
                "method": method,
                "block_size": size or None,
                "m": m or None,
                "median_ms": round(med * 1e3, 2),
                "min_ms": round(min(ts) * 1e3, 2),
                "reps": len(ts),
                "vs_frozen": round(med / frozen, 3),
                "vs_frozen_min": round(min(ts) / frozen_min, 3),
                "vs_peft_boft_m1": round(med / statistics.median(peft_ref), 4) if peft_ref else None,
                "saved_MiB": round(saved_bytes(modules[(method, size, m)], x) / 2**20, 2),
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'d':>5} {'T':>5} {'method':<10} {'b':>2} {'m':>2} {'median ms':>10} {'min ms':>9} "
            f"{'xfrozen':>8} {'xfrz min':>8} {'x peft':>8} {'saved MiB':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        vs_peft = f"{r['vs_peft_boft_m1']:.4f}" if r["vs_peft_boft_m1"] else "-"
        print(
            f"{r['d']:>5} {r['T']:>5} {r['method']:<10} {r['block_size'] or '-':>2} {r['m'] or '-':>2} "
            f"{r['median_ms']:>10.2f} {r['min_ms']:>9.2f} {r['vs_frozen']:>8.3f} {r['vs_frozen_min']:>8.3f} "
            f"{vs_peft:>8} {r['saved_MiB']:>10.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only d=4096,T=512 and d=768,T=128")
    parser.add_argument("--dims", type=int, nargs="+", default=[768, 1024, 4096])
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--peft-reps", type=int, default=3, help="timed reps for PEFT BOFT (slow at large d)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shapes = [(4096, 512), (768, 128)] if args.quick else [(d, t) for d in args.dims for t in args.tokens]
    load_before = os.getloadavg()
    rows = []
    for d, tokens in shapes:
        logger.info("d=%d T=%d ...", d, tokens)
        rows += bench_shape(d, tokens, args.reps, args.peft_reps)
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "argv": sys.argv[1:],
        "loadavg_before_after": [load_before, os.getloadavg()],  # > cpus means a shared, contended machine
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
