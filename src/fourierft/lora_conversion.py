r"""Convert a FourierFT or BOFT adapter into a LoRA adapter (PEFT 0.22's ``convert_to_lora``/``save_as_lora``).

Every adapted layer's weight change ``dW`` (``W' - W``: FourierFT's ``a Re(ifft2(S))``, BOFT's
``diag(s) W M^T - W``) is replaced by its best rank-``r`` approximation ``B A`` (truncated SVD:
``B = U_r S_r``, ``A = V_r^T``, ``lora_alpha = r`` so the LoRA scaling is 1). The result is an ordinary LoRA
adapter in PEFT's file format, for tools that only take LoRA (vLLM, diffusers' ``load_lora_weights``,
llama.cpp's converter).

Beyond PEFT: transformers ``Conv1D`` (GPT-2), FourierFT ``Conv2d`` and ``Embedding`` and BOFT ``Conv2d`` are
converted too, each to the matching LoRA layer; a per-layer report (energy kept, relative error) is logged
and returned; a warning names layers that keep less than ``min_energy`` of their squared Frobenius norm.

The SVD (``svd="auto"``):

* an int ``rank`` on a layer with ``min(d_out, d_in) >= 4 k`` (``k = 2 rank + 10``) takes a randomised range
  finder on the operator's own products (:func:`fourierft.ops.lowrank.randomized_svd`: FourierFT through
  FFTs without forming ``dW``; BOFT on ``dW`` built by one butterfly pass over ``W``), with ``rank + 10``
  extra columns and 4 (FourierFT) or 2 (BOFT) subspace iterations. On FourierFT and BOFT layers of width
  512-1024 its relative error was at most 0.6% above the exact SVD's at ranks 8, 32 and 128;
* a float ``rank`` (an energy threshold) needs the whole spectrum, so it takes the exact SVD, as PEFT does;
* smaller layers take the exact SVD (it is cheap there, and it gives PEFT's factors).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import time
import warnings
from typing import Any, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from . import quantized
from ._version import FORMAT_VERSION
from .layer import AdapterLayer
from .methods.boft import _BOFTLayer
from .methods.fourierft import Conv1D, FourierFTLayer
from .modules_to_save import ModulesToSaveWrapper
from .ops import lowrank
from .serialization.folders import atomic_write_dir
from .serialization.state_dict import PEFT_PREFIX, _named_modules, get_peft_model_state_dict, tuner_root
from .serialization.tensors import SAFETENSORS_WEIGHTS_NAME, save_tensors

logger = logging.getLogger(__name__)

SVD_ROUTES = ("auto", "exact", "randomized")
#: Subspace iterations of the randomised route: FourierFT's products are FFTs (cheap), BOFT's are GEMMs.
_POWER_ITERS = {"fourierft": 4, "boft": 2}


@dataclasses.dataclass
class LoraConversionConfig:
    """The converted adapter's LoRA config, with PEFT ``LoraConfig``'s field names.

    ``to_dict()``/``save_pretrained()`` write the ``adapter_config.json`` PEFT loads as LoRA; ``to_peft()``
    builds a ``peft.LoraConfig`` (needs ``peft``).
    """

    r: int
    lora_alpha: int
    target_modules: Union[list[str], str]
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)
    exclude_modules: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    task_type: Optional[str] = None
    fan_in_fan_out: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict (``peft_type`` ``"LORA"``, dropout 0, no bias, scaling ``alpha / r = 1``)."""
        out = dataclasses.asdict(self)
        out.update(peft_type="LORA", peft_version=FORMAT_VERSION, lora_dropout=0.0, bias="none",
                   use_rslora=False, use_dora=False, init_lora_weights=True, inference_mode=True)
        return out

    def save_pretrained(self, save_directory: str) -> None:
        """Write ``adapter_config.json`` into ``save_directory``."""
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, "adapter_config.json"), "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)

    def to_peft(self):
        """A ``peft.LoraConfig`` with these values."""
        from peft import LoraConfig

        data = self.to_dict()
        for key in ("peft_type", "peft_version"):
            data.pop(key)
        return LoraConfig(**data)


