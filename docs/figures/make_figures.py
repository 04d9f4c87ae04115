"""Draw the documentation's figures from the library's own code and from the benchmark results.

Run from anywhere (CPU only, a few seconds)::

    python docs/figures/make_figures.py

Writes, next to this file:

* ``fourierft_frequencies.png``: where a FourierFT adapter's coefficients sit in the 2-D spectrum (uniform,
  PEFT's default, against ``frequency_band`` choices) and the weight change ``dW`` each one produces. Both
  come from real adapter layers (``get_peft_model`` -> ``layer.indices`` and ``layer.get_delta_weight``).
* ``boft_rotation.png``: ``|M|`` of a BOFT rotation with 1 to 4 butterfly factors (``layer.get_delta_weight``).
* ``boft_factors.png``: the permutations ``P_i`` and the factors ``B_i = P_i blockdiag(Q_i) P_i^T`` whose
  product is ``M`` (:mod:`fourierft.ops.butterfly`).
* ``bench_*.png`` and ``tables/bench_*.md``: plots and Markdown tables of ``benchmarks/results/*.json``. The
  performance page includes each table file; when a result file is missing, its table file says which command
  produces it and no plot is drawn (a stale plot is removed).
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TABLES = HERE / "tables"
DPI = 110
#: Type sizes for figures of at most ~11 inches, which the page shows at about 75%: ticks stay legible.
RC = {"font.size": 12, "axes.titlesize": 12, "axes.labelsize": 12, "xtick.labelsize": 11, "ytick.labelsize": 11,
      "legend.fontsize": 10, "figure.titlesize": 13}
#: The widest table a page may hold: wider ones hide columns behind a scrollbar at 1280 px.
MAX_TABLE_COLUMNS = 10


class TableTooWide(Exception):
    """A generated table has more than ``MAX_TABLE_COLUMNS`` columns: the script stops (a page would hide some)."""

if str(ROOT / "src") not in sys.path:  # works from a checkout without `pip install -e .` too
    sys.path.insert(0, str(ROOT / "src"))

import fourierft  # noqa: E402
from fourierft.ops import butterfly  # noqa: E402

logger = logging.getLogger("make_figures")


class OneLayer(nn.Module):
    """The smallest model an adapter can be put on: one linear layer named ``proj``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _save(fig: plt.Figure, name: str) -> None:
    path = HERE / name
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Software": None})  # same bytes on every run
    plt.close(fig)
    logger.info("wrote %s", path.relative_to(ROOT))


# ------------------------------------------------------------------------------------------------ FourierFT
def fourierft_adapter(d: int, n: int, band, seed: int = 0):
    """A FourierFT adapter on a ``d x d`` layer: ``(rows p, columns q, dW)`` from the library's layer."""
    torch.manual_seed(seed)  # the coefficients: PEFT's default init draws them from N(0, 1)
    config = fourierft.FourierFTConfig(target_modules=["proj"], n_frequency=n, scaling=150.0,
                                       frequency_band=band)
    model = fourierft.get_peft_model(OneLayer(d, d), config)
    layer = model.base_model.model.proj
    p, q = layer.indices["default"]
    with torch.no_grad():
        dw = layer.get_delta_weight("default")
    return p.numpy(), q.numpy(), dw.numpy()


