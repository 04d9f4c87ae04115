"""Check both adapter ops on one device: every route against the dense definition, no host synchronisation in
a training step, and timings against PEFT's FourierFT, BOFT, OFT and LoRA.

1. **Routes.** FourierFT's op (:func:`fourierft.ops.spectral_op.fourierft_linear`: ``spectral``, ``merged``,
   ``dense``) against ``x @ (W + a Re(ifft2(S)))^T`` and BOFT's op
   (:func:`fourierft.ops.butterfly_op.butterfly_rotate`: ``fused``, ``factors``, ``dense``) against ``x M`` with
   ``M`` built from Cayley by ``linalg.solve`` and explicit permutation matrices, both references in float64 on
   the CPU. Outputs in float32, bfloat16 and float16, input and parameter gradients in float32. A route that does
   not apply (``merged`` on a half-precision weight, by design) is reported as such.
2. **No host synchronisation.** A training step (forward and backward) and an eval forward of a small model with
   both methods, dropout on, inside and outside ``cached_merged_weights``: on CUDA under
   ``torch.cuda.set_sync_debug_mode("error")``, on every device with a ``TorchDispatchMode`` that counts reads
   of tensor values from library code (``item``, ``equal``, ``is_nonzero``, ``_local_scalar_dense``).
3. **Timings.** One ``Linear(d, d)`` layer, ``T`` tokens, a training step each: frozen, ours and PEFT's
   FourierFT (n=1000), ours and PEFT's BOFT (block 4), PEFT's OFT (block 32, Cayley-Neumann), PEFT's LoRA r=8.

Run::

    python benchmarks/device_check.py --device cpu      # about 2 minutes on 2 idle cores
    python benchmarks/device_check.py --device cuda     # on a GPU machine

Prints a report and writes ``benchmarks/results/device_check_<device>.json``; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fourierft
from fourierft.ops import butterfly as bf
from fourierft.ops.butterfly_routes import ROUTES as BOFT_ROUTES
from fourierft.ops.butterfly_routes import _force_route as force_boft_route
from fourierft.ops.spectral import frequency_indices, make_spectral_plan
from fourierft.ops.spectral_op import fourierft_linear
from fourierft.ops.spectral_routes import ROUTES as FOURIERFT_ROUTES
from fourierft.ops.spectral_routes import _force_route as force_fourierft_route

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": (torch.float32, 2e-4), "bfloat16": (torch.bfloat16, 3e-2), "float16": (torch.float16, 5e-3)}


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> tuple[bool, float]:
    """Max error relative to the reference's largest entry."""
    err = (got.detach().double().cpu() - want.detach().double()).abs().max().item()
    scale = max(want.abs().max().item(), 1e-12)
    return err <= tol * scale, err / scale