@dataclasses.dataclass(frozen=True)
class LayerConversion:
    """One converted layer: its name, LoRA layer type, ``dW`` shape, rank, and what the rank kept.

    ``energy_kept`` is ``sum(S_r^2) / ||dW||_F^2`` and ``relative_error`` ``||dW - B A||_F / ||dW||_F``
    (``sqrt(1 - energy_kept)``, exact for the SVD's projection); a zero ``dW`` keeps everything.
    """

    name: str
    layer_type: str
    shape: tuple[int, int]
    rank: int
    energy_kept: float
    relative_error: float
    svd: str
    seconds: float


class ConversionResult(tuple):
    """``(lora_config, state_dict)`` as PEFT returns it, with the per-layer ``report`` as an attribute."""

    report: list[LayerConversion]

    def __new__(cls, config: LoraConversionConfig, state_dict: dict, report: list[LayerConversion]):
        result = super().__new__(cls, (config, state_dict))
        result.report = report
        return result


def _layer_type(layer: AdapterLayer) -> str:
    base = layer.get_base_layer()
    for kind in (nn.Embedding, nn.Conv2d, nn.Linear) + ((Conv1D,) if Conv1D is not None else ()):
        if isinstance(base, kind):
            return kind.__name__
    raise TypeError(f"LoRA conversion does not support base layers of type {type(base).__name__}")


def delta_operator(layer: AdapterLayer, adapter_name: str):
    """``dW`` of one adapter on ``layer`` as a :mod:`fourierft.ops.lowrank` operator, on the 2-D view
    ``(d_out, d_in)``: Linear/Conv1D ``(out, in)``, Conv2d ``(out, in * kh * kw)``, Embedding
    ``(num_embeddings, embedding_dim)``. Float32 or wider, no gradients."""
    with torch.no_grad():
        if isinstance(layer, FourierFTLayer):
            spectrum = layer.fourierft_spectrum[adapter_name].detach()
            rows, cols = layer.indices[adapter_name].to(spectrum.device).long()
            return lowrank.SpectralDelta(rows, cols, spectrum.to(torch.promote_types(spectrum.dtype, torch.float32)),
                                         layer.fourierft_scaling[adapter_name], layer.out_features, layer.in_features)
        if isinstance(layer, _BOFTLayer):  # (W M^T) * s - W in float32, as PEFT; M by the butterfly, never dense
            weight = quantized.dense_weight(layer.get_base_layer())
            delta = layer.rotated_weight([adapter_name], weight, dropout=False)
            delta.sub_(weight)  # in place, promoting a half-precision W: no second d_out x d_in temporary
            return lowrank.DenseDelta(delta.reshape(delta.shape[0], -1))
    raise TypeError(f"{type(layer).__name__} does not support LoRA conversion")


def _method(layer: AdapterLayer) -> str:
    return "fourierft" if isinstance(layer, FourierFTLayer) else "boft"


def _cutoff(s: torch.Tensor, threshold: float) -> int:
    """Smallest ``k`` whose top-``k`` squared singular values hold ``threshold`` of their sum."""
    energy = torch.cumsum(s.double().square(), 0)
    return int(torch.searchsorted(energy, threshold * energy[-1])) + 1