def signed(k: np.ndarray, d: int) -> np.ndarray:
    """Frequency index -> signed frequency (``k`` and ``k - d`` are the same frequency of a real signal)."""
    return np.where(k <= d // 2, k, k - d)


def figure_fourierft() -> None:
    d, n = 64, 200
    cases = [
        ("uniform (default, as PEFT)", None),
        ("frequency_band=[0.0, 0.06]\n(low frequencies)", [0.0, 0.06]),
        ("frequency_band=[0.45, 0.05]\n(high frequencies)", [0.45, 0.05]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(12, 8.2))
    for col, (title, band) in enumerate(cases):
        p, q, dw = fourierft_adapter(d, n, band)
        ax = axes[0, col]
        ax.scatter(signed(q, d), signed(p, d), s=9, c="tab:blue", alpha=0.8)
        ax.set_xlim(-d / 2 - 1, d / 2 + 1)
        ax.set_ylim(-d / 2 - 1, d / 2 + 1)
        ax.set_aspect("equal")
        ax.axhline(0, color="0.8", lw=0.6, zorder=0)
        ax.axvline(0, color="0.8", lw=0.6, zorder=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("input frequency q (signed)")
        if col == 0:
            ax.set_ylabel("output frequency p (signed)")
        ax = axes[1, col]
        lim = float(np.abs(dw).max())
        im = ax.imshow(dw, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_title("dW = scaling * Re(ifft2(S))", fontsize=10)
        ax.set_xlabel("input feature k")
        if col == 0:
            ax.set_ylabel("output feature j")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"FourierFT on a {d}x{d} layer, n_frequency={n}, scaling=150: where the coefficients sit "
                 "(top) and the weight change they make (bottom)", fontsize=11)
    fig.tight_layout()
    _save(fig, "fourierft_frequencies.png")


# ------------------------------------------------------------------------------------------------ BOFT
def boft_layer(n: int, block_size: int, m: int, seed: int = 0):
    """A BOFT adapter on an ``n x n`` layer with ``R ~ N(0, 1)`` (larger than the init, to make the
    structure visible); returns the layer."""
    torch.manual_seed(seed)
    config = fourierft.BOFTConfig(target_modules=["proj"], boft_block_size=block_size,
                                  boft_n_butterfly_factor=m, init_weights=False)
    model = fourierft.get_peft_model(OneLayer(n, n), config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.boft_R["default"].normal_(0.0, 1.0)
    return layer


def figure_boft_rotation() -> None:
    n, b = 32, 4
    fig, axes = plt.subplots(1, 4, figsize=(15, 4.3))
    for ax, m in zip(axes, (1, 2, 3, 4)):
        layer = boft_layer(n, b, m)
        with torch.no_grad():
            rotation, _ = layer.get_delta_weight("default")
        ax.imshow(rotation.abs().numpy(), cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        width = b * 2 ** (m - 1)
        ax.set_title(f"m = {m} factor{'s' if m > 1 else ''}: blocks of {min(width, n)}", fontsize=10)
        ax.set_xticks(range(0, n + 1, 8))
        ax.set_yticks(range(0, n + 1, 8))
    fig.suptitle(f"|M| of a BOFT rotation, n={n} features, boft_block_size={b}: each extra butterfly factor "
                 "doubles the width of the blocks that mix", fontsize=11)
    fig.tight_layout()
    _save(fig, "boft_rotation.png")


def figure_boft_factors() -> None:
    n, b, m = 16, 2, 3
    layer = boft_layer(n, b, m)
    num = n // b
    perms = butterfly.butterfly_permutations(n, num, b, m)
    with torch.no_grad():
        q = butterfly.cayley(layer.boft_R["default"])
        rotation, _ = layer.get_delta_weight("default")
    eye = torch.eye(n)
    fig, axes = plt.subplots(2, m + 1, figsize=(3.4 * (m + 1), 7))
    for ax in axes.flat:
        ax.set_xticks(range(0, n, 4))
        ax.set_yticks(range(0, n, 4))
    for i in range(m):
        ax = axes[0, i]
        ax.imshow(eye[perms[i]].numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"P_{i}: " + ("identity" if i == 0 else f"permutation {i}"), fontsize=10)
        with torch.no_grad():
            factor = butterfly.dense_rotation(q[i:i + 1], perms[i:i + 1])
        ax = axes[1, i]
        ax.imshow(factor.abs().numpy(), cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"|B_{i}| = |P_{i} blockdiag(Q_{i}) P_{i}^T|", fontsize=10)
    axes[0, m].axis("off")
    axes[0, m].text(0.0, 0.5, "Row j of P_i holds its 1 in column perms[i, j].\n\n"
                    "B_i rotates the blocks of size b that P_i\nhas gathered from features further apart;\n"
                    "M = B_2 B_1 B_0 mixes every feature\nof a block of width b * 2**(m-1).",
                    fontsize=10, va="center", transform=axes[0, m].transAxes)
    ax = axes[1, m]
    ax.imshow(rotation.abs().numpy(), cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title("|M| = |B_2 B_1 B_0|", fontsize=10)
    fig.suptitle(f"The factors of a BOFT rotation: n={n}, boft_block_size={b}, boft_n_butterfly_factor={m}",
                 fontsize=11)
    fig.tight_layout()
    _save(fig, "boft_factors.png")


# ------------------------------------------------------------------------------------------------ benchmarks
COMMANDS = {
    "serving": "python benchmarks/bench_serving.py",
    "models": "python benchmarks/bench_models.py",
    "spectral_op": "python benchmarks/bench_spectral_op.py --baseline c7050e7 --methods frozen,ours,base,peft_fft,peft_lora "
                   "--budget 1.5",
    "spectral_op_cpu1": "python benchmarks/bench_spectral_op.py --baseline c7050e7 --threads 1 --methods "
                        "frozen,ours,base,peft_fft,peft_lora --budget 1.5 --shapes 384:128,...,4096:512 "
                        "--out benchmarks/results/spectral_op_cpu1.json",
    "spectral_op_accum4": "python benchmarks/bench_spectral_op.py --baseline c7050e7 --accumulate 4 --methods "
                          "frozen,ours,base,peft_fft,peft_lora --shapes 768:128,768:512,1024:512,2048:2048 "
                          "--out benchmarks/results/spectral_op_accum4.json",
    "spectral_op_compiled": "python benchmarks/bench_spectral_op.py --baseline c7050e7 --compile --methods "
                            "frozen,ours,base,peft_lora --shapes 384:512,768:128,768:512,1024:512,2048:512 "
                            "--out benchmarks/results/spectral_op_compiled.json",
    "models_cpu1": "python benchmarks/bench_models.py --threads 1 --models minilm-qv,minilm-all,bert "
                   "--variants frozen,ours-fourierft,peft-fourierft,peft-lora-r8 --out benchmarks/results/models_cpu1.json",
    "butterfly_op": "python benchmarks/bench_butterfly_op.py",
}


def load_results(name: str, results: Path = RESULTS):
    path = results / f"{name}.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        logger.warning("skipping %s: %s", path, err)
        return None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not data["rows"]:
        logger.warning("skipping %s: no rows", path)
        return None
    return data


def fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _numeric(cell) -> bool:
    return str(cell) == "-" or re.fullmatch(r"-?[\d,]+(\.\d+)?", str(cell)) is not None


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; columns holding only numbers are right-aligned.

    Raises:
        TableTooWide: More than ``MAX_TABLE_COLUMNS`` columns (split the table instead); not caught below, so
            the figures script and the docs build stop.
    """
    if len(header) > MAX_TABLE_COLUMNS:
        raise TableTooWide(f"a table of {len(header)} columns is wider than a page shows ({MAX_TABLE_COLUMNS}): "
                         f"split it ({', '.join(header)})")
    align = ["---:" if all(_numeric(row[i]) for row in rows) else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def describe_run(data: dict, hide: tuple = ()) -> str:
    """The "Run:" line: torch, threads and the settings of the run (``hide``: settings said elsewhere)."""
    settings = data.get("config") or data.get("args") or {}
    meta = data.get("meta") or {}
    parts = []
    torch_version = data.get("torch") or meta.get("torch")
    if torch_version:
        parts.append(f"torch {torch_version}")
    threads = meta.get("threads") or settings.get("threads")
    if threads:
        parts.append(f"{threads} thread{'s' if threads != 1 else ''}")
    if settings.get("quick"):
        parts.append("`--quick` settings (small shapes, few repeats)")
    shown = {k: v for k, v in settings.items()
             if k not in ("quick", "out", "methods", "threads", *hide) and v is not None
             and not isinstance(v, (dict, list))}
    if shown:
        parts.append(", ".join(f"{k}={v}" for k, v in shown.items()))
    return "Run: " + "; ".join(parts) + "." if parts else ""


def write_table_file(name: str, body: str | None) -> None:
    """``tables/bench_<name>.md``: the plot and table, or how to produce them."""
    TABLES.mkdir(exist_ok=True)
    png = HERE / f"bench_{name}.png"
    if body is None:
        if png.exists():
            png.unlink()  # no stale plot for results that are gone
        body = (f"!!! note \"No results yet\"\n    `benchmarks/results/{name}.json` is missing (or unreadable). "
                f"Produce it with "
                f"`{COMMANDS[name]}` (add `--quick` for a short run), then rebuild the figures with "
                "`python docs/figures/make_figures.py`.\n")
    (TABLES / f"bench_{name}.md").write_text(body)


def bench_serving(data: dict) -> str:
    rows = data["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        sub = sorted((r for r in rows if r["method"] == method), key=lambda r: r["K"])
        ks = [r["K"] for r in sub]
        for key, label, style in (("single_ms", "whole batch, one adapter", "k--"),
                                  ("mixed_ms", "mixed batch (adapter_names)", "o-"),
                                  ("separate_ms", "one forward per adapter", "s-")):
            ax.plot(ks, [r[key] for r in sub], style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("adapters in the batch (K)")
        ax.set_ylabel("ms per batch")
        ax.set_title(method)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Serving K adapters from one base model (benchmarks/bench_serving.py)")
    fig.tight_layout()
    _save(fig, "bench_serving.png")
    table = markdown_table(
        ["method", "K", "single ms", "mixed ms", "separate ms", "mixed / single", "separate / mixed",
         "adapter KiB", "load ms / adapter"],
        [[r["method"], r["K"], fmt(r["single_ms"]), fmt(r["mixed_ms"]), fmt(r["separate_ms"]),
          fmt(r["mixed_over_single"], 2), fmt(r["separate_over_mixed"], 2), fmt(r["adapter_bytes"] / 1024, 1),
          fmt(r.get("load_ms_per_adapter"), 2)] for r in rows])
    return f"![serving benchmark](figures/bench_serving.png)\n\n{describe_run(data)}\n\n{table}"


def _pairs(variants: list[str]) -> dict[str, str]:
    """``ours-X`` -> the PEFT variant it is compared with (same method, one butterfly factor for BOFT)."""
    out = {}
    for v in variants:
        if v.startswith("ours-"):
            method = v[len("ours-"):]
            for candidate in (f"peft-{method}", f"peft-{method.rsplit('-m', 1)[0]}-m1"):
                if candidate in variants:
                    out[v] = candidate
                    break
    return out


#: bench_models.py's shapes per model when its rows do not record them (results written before they did).
MODEL_SHAPES = {"bert": "BERT-base-shaped classifier, random weights: hidden {hidden}, {layers} layers, "
                        "batch {batch} x {tokens} tokens",
                "llama": "Llama-shaped causal LM, random weights: hidden {llama_hidden}, {llama_layers} layers, "
                         "batch {batch} x {tokens} tokens, {new_tokens} tokens generated",
                "minilm-qv": "all-MiniLM-L6-v2, real weights, batch 32 x 40 tokens (the demo's), adapters on query "
                             "and value, FourierFT n_frequency=400",
                "minilm-all": "all-MiniLM-L6-v2, real weights, batch 32 x 40 tokens (the demo's), adapters on every "
                              "linear layer of the encoder (the demo's FourierFT setting), FourierFT n_frequency=400"}
MODEL_COLORS = {"frozen": "black", "ours": "tab:blue", "peft": "tab:orange", "lora": "tab:gray"}


def _model_kind(variant: str) -> str:
    return "frozen" if variant == "frozen" else "lora" if "lora" in variant else variant.split("-")[0]


def model_shapes(data: dict) -> dict[str, str]:
    """``model -> what was run`` (size, batch, tokens), from the rows or from bench_models.py's fixed shapes."""
    args = dict(data.get("args") or {})
    quick = args.get("quick")
    args.setdefault("llama_hidden", args.get("hidden") if quick else 1024)
    args.setdefault("llama_layers", args.get("layers") if quick else 4)
    out = {}
    for r in data["rows"]:
        model = r.get("model", "model")
        if model in out:
            continue
        if r.get("shape"):
            out[model] = r["shape"]
            continue
        template = MODEL_SHAPES.get(model)
        try:
            out[model] = template.format(**args) if template else ""
        except KeyError:
            out[model] = ""
    return out


def train_spread(r: dict):
    """A row's timing spread: its median step time minus its fastest timed round (``None`` if not recorded)."""
    if r.get("train_ms") is None or r.get("train_min_ms") is None:
        return None
    return r["train_ms"] - r["train_min_ms"]


def over_frozen(r: dict, frozen: dict):
    """``(ms over the frozen model, noise, significant)``: the noise is the sum of the two rows' spreads, and an
    overhead no larger than it (negative ones included) is not a result."""
    if not frozen or r is frozen or r.get("train_ms") is None or frozen.get("train_ms") is None:
        return None, None, False
    over = r["train_ms"] - frozen["train_ms"]
    spreads = [train_spread(r), train_spread(frozen)]
    noise = sum(spreads) if None not in spreads else None
    return over, noise, over > 0 and (noise is None or over > noise)


def fmt_over(over, noise, significant: bool) -> str:
    if over is None:
        return "-"
    spread = f" ± {fmt(noise)}" if noise is not None else ""
    return f"{fmt(over)}{spread}" if significant else f"within noise ({fmt(over)}{spread})"


def bench_models(data: dict, name: str = "models") -> str:
    rows = data["rows"]
    models = list(dict.fromkeys(r.get("model", "model") for r in rows))
    metrics = [("train_ms", "training step (ms)"), ("eval_ms", "eval forward, unmerged (ms)")]
    fig, axes = plt.subplots(len(models), len(metrics), figsize=(11, 0.35 * len(rows) + 1.2 * len(models)),
                             squeeze=False)
    for row, model in enumerate(models):
        sub = [r for r in rows if r.get("model", "model") == model]
        names = [r["variant"] for r in sub]
        colors = [MODEL_COLORS.get(_model_kind(v), "tab:purple") for v in names]
        for col, (key, label) in enumerate(metrics):
            ax = axes[row, col]
            values = [r.get(key) or 0.0 for r in sub]
            if key == "train_ms":  # the spread: from the fastest timed round to the median
                spreads = [train_spread(r) or 0.0 for r in sub]
                ax.barh(names, values, color=colors, xerr=[spreads, [0.0] * len(spreads)], capsize=2,
                        error_kw={"elinewidth": 1.2, "ecolor": "tab:red"})
            else:
                ax.barh(names, values, color=colors)
            ax.invert_yaxis()
            ax.set_xlabel(label)
            ax.set_title(model)
            ax.grid(True, axis="x", alpha=0.3)
            if col:
                ax.tick_params(labelleft=False)
    fig.suptitle("Whole models (benchmarks/bench_models.py): blue = fourierft, orange = peft, grey = peft LoRA r=8,\n"
                 "black = frozen (no adapter); red whiskers: fastest round to median")
    fig.tight_layout()
    _save(fig, f"bench_{name}.png")
    train_rows, other_rows = [], []
    for model in models:
        sub = {r["variant"]: r for r in rows if r.get("model", "model") == model}
        pairs = _pairs(list(sub))
        frozen = sub.get("frozen")
        lora = sub.get("peft-lora-r8")
        lora_over, _, lora_ok = over_frozen(lora, frozen) if lora else (None, None, False)
        for variant, r in sub.items():
            ref = sub.get(pairs.get(variant, ""))
            ratio = fmt(ref["train_ms"] / r["train_ms"], 2) if ref and r.get("train_ms") and ref.get("train_ms") else "-"
            over, noise, ok = over_frozen(r, frozen)
            ref_over, _, ref_ok = over_frozen(ref, frozen) if ref else (None, None, False)
            vs_ref = fmt(ref_over / over, 2) if ok and ref_ok else "-"
            vs_lora = fmt(over / lora_over, 2) if ok and lora_ok and r is not lora else "-"
            train_rows.append([model, variant, fmt(r.get("train_ms")), ratio, fmt_over(over, noise, ok), vs_ref,
                               vs_lora])
            other_rows.append([model, variant, fmt(r.get("eval_ms")), fmt(r.get("eval_merged_ms")),
                               fmt(r.get("generate_ms")), fmt(r.get("saved_MiB"), 2), fmt(r.get("trainable"))])
    train = markdown_table(["model", "variant", "train ms", "peft / ours", "over frozen ms", "peft's over / ours",
                            "over / LoRA's over"], train_rows)
    other = markdown_table(["model", "variant", "eval ms", "eval merged ms", "generate ms", "saved for backward MiB",
                            "trainable params"], other_rows)
    shapes = "\n".join(f"* `{m}`: {s}" for m, s in model_shapes(data).items() if s)
    return (f"![model benchmark](figures/bench_{name}.png)\n\n"
            f"{describe_run(data, hide=('hidden', 'layers', 'batch', 'tokens', 'new_tokens', 'models'))}\n\n"
            f"{shapes}\n\nTraining step:\n\n{train}\nInference and memory:\n\n{other}")


def _tokens(r: dict):
    return r.get("tokens", r.get("T"))


SPECTRAL_LABELS = {"frozen": "frozen layer", "ours": "fourierft (chosen route)",
                   "ours@spectral": "fourierft, spectral route", "ours@merged": "fourierft, merged route",
                   "base": "fourierft before the one-op change", "peft_fft": "peft FourierFT",
                   "peft_lora": "peft LoRA r=8"}
BUTTERFLY_LABELS = {"frozen": "frozen layer", "ours": "fourierft BOFT", "peft_boft": "peft BOFT",
                    "peft_lora": "peft LoRA r=8", "ours_plain": "fourierft BOFT, scale in 3 ops"}
SPECTRAL_STYLES = {"ours": ("tab:blue", "-"), "ours@spectral": ("tab:blue", ":"), "ours@merged": ("tab:cyan", "--"),
                   "base": ("tab:purple", "-."), "peft_fft": ("tab:orange", "-"), "peft_lora": ("tab:gray", "-")}


def _chosen_path(tokens: int, d: int, n: int, threads: int) -> str:
    """The route the CPU rule picks for this training step (fourierft.ops.spectral_routes)."""
    from fourierft.ops.spectral_routes import route_costs

    costs = route_costs("cpu", tokens=tokens, d_out=d, d_in=d, n=n, grad=True, fused=True,
                        weight_dtype=torch.float32, threads=threads)
    return min(costs, key=costs.get)


def _op_over(r: dict, frozen: dict):
    """``(ms over the frozen layer, significant)`` for one layer benchmark row (noise as in :func:`over_frozen`)."""
    over, _, ok = over_frozen({"train_ms": r["median_ms"], "train_min_ms": r.get("min_ms")},
                              {"train_ms": frozen["median_ms"], "train_min_ms": frozen.get("min_ms")})
    return over, ok


def overhead_ratio(ours: dict, lora, frozen: dict) -> str:
    """Our overhead over the frozen layer divided by LoRA's; ``within noise`` where either overhead is."""
    if lora is None:
        return "-"
    (over, ok), (lora_over, lora_ok) = _op_over(ours, frozen), _op_over(lora, frozen)
    if not ok:
        return "ours within noise"
    return fmt(over / lora_over, 2) if lora_ok else "LoRA's within noise"


def bench_spectral_op(data: dict, name: str = "spectral_op") -> str:
    rows = data["rows"]
    meta = data.get("meta") or {}
    threads = meta.get("threads") or 2
    by = {(r["d"], _tokens(r), r["method"]): r for r in rows}
    widths = list(dict.fromkeys(r["d"] for r in rows))
    methods = [m for m in SPECTRAL_STYLES if any(r["method"] == m for r in rows)]
    cols = min(2, len(widths))
    grid_rows = (len(widths) + cols - 1) // cols
    fig, axes = plt.subplots(grid_rows, cols, figsize=(5.5 * cols, 3.8 * grid_rows), squeeze=False)
    for ax, d in zip(axes.flat, widths):
        tokens = sorted({_tokens(r) for r in rows if r["d"] == d})
        for method in methods:
            ys = [by[d, t, method]["vs_frozen"] - 1 if (d, t, method) in by else np.nan for t in tokens]
            ys = [y if y > 0 else np.nan for y in ys]  # within the noise of the frozen layer: no point on a log axis
            color, style = SPECTRAL_STYLES[method]
            ax.plot(tokens, ys, style, color=color, marker="o", ms=5, label=SPECTRAL_LABELS.get(method, method))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"d = {d}")
        ax.set_xlabel("tokens per step")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(widths):]:
        ax.axis("off")
    axes.flat[0].set_ylabel("overhead over the frozen layer\n(step time / frozen - 1)")
    axes.flat[0].legend(fontsize="small")
    n = rows[0].get("n")
    fig.suptitle(f"One FourierFT layer, training step, {threads} thread{'s' if threads != 1 else ''}, n={n} "
                 f"(benchmarks/bench_spectral_op.py)")
    fig.tight_layout()
    _save(fig, f"bench_{name}.png")
    time_rows, memory_rows = [], []
    with_base = any(r["method"] == "base" for r in rows)
    for d, t in dict.fromkeys((r["d"], _tokens(r)) for r in rows):
        ours, peft, lora, frozen = (by.get((d, t, m)) for m in ("ours", "peft_fft", "peft_lora", "frozen"))
        if ours is None or frozen is None:
            continue
        time_rows.append([
            d, t, _chosen_path(t, d, n, threads), fmt(frozen["median_ms"], 2), fmt(ours["vs_frozen"], 2),
            fmt(lora["vs_frozen"], 2) if lora else "-", fmt(peft["vs_frozen"], 2) if peft else "-",
            overhead_ratio(ours, lora, frozen),
            fmt(ours.get("peft_fft_over_this"), 2)] + ([fmt(ours.get("base_over_this"), 2)] if with_base else []))
        memory_rows.append([
            d, t, fmt(ours.get("saved_mb"), 1), fmt(peft.get("saved_mb"), 1) if peft else "-",
            fmt(ours.get("peak_mb"), 1), fmt(peft.get("peak_mb"), 1) if peft else "-", fmt(frozen.get("peak_mb"), 1)])
    times = markdown_table(
        ["d", "T", "route", "frozen ms", "ours x frozen", "LoRA x frozen", "peft FFT x frozen", "overhead / LoRA's",
         "peft FFT / ours"] + (["before / now"] if with_base else []), time_rows)
    memory = markdown_table(["d", "T", "saved MiB ours", "saved MiB peft", "peak MiB ours", "peak MiB peft",
                             "peak MiB frozen"], memory_rows)
    return (f"![spectral op benchmark](figures/bench_{name}.png)\n\n{describe_run(data)}\n\nTime:\n\n{times}\n"
            f"Memory:\n\n{memory}")


def bench_butterfly_op(data: dict) -> str:
    rows = data["rows"]
    shapes = list(dict.fromkeys((r["d"], _tokens(r)) for r in rows))
    cols = min(3, len(shapes))
    grid_rows = (len(shapes) + cols - 1) // cols
    fig, axes = plt.subplots(grid_rows, cols, figsize=(3.8 * cols, 3.4 * grid_rows), squeeze=False)
    for ax in axes.flat[len(shapes):]:
        ax.axis("off")
    for i, (ax, shape) in enumerate(zip(axes.flat, shapes)):
        sub = [r for r in rows if (r["d"], _tokens(r)) == shape]
        for size, color in ((4, "tab:blue"), (8, "tab:green")):
            ours = sorted((r for r in sub if r["method"] == "ours" and r.get("block_size") == size), key=lambda r: r["m"])
            if ours:
                ax.plot([r["m"] for r in ours], [r["median_ms"] for r in ours], "o-", color=color,
                        label=f"fourierft BOFT, b={size}")
            peft = [r for r in sub if r["method"] == "peft_boft" and r.get("block_size") == size]
            if peft:
                ax.plot([1], [peft[0]["median_ms"]], "x", ms=10, mew=2, color=color, label=f"peft BOFT, b={size} (m=1)")
        for method, style in (("frozen", "k--"), ("peft_lora", "k:")):
            ref = [r for r in sub if r["method"] == method]
            if ref:
                ax.axhline(ref[0]["median_ms"], linestyle=style[1:], color="k",
                           label="frozen layer" if method == "frozen" else "peft LoRA r=8")
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["m"] for r in sub if r.get("m")}) or [1])
        ax.set_xlabel("butterfly factors m")
        if i % cols == 0:
            ax.set_ylabel("ms per step (median)")
        ax.set_title(f"d={shape[0]}, T={shape[1]}")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize="small", bbox_to_anchor=(0.5, -0.02))
    fig.suptitle("One BOFT layer, forward + backward (benchmarks/bench_butterfly_op.py)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    _save(fig, "bench_butterfly_op.png")
    table = markdown_table(
        ["d", "T", "method", "b", "m", "median ms", "x frozen", "x peft (m=1)", "saved MiB"],
        [[r["d"], _tokens(r), BUTTERFLY_LABELS.get(r["method"], r["method"]), r.get("block_size") or "-",
          r.get("m") or "-", fmt(r["median_ms"], 2),
          fmt(r.get("vs_frozen"), 2), fmt(r.get("vs_peft_boft_m1"), 3), fmt(r.get("saved_MiB"), 2)] for r in rows])
    return f"![butterfly op benchmark](figures/bench_butterfly_op.png)\n\n{describe_run(data)}\n\n{table}"


BENCHMARKS = {"serving": bench_serving, "models": bench_models, "spectral_op": bench_spectral_op,
              "spectral_op_cpu1": lambda data: bench_spectral_op(data, "spectral_op_cpu1"),
              "spectral_op_accum4": lambda data: bench_spectral_op(data, "spectral_op_accum4"),
              "spectral_op_compiled": lambda data: bench_spectral_op(data, "spectral_op_compiled"),
              "models_cpu1": lambda data: bench_models(data, "models_cpu1"),
              "butterfly_op": bench_butterfly_op}


def figure_benchmarks(results: Path = RESULTS) -> None:
    for name, draw in BENCHMARKS.items():
        data = load_results(name, results)
        body = None
        if data is not None:
            try:
                body = draw(data)
            except (KeyError, TypeError, ValueError, IndexError) as err:  # a changed result format: say so, go on
                logger.warning("could not plot %s.json (%s: %s); the page will say it is missing",
                               name, type(err).__name__, err)
                plt.close("all")
        elif not (results / f"{name}.json").exists():
            logger.info("no %s.json in %s; run: %s", name, results, COMMANDS[name])
        write_table_file(name, body)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder of the benchmark JSON files (default: benchmarks/results)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fourierft").setLevel(logging.ERROR)  # the demo layers' fan_in_fan_out notes etc.
    plt.rcParams.update(RC)
    figure_fourierft()
    figure_boft_rotation()
    figure_boft_factors()
    figure_benchmarks(args.results)


if __name__ == "__main__":
    main()
