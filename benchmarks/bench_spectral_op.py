"""Op-level benchmark: one training step (forward + backward, ``x.requires_grad``) of a layer.

Compared, on the same ``nn.Linear(d, d)`` (frozen) and the same input:

* ``frozen``    the frozen layer alone (the floor);
* ``ours``      fourierft's FourierFT layer (``get_peft_model`` on a one-layer model, n entries); with
  ``--accumulate`` its micro-batches run inside ``fourierft.cached_merged_weights()``, as ``AdapterTrainer``
  runs them; ``ours@spectral`` / ``ours@merged`` force a route;
* ``base``      the same layer from an earlier revision of this library (``--baseline REV``, imported from
  ``git archive`` as a package named ``fourierft_baseline``), to show a change against the code before it;
* ``peft_fft``  peft's FourierFT layer (``get_peft_model`` on a one-layer model, same n, scaling);
* ``peft_lora`` peft's LoRA r=8 on the same layer, for reference.

Methods run round-robin within each shape so background load hits them alike; the table reports
the median (and min) time per step, ratios, and two memory figures per step:

* ``saved``  bytes of the distinct tensors autograd saves for backward (``saved_tensors_hooks``),
  i.e. activation memory a training step keeps alive;
* ``peak``   peak of bytes allocated minus freed during the step, from ``torch.profiler``'s
  memory events (transient working memory on top of what existed before the step).

``--compile`` wraps every model in ``torch.compile`` (inductor; compile time is not timed).

Usage: ``python benchmarks/bench_spectral_op.py [--quick] [--threads 2]``; writes
``benchmarks/results/spectral_op.json``. On a shared machine, background load makes OpenMP's
spin-waiting dominate many-kernel workloads; the JSON records the load average, and
``OMP_WAIT_POLICY=PASSIVE`` (set in the environment) makes the timings far less noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results" / "spectral_op.json"


class ForcedRoute(nn.Module):
    """Our layer with a route forced around its forward (``ours@merged``); not public API."""

    def __init__(self, inner: nn.Module, route: str) -> None:
        super().__init__()
        self.inner, self.route = inner, route

    def forward(self, x):
        from fourierft.ops.spectral_routes import _force_route

        with _force_route(self.route):
            return self.inner(x)


def import_baseline(rev: str) -> str:
    """Extract ``src/fourierft`` at git revision ``rev`` as package ``fourierft_baseline``; its module name."""
    root = Path(__file__).resolve().parent.parent
    target = Path(tempfile.mkdtemp(prefix="fourierft-baseline-"))
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "src/fourierft"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    (target / "src" / "fourierft").rename(target / "fourierft_baseline")
    sys.path.insert(0, str(target))
    importlib.import_module("fourierft_baseline")
    return "fourierft_baseline"


def build(method: str, base: nn.Linear, n: int, scaling: float) -> nn.Module:
    """The layer as users get it: ``get_peft_model`` on a one-layer model, from fourierft or peft.

    ``ours@spectral`` and ``ours@merged`` force one of our routes instead of the rule's pick."""
    base = copy.deepcopy(base).requires_grad_(False)
    if method == "frozen":
        return base
    model = nn.Sequential()
    model.add_module("lin", base)
    if method.startswith("ours") or method == "base":
        lib = importlib.import_module("fourierft" if method != "base" else "fourierft_baseline")
        config = lib.FourierFTConfig(n_frequency=n, scaling=scaling, target_modules=["lin"])
        ours = lib.get_peft_model(model, config)
        return ForcedRoute(ours, method.split("@", 1)[1]) if "@" in method else ours
    from peft import FourierFTConfig, LoraConfig, get_peft_model

    config = (FourierFTConfig(n_frequency=n, scaling=scaling, target_modules=["lin"])
              if method == "peft_fft" else LoraConfig(r=8, lora_alpha=16, target_modules=["lin"]))
    return get_peft_model(model, config)


ACCUMULATE = 1  # micro-batches per optimizer update (--accumulate)
COMPILE = False  # --compile


def step(model: nn.Module, x: torch.Tensor) -> None:
    """``ACCUMULATE`` forward+backward passes, then what an optimizer step does to the trained tensors
    (an in-place write, which bumps their version counters: a kept ``W + dW`` must be rebuilt)."""
    scope = contextlib.nullcontext()
    if getattr(model, "_ours", False) and ACCUMULATE > 1:  # what AdapterTrainer does per optimizer step
        import fourierft

        scope = fourierft.cached_merged_weights()
    with scope:
        for _ in range(ACCUMULATE):
            model(x).square().mean().backward()
    x.grad = None
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.0)
            p.grad = None


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    seen: dict[tuple[int, int], int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(model, x)
    return sum(seen.values())


def peak_bytes(model: nn.Module, x: torch.Tensor) -> int | None:
    """Peak of live CPU bytes allocated during one step (torch.profiler's memory timeline)."""
    try:
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True, record_shapes=True,
                                    with_stack=True) as prof:
            step(model, x)
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
        return int(max(sum(s) for s in sizes)) if sizes else 0
    except Exception as err:  # private API: report nothing rather than fail the benchmark
        print(f"peak memory unavailable: {err!r}")
        return None