def factorize(op, rank: Union[int, float], svd: str = "auto", method: str = "boft"
              ) -> tuple[torch.Tensor, torch.Tensor, str, float]:
    """``(B, A, route, energy_kept)`` with ``B A`` the rank-``r`` truncated SVD of ``op`` (see the module doc)."""
    m, n = op.shape
    k = 2 * rank + 10 if isinstance(rank, int) else None
    route = svd
    if svd == "auto":
        route = "randomized" if k is not None and 4 * k <= min(m, n) else "exact"
    if route == "randomized" and k is None:
        raise ValueError("An energy threshold (float rank) needs the exact SVD: use svd='exact' or 'auto'")
    if route == "randomized":
        u, s, vh = lowrank.randomized_svd(op, rank, oversample=rank + 10, power_iters=_POWER_ITERS[method])
        total = op.frobenius_sq()
    else:
        u, s, vh = lowrank.exact_svd(op)
        total = float(s.double().square().sum())
        rank = rank if isinstance(rank, int) else _cutoff(s, rank)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    kept = float(s.double().square().sum()) / total if total > 0 else 1.0
    return u * s, vh, route, min(kept, 1.0)


def _lora_tensors(kind: str, b: torch.Tensor, a: torch.Tensor, layer: AdapterLayer) -> dict[str, torch.Tensor]:
    """PEFT's LoRA tensors (suffixes) for ``dW = B A`` on this layer type."""
    base = layer.get_base_layer()
    if kind == "Embedding":  # LoRA's embedding delta is (B A)^T with A (r, num_embeddings), B (dim, r)
        return {"lora_embedding_A": b.T, "lora_embedding_B": a.T}
    if kind == "Conv2d":
        return {"lora_A.weight": a.reshape(a.shape[0], *base.weight.shape[1:]),
                "lora_B.weight": b.reshape(*b.shape, 1, 1)}
    return {"lora_A.weight": a, "lora_B.weight": b}  # Linear and Conv1D: B A is (out, in) for both


def _check_args(rank, svd: str, min_energy: float) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"rank must be an int or a float threshold in (0, 1], got {rank!r}")
    if isinstance(rank, float) and not 0 < rank <= 1:
        raise ValueError(f"If rank is a float, it is interpreted as a threshold. It must be between 0 and 1 but "
                         f"got {rank}.")
    if isinstance(rank, int) and rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    if svd not in SVD_ROUTES:
        raise ValueError(f"svd must be one of {SVD_ROUTES}, got {svd!r}")
    if svd == "randomized" and isinstance(rank, float):
        raise ValueError("An energy threshold (float rank) needs the exact SVD: use svd='exact' or 'auto'")
    if not 0 <= min_energy <= 1:
        raise ValueError(f"min_energy must be in [0, 1], got {min_energy!r}")


def _convertible_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, AdapterLayer]]:
    """``(file-key module name, layer)`` of every adapter layer holding ``adapter_name``, checked first."""
    root, prefix = tuner_root(model)
    wrappers = [p for p, m in _named_modules(root) if isinstance(m, ModulesToSaveWrapper)]
    layers, unsupported = [], set()
    for path, module in _named_modules(root):
        if not isinstance(module, AdapterLayer) or any(path.startswith(w + ".") for w in wrappers):
            continue
        if adapter_name not in module.adapter_names():
            continue
        if not getattr(module, "supports_lora_conversion", lambda _n: False)(adapter_name):
            unsupported.add(type(module).__name__)
            continue
        if module.merged_adapters:
            raise ValueError(f"Cannot convert adapter '{adapter_name}' of {path}: adapters "
                             f"{', '.join(module.merged_adapters)} are merged into its base weight. Please "
                             "unmerge the adapters first.")
        layers.append((prefix + path, module))
    if unsupported:
        raise TypeError(f"Some module types on this model do not support LoRA conversion: "
                        f"{', '.join(sorted(unsupported))}.")
    if not layers:
        raise TypeError(f"Could not detect any layer that supports LoRA conversion (adapter '{adapter_name}').")
    return layers


