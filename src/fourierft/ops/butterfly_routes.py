r"""Which path BOFT's rotation takes, per device, and why (:mod:`.butterfly_paths` for the paths).

For ``T`` token rows of width ``n`` (``N`` blocks of size ``b``, ``m`` factors, ``L = b 2**(m-1)`` the width of
``M``'s diagonal blocks, ``w`` the width narrow blocks are grouped up to):

* ``"fused"``: build the ``(n/L, L, L)`` blocks, then one bmm: ``T n L`` multiply-adds (three times that with
  gradients), two passes over ``T x n``. Offered when the geometry has such blocks (``L < n``).
* ``"factors"``: ``m`` bmms of ``T n w`` and up to ``m + 1`` gathers, on a transposed copy of ``z``.
* ``"dense"``: build ``M`` (``n x n``), then one GEMM of ``T n^2``.

The decision reads only what the op is given: device type, token count, ``n``, ``b``, ``m``, the plan's
widths and whether gradients are needed; it never depends on a cache, so gradient checkpointing's
recomputation takes the path of the first forward.

**CPU**: GEMM and copy rates of a 2-core AMD EPYC machine (torch 2.13, MKL), with small batched
matmuls at ``1 / (1 + 64 / w)`` of the GEMM rate per multiply-add; set so that the rule reproduces the
crossovers measured there with ``benchmarks/bench_butterfly_op.py`` (the fused blocks pay off up to
``L = 256``, factor by factor beyond; no copy for ``m = 1``), not fitted point by point: ``--route`` forces
each path to check it.

**CUDA and every other device**: written from operation counts and bytes moved, not measured: GEMM work at
the tensor-core rate, gathers, copies and block building at memory bandwidth, plus a launch cost per kernel
(about 2 TB/s, 50 TFLOP/s, 6 us per launch: one current data-centre GPU).
"""

from __future__ import annotations

import contextvars
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ._context import bound, forcing

logger = logging.getLogger(__name__)

__all__ = ["ROUTES", "RotationChoice", "choose_rotation", "recording_routes", "rotation_costs"]

ROUTES = ("fused", "factors", "dense")

# CPU, ns per unit by thread count: "mac" per multiply-add of a large GEMM, "elem" per element copied or gathered,
# "call" per kernel. A batched matmul of w-wide blocks runs at 1 / (1 + _NARROW / w) of the GEMM rate.
_CPU = {1: dict(mac=0.025, elem=0.6, call=3000.0), 2: dict(mac=0.014, elem=0.45, call=4000.0)}
_NARROW = 64
# Other devices: bytes per second, multiply-adds per second, seconds per kernel launch.
_GPU = dict(bandwidth=2.0e12, macs=2.5e13, launch=6e-6)

_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("boft_forced_route", default=None)
_RECORDS: contextvars.ContextVar[list | None] = contextvars.ContextVar("boft_route_records", default=None)


@dataclass(frozen=True)
class RotationChoice:
    """One decision: the path taken, the modelled cost (ns) of each candidate, and what the rule was given."""

    route: str
    costs: dict
    device: str
    dtype: str
    tokens: int
    n: int
    block_size: int
    m: int
    grad: bool
    forced: bool = False
    layer: str = field(default="", compare=False)

    def __str__(self) -> str:
        costs = ", ".join(f"{k} {v / 1e3:.1f} us" for k, v in sorted(self.costs.items(), key=lambda kv: kv[1]))
        how = "forced" if self.forced else "cheapest"
        where = f"{self.layer}: " if self.layer else ""
        return (f"{where}boft {self.route} ({how}) for {self.tokens} tokens x n={self.n}, b={self.block_size}, "
                f"m={self.m}, {self.device} {self.dtype}, {'grad' if self.grad else 'no grad'}: {costs}")


def _force_route(route: str):
    """Tests and benchmarks: inside the block the rotation takes ``route`` wherever it applies (not public API)."""
    return forcing(_FORCED, route, ROUTES, "BOFT route")


@contextmanager
def recording_routes(records: list):
    """Inside the block every BOFT rotation appends its :class:`RotationChoice` to ``records``."""
    with bound(_RECORDS, records):
        yield records