def time_round_robin(models: dict[str, nn.Module], x: torch.Tensor, budget_s: float,
                     min_reps: int, clock=time.perf_counter) -> dict[str, list[float]]:
    for m in models.values():
        step(m, x)
    times: dict[str, list[float]] = {k: [] for k in models}
    start = time.perf_counter()
    while min(len(v) for v in times.values()) < min_reps or time.perf_counter() - start < budget_s:
        for name, m in models.items():
            t0 = clock()
            step(m, x)
            times[name].append((clock() - t0) * 1e3)
        if time.perf_counter() - start > 4 * budget_s and min(len(v) for v in times.values()) >= 3:
            break
    return times


def run_shape(d: int, tokens: int, n: int, scaling: float, methods: list[str], budget_s: float,
              min_reps: int, clock=time.perf_counter) -> list[dict]:
    torch.manual_seed(0)
    base = nn.Linear(d, d)
    models = {m: build(m, base, n, scaling) for m in methods}
    for name, m in models.items():
        if COMPILE and name != "frozen":
            m = models[name] = torch.compile(m)
        m._ours = name.startswith("ours")
    x = torch.randn(tokens, d, requires_grad=True)
    times = time_round_robin(models, x, budget_s, min_reps, clock)
    rows = []
    for name, model in models.items():
        rows.append(dict(d=d, tokens=tokens, n=n, method=name, reps=len(times[name]),
                         median_ms=statistics.median(times[name]), min_ms=min(times[name]),
                         saved_mb=saved_bytes(model, x) / 2**20, peak_mb=_mb(peak_bytes(model, x))))
    ref = {r["method"]: r["median_ms"] for r in rows}
    for r in rows:
        r["vs_frozen"] = r["median_ms"] / ref["frozen"]
        r["peft_fft_over_this"] = ref["peft_fft"] / r["median_ms"] if "peft_fft" in ref else None
        r["base_over_this"] = ref["base"] / r["median_ms"] if "base" in ref else None
        lora_over = ref.get("peft_lora", float("nan")) - ref["frozen"]
        r["overhead_vs_lora"] = (r["median_ms"] - ref["frozen"]) / lora_over if lora_over > 0 else None
        r["accumulate"] = ACCUMULATE
        r["threads"] = torch.get_num_threads()
    return rows


def _mb(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20


def print_table(rows: list[dict]) -> None:
    head = (f"{'d':>5} {'T':>5} {'method':>10} {'median ms':>10} {'min ms':>9} {'x frozen':>9} "
            f"{'peft/this':>9} {'base/this':>9} {'ovh/LoRA':>9} {'saved MB':>9} {'peak MB':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        speed = f"{r['peft_fft_over_this']:9.2f}" if r["peft_fft_over_this"] else f"{'-':>9}"
        ovh = f"{r['overhead_vs_lora']:9.2f}" if r.get("overhead_vs_lora") is not None else f"{'-':>9}"
        old = f"{r['base_over_this']:9.2f}" if r.get("base_over_this") else f"{'-':>9}"
        print(f"{r['d']:5d} {r['tokens']:5d} {r['method']:>10} {r['median_ms']:10.2f} "
              f"{r['min_ms']:9.2f} {r['vs_frozen']:9.2f} {speed} {old} {ovh} {r['saved_mb']:9.1f} "
              f"{r['peak_mb'] if r['peak_mb'] is not None else float('nan'):9.1f}", flush=True)


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only (768, 1024) and (4096, 512)")
    parser.add_argument("--shapes", default=None, help="d:T pairs, e.g. 768:512,1024:2048 (instead of the grid)")
    parser.add_argument("--accumulate", type=int, default=1,
                        help="micro-batches per optimizer update (times are per update)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--n", type=int, default=1000, help="FourierFT entries (default 1000)")
    parser.add_argument("--scaling", type=float, default=150.0)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timing per shape")
    parser.add_argument("--min-reps", type=int, default=5)
    parser.add_argument("--methods", default="frozen,ours,peft_fft,peft_lora")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: process CPU time, robust to a shared machine with --threads 1")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--baseline", default=None, help="git revision whose layer runs as method 'base'")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (not 'frozen')")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global ACCUMULATE, COMPILE
    ACCUMULATE, COMPILE = args.accumulate, args.compile
    if args.baseline:
        import_baseline(args.baseline)
    shapes = ([(768, 1024), (4096, 512)] if args.quick else
              [(d, t) for d in (384, 576, 768, 1024, 2048, 4096) for t in (128, 512, 2048, 4096)])
    if args.shapes:
        shapes = [tuple(int(v) for v in pair.split(":")) for pair in args.shapes.split(",")]
    methods = args.methods.split(",")
    load_start = _loadavg()
    rows: list[dict] = []
    for d, tokens in shapes:
        clock = time.perf_counter if args.clock == "wall" else time.process_time
        shape_rows = run_shape(d, tokens, args.n, args.scaling, methods, args.budget,
                               args.min_reps, clock)
        print_table(shape_rows)
        rows += shape_rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu=_cpu_name(),
                machine=platform.machine(), what="forward+backward of one frozen nn.Linear step",
                accumulate=ACCUMULATE, compiled=COMPILE, baseline=args.baseline,
                clock=args.clock,
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"),
                loadavg_start=load_start, loadavg_end=_loadavg())
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
