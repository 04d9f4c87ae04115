"""Benchmark BOFT's layer against a frozen nn.Linear, PEFT's BOFT, PEFT's OFT and PEFT's LoRA, one layer at a time.

One training step is ``y = layer(x); y.backward(g)`` with ``x`` requiring grad (as an activation would),
all in one process with the same shapes and the same frozen ``nn.Linear(d, d)``. Variants:

* ``frozen``: the frozen layer alone (the floor).
* ``ours``: this library's ``BOFTLinear`` (``fourierft.get_peft_model`` with ``BOFTConfig``), the layer's own
  forward: ``Q = cayley(R)``, the rotation op (:func:`fourierft.ops.butterfly.butterfly_rotate`, its path
  chosen by the per-device rule) and the output scale; block sizes 4 and 8, ``m = 1..4`` butterfly factors.
  ``--route`` forces one path (fused, factors, dense) for every ``ours`` row.
* ``peft_boft``: ``peft.get_peft_model`` with ``BOFTConfig``; ``m = 1`` only, since PEFT forces ``m = 1``
  without its CUDA extension.
* ``peft_oft``: PEFT's OFT at its defaults: ``oft_block_size=32``, Cayley-Neumann (5 terms).
* ``peft_lora``: LoRA ``r = 8``.

Columns: ``xfrozen`` is the median step time over the frozen layer's (``xfrz min``: the same for minima, closest
to the uncontended cost on a shared machine); ``x oft`` is ``xfrozen`` over PEFT OFT's; ``x lora excess`` is the
time beyond frozen over LoRA's time beyond frozen.

Timing: variants are interleaved round-robin, so machine noise hits all alike. Each thread count in
``--threads`` is a separate pass (default 1 and 2). The load average is recorded in the JSON: with more threads
than free cores every small parallel op waits for a descheduled thread, which penalises many-kernel methods
(BOFT, OFT, LoRA) far more than the single GEMM of ``frozen``, so run it on an otherwise idle machine.

Memory: ``saved`` is the bytes of distinct tensor storages that autograd saves for backward during one
forward (``torch.autograd.graph.saved_tensors_hooks``), excluding module parameters and buffers: the
activation memory a step keeps alive until backward.

Run (about 10 minutes on 2 idle cores)::

    python benchmarks/bench_butterfly_op.py                  # d = 512..4096, T = 512, 1 and 2 threads
    python benchmarks/bench_butterfly_op.py --quick          # d = 768 only, a smoke test

Writes ``benchmarks/results/butterfly_op.json``.
"""

from __future__ import annotations

import argparse
import contextlib
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

import fourierft
from fourierft.ops.butterfly_routes import _force_route

logger = logging.getLogger("bench_butterfly_op")
RESULTS = Path(__file__).resolve().parent / "results" / "butterfly_op.json"


def ours(base: torch.nn.Linear, block_size: int, m: int) -> torch.nn.Module:
    config = fourierft.BOFTConfig(target_modules=["0"], boft_block_size=block_size, boft_n_butterfly_factor=m,
                                  init_weights=False)
    return fourierft.get_peft_model(torch.nn.Sequential(base), config)


def peft_model(base: torch.nn.Linear, kind: str, block_size: int = 4):
    import peft

    model = torch.nn.Sequential(base)
    if kind == "boft":
        config = peft.BOFTConfig(target_modules=["0"], boft_block_size=block_size, init_weights=False)
    elif kind == "oft":
        config = peft.OFTConfig(target_modules=["0"], r=0, oft_block_size=32, use_cayley_neumann=True,
                                init_weights=False)
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


def bench_shape(d: int, tokens: int, reps: int, peft_reps: int, route: str | None) -> list[dict]:
    torch.manual_seed(0)
    base = torch.nn.Linear(d, d).requires_grad_(False)
    x = torch.randn(tokens, d, requires_grad=True)
    grad = torch.randn(tokens, d)
    modules = {("frozen", 0, 0): base}
    for size in (4, 8):
        for m in (1, 2, 3, 4):
            try:
                modules[("ours", size, m)] = ours(base, size, m)
            except ValueError:
                logger.info("skip b=%d m=%d for d=%d", size, m, d)
        modules[("peft_boft", size, 1)] = peft_model(base, "boft", size)
    modules[("peft_oft", 32, 0)] = peft_model(base, "oft")
    modules[("peft_lora", 0, 0)] = peft_model(base, "lora")
    steps = {key: make_step(mod, x, grad) for key, mod in modules.items()}
    slow = {key: peft_reps for key in steps if key[0] == "peft_boft"}
    with _force_route(route) if route else contextlib.nullcontext():
        times = time_interleaved(steps, reps, slow)
    frozen, frozen_min = statistics.median(times[("frozen", 0, 0)]), min(times[("frozen", 0, 0)])
    oft = statistics.median(times[("peft_oft", 32, 0)]) / frozen
    lora_excess = statistics.median(times[("peft_lora", 0, 0)]) - frozen
    rows = []
    for (method, size, m), ts in times.items():
        med = statistics.median(ts)
        peft_boft = times.get(("peft_boft", size, 1)) if method == "ours" else None
        rows.append({
            "d": d, "T": tokens, "threads": torch.get_num_threads(), "method": method, "block_size": size or None,
            "m": m or None, "route": route if method == "ours" else None, "median_ms": round(med * 1e3, 2),
            "min_ms": round(min(ts) * 1e3, 2), "reps": len(ts), "vs_frozen": round(med / frozen, 3),
            "vs_frozen_min": round(min(ts) / frozen_min, 3), "vs_peft_oft": round(med / frozen / oft, 3),
            "vs_lora_excess": round((med - frozen) / lora_excess, 3) if lora_excess > 0 else None,
            "vs_peft_boft_m1": round(med / statistics.median(peft_boft), 4) if peft_boft else None,
            "saved_MiB": round(saved_bytes(modules[(method, size, m)], x) / 2**20, 2),
        })
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'thr':>3} {'d':>5} {'T':>5} {'method':<10} {'b':>2} {'m':>2} {'median ms':>10} {'min ms':>9} "
            f"{'xfrozen':>8} {'xfrz min':>8} {'x oft':>6} {'x lora excess':>13} {'saved MiB':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        lora = f"{r['vs_lora_excess']:.2f}" if r["vs_lora_excess"] is not None else "-"
        print(f"{r['threads']:>3} {r['d']:>5} {r['T']:>5} {r['method']:<10} {r['block_size'] or '-':>2} "
              f"{r['m'] or '-':>2} {r['median_ms']:>10.2f} {r['min_ms']:>9.2f} {r['vs_frozen']:>8.3f} "
              f"{r['vs_frozen_min']:>8.3f} {r['vs_peft_oft']:>6.3f} {lora:>13} {r['saved_MiB']:>10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only d=768, T=512, few repetitions")
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 768, 1024, 2048, 4096])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--peft-reps", type=int, default=3, help="timed reps for PEFT BOFT (slow at large d)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts, one pass each")
    parser.add_argument("--route", choices=["fused", "factors", "dense"], help="force one path for every ours row")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shapes = [(768, 512)] if args.quick else [(d, t) for d in args.dims for t in args.tokens]
    reps = 4 if args.quick else args.reps
    load_before = os.getloadavg()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for d, tokens in shapes:
            logger.info("threads=%d d=%d T=%d ...", threads, d, tokens)
            rows += bench_shape(d, tokens, reps, min(args.peft_reps, reps), args.route)
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "argv": sys.argv[1:],
        "loadavg_before_after": [load_before, os.getloadavg()],  # > cpus means a shared, contended machine
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
