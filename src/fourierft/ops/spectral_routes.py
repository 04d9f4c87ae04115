r"""Which route the FourierFT op takes, per device, and why.

Three routes compute the same ``x @ dW^T`` (:mod:`.spectral` for the maths):

* ``"spectral"``: on the activations. Per token, without gradients: ``rfft(x)``, one gather-scale-scatter
  map over ``2n`` values, ``irfft``; with gradients also ``rfft(dL/dy)``, the transposed map, ``irfft``,
  ``rfft(x)`` again and ``2n`` sampled products (5 FFTs and 3 maps). Never builds a ``d_out x d_in`` tensor.
* ``"merged"`` (the op also computes the frozen base product, and the base weight is float32/float64):
  ``W + dW`` built once (one real ``irfft2``), then the frozen layer's GEMMs on it; with gradients the
  spectrum gradient adds 2 FFTs and ``2n`` sampled products per token. A bf16/fp16 weight never takes it:
  ``dW`` would be rounded into a half-precision ``W + dW``.
* ``"dense"`` (only ``x @ dW^T`` is asked for, no gradients): ``dW`` built, then one extra GEMM.

The decision reads only what the op is given: device type, weight dtype, token count, widths, ``n``,
whether gradients are needed, whether the base product is fused in, and whether ``W + dW`` is amortised
(inside :func:`~fourierft.ops.spectral_op.cached_merged_weights` without gradients). With gradients it
never depends on a cache, so gradient checkpointing's recomputation takes the route of the first forward.

**CPU**: fitted to ``benchmarks/bench_spectral_op.py``'s forced-route runs on a 2-core AMD EPYC
machine (torch 2.13, MKL FFTs), one table per thread count and per implementation of the token
maps (the C kernels of :mod:`._native`, or torch's gathers when they are off).

**CUDA and every other device**: written from operation counts and bytes moved, not measured on a GPU: FFTs, gathers and elementwise work at memory bandwidth, extra GEMM work at
the fp32 rate, plus a launch cost per kernel. The constants describe one current data-centre GPU
(about 2 TB/s, 50 TFLOP/s, 6 us per launch). This rule never builds or loads C code.
"""

from __future__ import annotations

import contextvars
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from . import _native
from ._context import bound, forcing

logger = logging.getLogger(__name__)

ROUTES = ("spectral", "merged", "dense")

# CPU: ns per unit. Per token: "entry" per entry and map (gather, scale, scatter), "fft" per (d log2 d) point of
# one real FFT, "pair" per sampled product of the spectrum gradient. Per step: "ifft2" per
# (d_out d_in log2(d_out d_in)) point of building dW ("ifft2_big" beyond 2**22 values, where it falls out of
# cache), "mac" per multiply-add of a GEMM. Without the C kernels the products are torch gathers too.
_CPU = {
    (True, 1): dict(entry=4.5, fft=0.40, pair=0.9, ifft2=0.30, ifft2_big=0.60, mac=0.025),
    (True, 2): dict(entry=3.0, fft=0.25, pair=0.45, ifft2=0.20, ifft2_big=0.40, mac=0.014),
    (False, 1): dict(entry=7.0, fft=0.40, pair=5.0, ifft2=0.30, ifft2_big=0.60, mac=0.025),
    (False, 2): dict(entry=5.0, fft=0.25, pair=3.5, ifft2=0.20, ifft2_big=0.40, mac=0.014),
}
# Other devices: bytes per second, multiply-adds per second (fp32), seconds per kernel launch.
_GPU = dict(bandwidth=2.0e12, macs=2.5e13, launch=6e-6)

_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("fourierft_forced_route", default=None)
_RECORDS: contextvars.ContextVar[list | None] = contextvars.ContextVar("fourierft_route_records", default=None)


@dataclass(frozen=True)
class RouteChoice:
    """One decision: the route taken, the modelled cost (ns beyond the frozen layer) of each candidate, and
    what the rule was given."""

    route: str
    costs: dict
    device: str
    dtype: str
    tokens: int
    d_out: int
    d_in: int
    n: int
    grad: bool
    fused: bool
    amortised: bool
    forced: bool = False
    layer: str = field(default="", compare=False)

    def __str__(self) -> str:
        costs = ", ".join(f"{k} {v / 1e3:.1f} us" for k, v in sorted(self.costs.items(), key=lambda kv: kv[1]))
        how = "forced" if self.forced else "cheapest"
        where = f"{self.layer}: " if self.layer else ""
        return (f"{where}{self.route} ({how}) for {self.tokens} tokens x ({self.d_out}, {self.d_in}), n={self.n}, "
                f"{self.device} {self.dtype or '(base not fusable: hook, autocast or quantized)'}, "
                f"{'grad' if self.grad else 'no grad'}"
                f"{', W+dW amortised' if self.amortised else ''}: {costs}")


def _force_route(route: str):
    """Tests and benchmarks: inside the block the op takes ``route`` wherever it applies (not public API)."""
    return forcing(_FORCED, route, ROUTES, "route")


@contextmanager
def recording_routes(records: list):
    """Inside the block every FourierFT op appends its :class:`RouteChoice` to ``records``."""
    with bound(_RECORDS, records):
        yield records


def _fft_points(d: int) -> float:
    return d * math.log2(max(d, 2))