def _counts(tokens, n, m, width, group, grad) -> dict[str, tuple[float, float, float, int]]:
    """Per candidate: (GEMM-equivalent multiply-adds on CPU, multiply-adds, elements moved, kernels)."""
    passes, flops = (2, 3) if grad else (1, 1)
    gathers = 0 if m == 1 else m + 1
    slow = lambda w: 1 + _NARROW / w  # noqa: E731  narrow batched matmuls are slower per multiply-add
    factor_macs = flops * m * n * group
    # factors works on z^T: the transposes are views (the bmms read strided slabs, the base GEMM takes the
    # transposed result as it is), so only the gathers move T x n elements
    out = {"factors": (tokens * factor_macs * slow(group), tokens * factor_macs,
                       passes * (tokens * n * gathers + n * group), passes * (3 * m + 2))}
    if width:  # one bmm on a strided (K, T, L) view, then one copy back to (T, n)
        chain = width <= 64  # blocks from a chain of m - 1 bmms, wider ones by rotating the tiled identity
        build = (m - 1) * n * width * width if chain else m * n * width * group
        macs = flops * (tokens * n * width + build)
        moved = tokens * n + n * width * (1 if chain else gathers + 1)
        out["fused"] = (macs * slow(width), macs, passes * moved, passes * (m + 3 if chain else 3 * m + 4))
    dense = flops * tokens * n * n
    out["dense"] = (n * factor_macs * slow(group) + dense, n * factor_macs + dense,
                    passes * n * n * (2 + gathers), passes * (3 * m + 4))
    return out


def rotation_costs(device_type: str, *, tokens: int, n: int, block_size: int, m: int, width: int, group: int,
                   grad: bool, threads: int | None = None) -> dict[str, float]:
    """Modelled nanoseconds of every path that applies (module docstring).

    Args:
        device_type: ``"cpu"``, ``"cuda"``, ``"meta"``...: CPU uses the fitted constants, others the counted ones.
        tokens: token rows.
        n: features rotated.
        block_size: ``b``.
        m: butterfly factors.
        width: the plan's fused block width (0: no fused path).
        group: the width the factor path groups blocks to.
        grad: whether gradients are needed.
        threads: CPU threads (default ``torch.get_num_threads()``; a ``torch.compile`` trace assumes 2).
    """
    counts = _counts(tokens, n, m, width, group, grad)
    if device_type == "cpu":
        if threads is None:  # torch.get_num_threads() would break a traced graph
            threads = 2 if torch.compiler.is_compiling() else torch.get_num_threads()
        k = _CPU[1 if threads <= 1 else 2]
        return {r: cpu_macs * k["mac"] + elems * k["elem"] + calls * k["call"]
                for r, (cpu_macs, _, elems, calls) in counts.items()}
    bw, rate, launch = _GPU["bandwidth"], _GPU["macs"], _GPU["launch"]  # float32 bytes: read and write each element
    return {r: 1e9 * (macs / rate + 8 * elems / bw + calls * launch) for r, (_, macs, elems, calls) in counts.items()}


def choose_rotation(device: torch.device, *, tokens: int, n: int, block_size: int, m: int, width: int, group: int,
                    grad: bool, dtype: torch.dtype, route: str | None = None) -> str:
    """The path the rotation takes: ``route`` or the forced one where it applies, else the cheapest modelled.

    Also records the decision (:func:`recording_routes`) and logs it at DEBUG level, except while
    ``torch.compile`` traces (the rule is plain Python on shapes, so a trace takes the same path).

    Raises:
        ValueError: if ``route`` is given and does not apply (``"fused"`` without fused blocks, or unknown).
    """
    compiling = torch.compiler.is_compiling()  # Dynamo cannot read context variables: a trace reads neither
    forced = route if route is not None or compiling else _FORCED.get()
    costs = rotation_costs(device.type, tokens=tokens, n=n, block_size=block_size, m=m, width=width, group=group,
                           grad=grad)
    if route is not None and route not in costs:
        raise ValueError(f"BOFT route {route!r} does not apply here: candidates are {sorted(costs)}")
    chosen = forced if forced in costs else min(costs, key=costs.get)
    records = None if compiling else _RECORDS.get()
    if records is not None or (not compiling and logger.isEnabledFor(logging.DEBUG)):
        choice = RotationChoice(chosen, costs, device.type, str(dtype).replace("torch.", ""), tokens, n, block_size,
                                m, grad, forced=forced in costs)
        if records is not None:
            records.append(choice)
        logger.debug("boft route: %s", choice)
    return chosen