def _base_config(model: nn.Module, adapter_name: str, rank) -> tuple[Optional[Any], LoraConversionConfig]:
    source = (getattr(model, "peft_config", None) or {}).get(adapter_name)
    bias = getattr(source, "bias", "none")
    if bias != "none":
        raise ValueError(f"The adapter's config sets bias={bias}, this is not supported right now.")
    r = rank if isinstance(rank, int) else 1  # a float rank puts every layer's rank in rank_pattern
    if source is None:
        return None, LoraConversionConfig(r=r, lora_alpha=r, target_modules=[])
    targets = source.target_modules
    config = LoraConversionConfig(
        r=r, lora_alpha=r, target_modules=targets if isinstance(targets, str) else sorted(targets or []),
        exclude_modules=copy.copy(source.exclude_modules), modules_to_save=copy.copy(source.modules_to_save),
        layers_to_transform=copy.copy(source.layers_to_transform), layers_pattern=copy.copy(source.layers_pattern),
        base_model_name_or_path=source.base_model_name_or_path, revision=source.revision,
        task_type=getattr(source.task_type, "value", source.task_type))
    return source, config


def _modules_to_save_tensors(model: nn.Module, adapter_name: str, layers) -> dict[str, torch.Tensor]:
    """The adapter's ``modules_to_save`` copies under PEFT's file keys (the same for LoRA)."""
    method_keys = {f"{name}.{attr}" for name, layer in layers for attr in layer.adapter_layer_names}
    tensors = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {k: v.detach().clone() for k, v in tensors.items() if k not in method_keys}


def convert_to_lora(model: nn.Module, rank: Union[int, float], adapter_name: str = "default",
                    progressbar: bool = False, compile_kwargs: Optional[dict] = None, *, svd: str = "auto",
                    min_energy: float = 0.5) -> ConversionResult:
    """Approximate an adapter by a LoRA adapter of rank ``rank`` (PEFT 0.22's signature and semantics).

    Args:
        model: A :class:`~fourierft.PeftModel` (or an injected model) holding FourierFT or BOFT layers.
        rank: An int rank for every layer, or a float in ``(0, 1]``: per layer, the smallest rank whose
            singular values hold that fraction of ``||dW||_F^2`` (ranks then go to ``rank_pattern``).
        adapter_name: The adapter to convert.
        progressbar: Show a progress bar over the layers.
        compile_kwargs: If given, the per-layer factorisation runs under ``torch.compile(**compile_kwargs)``.
        svd: ``"auto"`` (see the module docstring), ``"exact"`` (full SVD, PEFT's route) or ``"randomized"``
            (int ranks only).
        min_energy: Warn about layers keeping less than this fraction of their energy (0 never warns).

    Returns:
        ``(lora_config, state_dict)``: a :class:`LoraConversionConfig` and the LoRA tensors under PEFT's file
        keys (plus the ``modules_to_save`` copies); the tuple's ``.report`` lists a :class:`LayerConversion`
        per layer.

    Raises:
        TypeError: No layer can be converted, or some adapter layer cannot.
        ValueError: A bad rank (0, a float outside (0, 1], above a layer's smaller side), an adapter merged
            into its base weights, or a config with ``bias`` other than ``"none"``.
    """
    _check_args(rank, svd, min_energy)
    source, config = _base_config(model, adapter_name, rank)
    layers = _convertible_layers(model, adapter_name)
    for name, layer in layers:
        if isinstance(rank, int) and rank > min(delta_shape(layer)):
            raise ValueError(f"The chosen rank {rank} is larger than the weight shape ({min(delta_shape(layer))}) "
                             f"of {name}, please choose a lower rank.")
    convert = _convert_layer if compile_kwargs is None else torch.compile(_convert_layer, **compile_kwargs)
    state_dict, report = {}, []
    for name, layer in tqdm(layers, disable=not progressbar, desc="Converting to LoRA"):
        tensors, row = convert(name, layer, adapter_name, rank, svd)
        state_dict.update(tensors)
        report.append(row)
        _add_to_config(config, source, name.removeprefix(PEFT_PREFIX), row.rank, rank)
        if row.layer_type == "Conv1D":
            config.fan_in_fan_out = True
        logger.info("%s: rank %d keeps %.1f%% of the energy, relative error %.4f (%s SVD, %.2f s)", name,
                    row.rank, 100 * row.energy_kept, row.relative_error, row.svd, row.seconds)
    if source is not None and source.modules_to_save:
        state_dict.update(_modules_to_save_tensors(model, adapter_name, layers))
    _warn_low_energy(report, min_energy)
    return ConversionResult(config, state_dict, report)