def _cpu_costs(tokens, d_out, d_in, n, grad, candidates, amortised, threads) -> dict[str, float]:
    native = _native.loaded() if torch.compiler.is_compiling() else _native.available()  # a trace never builds
    k = _CPU[(native, 1 if threads <= 1 else 2)]
    f_in, f_out, size = _fft_points(d_in), _fft_points(d_out), d_out * d_in
    build = 0.0 if amortised else k["ifft2" if size <= 1 << 22 else "ifft2_big"] * size * math.log2(max(size, 2))
    costs = {}
    if grad:
        costs["spectral"] = tokens * (3 * k["entry"] * n + k["fft"] * (3 * f_in + 2 * f_out))  # as fitted
    else:
        costs["spectral"] = tokens * (k["entry"] * n + k["fft"] * (f_in + f_out))
    if "merged" in candidates:
        costs["merged"] = build + (tokens * (k["fft"] * (f_in + f_out) + k["pair"] * 2 * n) if grad else 0.0)
    if "dense" in candidates:
        costs["dense"] = build + k["mac"] * tokens * size
    return costs


def _device_costs(tokens, d_out, d_in, n, grad, candidates, amortised) -> dict[str, float]:
    bw, macs, launch = _GPU["bandwidth"], _GPU["macs"], _GPU["launch"]
    half_in, half_out = 8 * (d_in // 2 + 1), 8 * (d_out // 2 + 1)  # bytes of one complex64 half spectrum
    fft_in, fft_out = 4 * d_in + half_in, 4 * d_out + half_out  # read one, write the other
    map_bytes = 8 * 2 * n  # gather and scatter-add 2n float32 values (rows stay in L2)
    size = d_out * d_in
    # zeros, scatter, irfft2 (about three passes over a complex half spectrum), add W / cast: ~5 launches
    build = 0.0 if amortised else 4 * size + 3 * (4 * size + 4 * size) + 12 * size
    costs = {}
    if grad:  # rfft x, map, irfft, add | rfft dL/dy, map, irfft, add, rfft x, products, reduce
        per_token = 3 * fft_in + 2 * fft_out + 3 * map_bytes + half_out + half_in + 8 * (d_out + d_in)
        costs["spectral"] = tokens * per_token / bw + 12 * launch
    else:
        costs["spectral"] = tokens * (fft_in + fft_out + map_bytes + half_out + 8 * d_out) / bw + 5 * launch
    build_s = build / bw + (0 if amortised else 5 * launch)
    if "merged" in candidates:
        costs["merged"] = build_s + ((tokens * (fft_in + fft_out + map_bytes) / bw + 4 * launch) if grad else 0.0)
    if "dense" in candidates:
        costs["dense"] = build_s + tokens * size / macs + launch
    return {k: v * 1e9 for k, v in costs.items()}


def route_costs(device_type: str, *, tokens: int, d_out: int, d_in: int, n: int, grad: bool, fused: bool,
                weight_dtype: torch.dtype | None, amortised: bool = False, per_sample: bool = False,
                threads: int | None = None) -> dict[str, float]:
    """Modelled nanoseconds beyond the frozen layer of every route that applies (module docstring).

    Args:
        device_type: ``"cpu"``, ``"cuda"``, ``"meta"``...: CPU uses the fitted model, others the counted one.
        tokens: token rows.
        d_out: output width of the layer.
        d_in: input width of the layer.
        n: entries, summed over the adapters.
        grad: whether gradients are needed.
        fused: whether the op also computes the frozen base product (``"merged"`` needs it).
        weight_dtype: the base weight's dtype when ``fused``.
        amortised: ``W + dW`` is reused across calls (inference inside ``cached_merged_weights``).
        per_sample: one adapter per sample (mixed batch): only ``"spectral"`` applies.
        threads: CPU threads (default ``torch.get_num_threads()``; a ``torch.compile`` trace assumes 2).
    """
    candidates = {"spectral"}
    if not per_sample and fused and weight_dtype in (torch.float32, torch.float64):
        candidates.add("merged")
    if not per_sample and not fused and not grad:
        candidates.add("dense")
    if device_type == "cpu":
        if threads is None:  # torch.get_num_threads() would break a traced graph
            threads = 2 if torch.compiler.is_compiling() else torch.get_num_threads()
        return _cpu_costs(tokens, d_out, d_in, n, grad, candidates, amortised, threads)
    return _device_costs(tokens, d_out, d_in, n, grad, candidates, amortised)


def choose_route(device: torch.device, *, tokens: int, d_out: int, d_in: int, n: int, grad: bool, fused: bool,
                 weight_dtype: torch.dtype | None, amortised: bool = False, per_sample: bool = False,
                 route: str | None = None) -> str:
    """The route the op takes: ``route`` or the forced one where it applies, else the cheapest modelled.

    Also records the decision (:func:`recording_routes`) and logs it at DEBUG level, except while
    ``torch.compile`` traces (the rule itself is plain Python on shapes, so a trace takes the same route).
    """
    if tokens == 0:
        return "spectral"
    compiling = torch.compiler.is_compiling()  # Dynamo cannot read context variables: a trace reads neither
    forced = route if route is not None or compiling else _FORCED.get()
    costs = route_costs(device.type, tokens=tokens, d_out=d_out, d_in=d_in, n=n, grad=grad, fused=fused,
                        weight_dtype=weight_dtype, amortised=amortised, per_sample=per_sample)
    if route is not None and route not in costs:
        raise ValueError(f"route {route!r} does not apply here: candidates are {sorted(costs)}")
    chosen = forced if forced in costs else min(costs, key=costs.get)
    records = None if compiling else _RECORDS.get()
    if records is not None or (not compiling and logger.isEnabledFor(logging.DEBUG)):
        choice = RouteChoice(chosen, costs, device.type, str(weight_dtype or "").replace("torch.", ""), tokens,
                             d_out, d_in, n, grad, fused, amortised, forced=forced in costs)
        if records is not None:
            records.append(choice)
        logger.debug("fourierft route: %s", choice)
    return chosen