# ----------------------------------------------------------------------------------------------- FourierFT
def fourierft_routes(device: torch.device) -> list[dict]:
    d_out, d_in, n, a, tokens = 96, 80, 300, 20.0, 37
    gen = torch.Generator().manual_seed(0)
    idx = frequency_indices(d_out, d_in, n, 0)
    w = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) / d_in ** 0.5
    bias = torch.randn(d_out, generator=gen, dtype=torch.float64)
    spectrum = torch.randn(n, generator=gen, dtype=torch.float64)
    x = torch.randn(tokens, d_in, generator=gen, dtype=torch.float64)
    dense = torch.zeros(d_out, d_in, dtype=torch.complex128).index_put((idx[0], idx[1]), spectrum.to(torch.complex128))
    dw = torch.fft.ifft2(dense).real * a
    ref_x, ref_s = x.clone().requires_grad_(), spectrum.clone().requires_grad_()
    dw_ref = torch.fft.ifft2(torch.zeros(d_out, d_in, dtype=torch.complex128).index_put(
        (idx[0], idx[1]), ref_s.to(torch.complex128))).real * a
    want = ref_x @ (w + dw_ref).T + bias
    g = torch.randn(tokens, d_out, generator=gen, dtype=torch.float64)
    want_gx, want_gs = torch.autograd.grad(want, (ref_x, ref_s), g)
    want_delta = x @ dw.T
    plan = make_spectral_plan(idx.to(device), d_out, d_in)
    rows = []
    for route in FOURIERFT_ROUTES:
        for name, (dtype, tol) in DTYPES.items():
            row = {"method": "fourierft", "route": route, "dtype": name}
            xs = x.to(device, dtype).requires_grad_(dtype == torch.float32)
            spec = spectrum.to(device, torch.float32).requires_grad_(dtype == torch.float32)
            fused = route != "dense"  # the dense route is the unfused one without gradients
            kwargs = dict(weight=w.to(device, dtype), bias=bias.to(device, dtype)) if fused else {}
            try:
                with torch.set_grad_enabled(fused and dtype == torch.float32):
                    y = fourierft_linear(xs, [spec], [plan], [a], route=route, **kwargs)
            except ValueError as err:
                rows.append({**row, "ok": True, "applies": False, "note": str(err)})
                continue
            ok, rel = _close(y, want if fused else want_delta, tol)
            row.update(applies=True, ok=ok, rel_err=rel)
            if y.requires_grad:
                gx, gs = torch.autograd.grad(y, (xs, spec), g.to(device, dtype))
                ok_x, rel_x = _close(gx, want_gx, tol)
                ok_s, rel_s = _close(gs, want_gs, tol)
                row.update(ok=ok and ok_x and ok_s, grad_x_rel_err=rel_x, grad_spectrum_rel_err=rel_s)
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------- BOFT
def _perm(n: int, chunks: int, r: int) -> list[int]:
    c = n // chunks
    order = list(range(0, c // r, 2)) + list(range(1, c // r, 2))
    return [k * c + order[t] * r + j for k in range(chunks) for t in range(c // r) for j in range(r)]


def dense_boft_rotation(R: torch.Tensor) -> torch.Tensor:
    """``M = B_{m-1} ... B_0`` (DESIGN.md section 4) in R's dtype, from its definition."""
    m, num, size, _ = R.shape
    total = num * size
    S = 0.5 * (R - R.mT)
    eye = torch.eye(size, dtype=R.dtype)
    Q = torch.linalg.solve(eye + S, eye - S, left=False)
    M = torch.eye(total, dtype=R.dtype)
    for i in range(m):
        P = torch.zeros(total, total, dtype=R.dtype)
        P[torch.arange(total), torch.tensor(list(range(total)) if i == 0 else _perm(total, num // 2**i, size // 2))] = 1
        M = P @ torch.block_diag(*Q[i]) @ P.T @ M
    return M


def boft_routes(device: torch.device) -> list[dict]:
    rows = []
    for n, size, m, tokens in [(128, 8, 2, 37), (256, 4, 4, 21)]:
        gen = torch.Generator().manual_seed(n + m)
        R = 0.3 * torch.randn(m, n // size, size, size, generator=gen, dtype=torch.float64)
        x = torch.randn(tokens, n, generator=gen, dtype=torch.float64)
        g = torch.randn(tokens, n, generator=gen, dtype=torch.float64)
        ref_x, ref_r = x.clone().requires_grad_(), R.clone().requires_grad_()
        want = ref_x @ dense_boft_rotation(ref_r)
        want_gx, want_gr = torch.autograd.grad(want, (ref_x, ref_r), g)
        plan = bf.make_butterfly_plan(n // size, size, m, device)
        for route in BOFT_ROUTES:
            for name, (dtype, tol) in DTYPES.items():
                grad = dtype == torch.float32
                xs = x.to(device, dtype).requires_grad_(grad)
                r = R.to(device, torch.float32).requires_grad_(grad)
                with torch.set_grad_enabled(grad):
                    y = bf.butterfly_rotate(xs, r, plan, route=route)
                ok, rel = _close(y, want, tol)
                row = {"method": "boft", "route": route, "dtype": name, "geometry": f"n={n} b={size} m={m}",
                       "applies": True, "ok": ok, "rel_err": rel}
                if grad:
                    gx, gr = torch.autograd.grad(y, (xs, r), g.to(device, dtype))
                    ok_x, rel_x = _close(gx, want_gx, tol)
                    ok_r, rel_r = _close(gr, want_gr, tol)
                    row.update(ok=ok and ok_x and ok_r, grad_x_rel_err=rel_x, grad_R_rel_err=rel_r)
                rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ host reads
class HostReads(TorchDispatchMode):
    """Reads of tensor values back to the host, called from library code."""

    READS = {"aten._local_scalar_dense.default", "aten.equal.default", "aten.is_nonzero.default", "aten.item.default"}
    LIBRARY = os.path.dirname(fourierft.__file__)

    def __init__(self):
        super().__init__()
        self.from_library = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in self.READS:
            frames = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack() if f.filename.startswith(self.LIBRARY)]
            if frames:
                self.from_library.append((str(func), frames[-1]))
        return func(*args, **(kwargs or {}))


def _small_model(method: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 64))
    if method == "fourierft":
        config = fourierft.FourierFTConfig(target_modules=["0", "2"], n_frequency=500, init_weights=False)
    else:
        config = fourierft.BOFTConfig(target_modules=["0", "2"], boft_block_size=8, boft_n_butterfly_factor=2,
                                      boft_dropout=0.1, init_weights=False)
    return fourierft.get_peft_model(base, config).to(device)


def no_host_sync(device: torch.device) -> list[dict]:
    rows = []
    for method in ("fourierft", "boft"):
        routes, force_route = ((FOURIERFT_ROUTES, force_fourierft_route) if method == "fourierft"
                               else (BOFT_ROUTES, force_boft_route))
        model = _small_model(method, device)
        for route in (None, *routes):
            force = force_route(route) if route else contextlib.nullcontext()
            x = torch.randn(4, 32, 256, device=device)
            step = lambda: model(x).square().mean().backward()  # noqa: E731
            model.train()
            step()  # warm-up: lazy library initialisation (cuBLAS handles, allocator) is not the op's
            row = {"method": method, "route": route or "rule", "ok": True}
            try:
                sync = torch.cuda.set_sync_debug_mode if device.type == "cuda" else None
                with force, HostReads() as mode:
                    if sync:
                        sync("error")
                    try:
                        step()
                        with fourierft.cached_merged_weights():
                            step()
                            step()
                        model.eval()
                        with torch.no_grad():
                            model(x)
                    finally:
                        if sync:
                            sync("default")
                row.update(ok=not mode.from_library, host_reads=mode.from_library[:5])
            except RuntimeError as err:  # set_sync_debug_mode("error") raises on a synchronising call
                row.update(ok=False, error=str(err).splitlines()[0])
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------- timings
def _variants(d: int) -> dict:
    import peft

    fft = dict(target_modules=["0"], n_frequency=1000, scaling=150.0, init_weights=False)
    ours_fft = lambda m: fourierft.get_peft_model(m, fourierft.FourierFTConfig(**fft))  # noqa: E731
    return {
        "frozen": lambda m: m.requires_grad_(False),
        "ours_fourierft": ours_fft,
        "peft_fourierft": lambda m: peft.get_peft_model(m, peft.FourierFTConfig(**fft)),
        "ours_boft": lambda m: fourierft.get_peft_model(m, fourierft.BOFTConfig(target_modules=["0"],
                                                                               boft_block_size=4, init_weights=False)),
        "peft_boft": lambda m: peft.get_peft_model(m, peft.BOFTConfig(target_modules=["0"], boft_block_size=4,
                                                                      init_weights=False)),
        "peft_oft": lambda m: peft.get_peft_model(m, peft.OFTConfig(target_modules=["0"], r=0, oft_block_size=32,
                                                                    use_cayley_neumann=True, init_weights=False)),
        "peft_lora": lambda m: peft.get_peft_model(m, peft.LoraConfig(target_modules=["0"], r=8,
                                                                      init_lora_weights=False)),
    }


def timings(device: torch.device, d: int, tokens: int, reps: int) -> list[dict]:
    torch.manual_seed(0)
    base = nn.Linear(d, d)
    x = torch.randn(tokens, d, device=device, requires_grad=True)
    g = torch.randn(tokens, d, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    models = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT BOFT without its CUDA extension says so on every build
        for name, make in _variants(d).items():
            layer = nn.Linear(d, d)
            layer.load_state_dict(base.state_dict())
            models[name] = make(nn.Sequential(layer)).to(device)

    def step(model):
        model(x).backward(g)
        x.grad = None
        for p in model.parameters():
            p.grad = None

    times = {name: [] for name in models}
    for model in models.values():
        step(model)
    for _ in range(reps):  # interleaved: machine noise hits every variant alike
        for name, model in models.items():
            sync()
            t0 = time.perf_counter()
            step(model)
            sync()
            times[name].append(time.perf_counter() - t0)
    frozen = statistics.median(times["frozen"])
    routes = {}
    for name in ("ours_fourierft", "ours_boft"):
        routes[name] = [c.route for c in fourierft.explain_routes(models[name], x)]
    return [{"variant": name, "d": d, "T": tokens, "median_ms": round(statistics.median(ts) * 1e3, 3),
             "min_ms": round(min(ts) * 1e3, 3), "vs_frozen": round(statistics.median(ts) / frozen, 3),
             "routes": routes.get(name)} for name, ts in times.items()]


# ------------------------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dim", type=int, default=1024, help="layer width for the timings")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per step for the timings")
    parser.add_argument("--reps", type=int, default=0, help="timed steps per variant (default: cpu 5, else 30)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"device {device} requested but torch {torch.__version__} sees no CUDA device", file=sys.stderr)
        return 2
    started = time.perf_counter()
    report = {"routes": fourierft_routes(device) + boft_routes(device), "host_sync": no_host_sync(device)}
    report["timings"] = timings(device, args.dim, args.tokens, args.reps or (5 if device.type == "cpu" else 30))
    failed = [r for section in ("routes", "host_sync") for r in report[section] if not r["ok"]]
    print(f"Routes against the dense definition ({device}):")
    for r in report["routes"]:
        status = "ok" if r["ok"] else "FAIL"
        detail = (f"rel err {r['rel_err']:.1e}" + "".join(f", {k[:-8]} {v:.1e}" for k, v in r.items()
                                                           if k.startswith("grad_") and k.endswith("_rel_err"))
                  if r.get("applies") else f"does not apply ({r.get('note', '')[:60]})")
        print(f"  {status:4} {r['method']:9} {r['route']:8} {r['dtype']:8} {r.get('geometry', ''):16} {detail}")
    print("No host synchronisation in a training step" + (" (set_sync_debug_mode='error')" if device.type == "cuda"
                                                           else " (dispatch-mode counter)") + ":")
    for r in report["host_sync"]:
        extra = r.get("error") or (r["host_reads"] if r.get("host_reads") else "")
        print(f"  {'ok' if r['ok'] else 'FAIL':4} {r['method']:9} route {r['route']:8} {extra}")
    print(f"One Linear({args.dim}, {args.dim}) layer, T={args.tokens}, training step:")
    for r in report["timings"]:
        print(f"  {r['variant']:15} {r['median_ms']:9.2f} ms  x{r['vs_frozen']:.2f} frozen"
              f"{'  routes ' + ','.join(r['routes']) if r['routes'] else ''}")
    elapsed = time.perf_counter() - started
    print(f"{len(failed)} failed check(s); {elapsed:.0f} s")
    report["meta"] = {"device": str(device), "device_name": torch.cuda.get_device_name(device)
                      if device.type == "cuda" else platform.processor() or platform.machine(),
                      "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                      "loadavg": os.getloadavg(), "seconds": round(elapsed, 1), "argv": sys.argv[1:]}
    out = args.out or RESULTS / f"device_check_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