def delta_shape(layer: AdapterLayer) -> tuple[int, int]:
    """``(d_out, d_in)`` of the 2-D view ``dW`` is factorised on."""
    base = layer.get_base_layer()
    if isinstance(base, nn.Conv2d):
        return base.out_channels, base.weight[0].numel()
    return layer.out_features, layer.in_features


def _convert_layer(name: str, layer: AdapterLayer, adapter_name: str, rank, svd: str):
    start = time.perf_counter()
    kind = _layer_type(layer)
    op = delta_operator(layer, adapter_name)
    b, a, route, kept = factorize(op, rank, svd, _method(layer))
    dtype = next(t for _, t in layer.named_adapter_tensors(adapter_name)).dtype
    tensors = {f"{name}.{suffix}": t.to(dtype).contiguous()
               for suffix, t in _lora_tensors(kind, b, a, layer).items()}
    row = LayerConversion(name, kind, op.shape, a.shape[0], kept, math.sqrt(max(0.0, 1.0 - kept)), route,
                          time.perf_counter() - start)
    return tensors, row


def _add_to_config(config: LoraConversionConfig, source, path: str, effective: int, rank) -> None:
    """PEFT's rule: a layer whose rank differs from ``r`` (or any layer when the targets are a regex) gets
    ``rank_pattern``/``alpha_pattern`` entries; otherwise its name joins ``target_modules``."""
    if effective != rank or isinstance(config.target_modules, str):
        config.rank_pattern[path] = effective
        config.alpha_pattern[path] = effective
    # without a source config the names are the only targets (PEFT leaves them out for a float rank)
    if isinstance(config.target_modules, list) and (effective == rank or source is None):
        config.target_modules = sorted({*config.target_modules, path})


def _warn_low_energy(report: list[LayerConversion], min_energy: float) -> None:
    low = sorted((row for row in report if row.energy_kept < min_energy), key=lambda row: row.energy_kept)
    if low:
        worst = ", ".join(f"{row.name} ({100 * row.energy_kept:.1f}%)" for row in low[:3])
        warnings.warn(f"{len(low)} of {len(report)} layers keep less than {100 * min_energy:.0f}% of their "
                      f"weight change's energy at this rank (lowest: {worst}); the LoRA adapter may behave "
                      "differently from the original. Check it, or raise the rank.")


def save_as_lora(path: Union[str, os.PathLike], model: nn.Module, rank: Union[int, float],
                 adapter_name: str = "default", progressbar: bool = False, compile_kwargs: Optional[dict] = None,
                 *, svd: str = "auto", min_energy: float = 0.5) -> list[LayerConversion]:
    """Convert (:func:`convert_to_lora`) and write ``adapter_config.json`` and ``adapter_model.safetensors``
    to ``path``, atomically (a failure leaves the folder as it was). Load it with
    ``peft.PeftModel.from_pretrained(base_model, path)``.

    Returns:
        The per-layer report (PEFT's returns ``None``).
    """
    if os.path.isfile(path):
        raise ValueError(f"{path} is a file, not a folder")
    config, state_dict = result = convert_to_lora(model, rank, adapter_name, progressbar, compile_kwargs,
                                                  svd=svd, min_energy=min_energy)

    def write(tmp: str) -> None:
        save_tensors(state_dict, os.path.join(tmp, SAFETENSORS_WEIGHTS_NAME), True, {"format": "pt"})
        config.save_pretrained(tmp)

    atomic_write_dir(os.fspath(path), write)
    logger.info("Saved the LoRA adapter (%d layers) to %s", len(result.report), path)
    return result.report
