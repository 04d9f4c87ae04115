r"""Quantized base layers: bitsandbytes ``Linear8bitLt`` and ``Linear4bit`` (nf4 and fp4, with or without
double quantization).

Both methods train over such a layer on the activation side, through the base layer's own forward:
FourierFT adds its spectral change to ``base(x)``, BOFT computes ``s * (base(x M) - b) + b``. Neither needs
the dense weight while training. Only merging does; this module gives the adapter layers three
operations on the base weight, whatever its storage:

* :func:`dense_weight`: the weight as a dense float tensor (de-quantized for a bitsandbytes layer);
* :func:`replace_weight`: store a dense weight (re-quantized with the layer's own settings), returning a
  snapshot of what was there before;
* :func:`restore_weight`: put a snapshot back, so that unmerging gives back the quantized weight bit for
  bit (re-quantizing ``W + dW - dW`` would round a second time).

For training it also undoes a CPU-inference repacking of 4-bit weights that has no backward
(:func:`is_repacked`, :func:`unpack`). :func:`dequantize_model` gives a full-precision copy to merge into.

Re-quantizing rounds: after merging, the layer holds ``Q(W + dW)`` rather than ``W + dW``, off by at most
half a quantization step (stated and measured in ``docs/quantized.md``): per row ``max|W_r| / 254`` for int8
(plus the float16 cast bitsandbytes quantizes from), and ``absmax_block * gap / 2`` for 4 bit, where ``gap``
is the largest distance between neighbouring code values in units of the block's absmax (nf4: 0.3038,
fp4: 1/3); double quantization adds the rounding of the absmax itself.

bitsandbytes is an optional dependency (``pip install -e ".[quantized]"`` from a clone,
``pip install "fourierft[quantized]"`` from a package index). It is imported only when a
bitsandbytes layer is met; such a layer is recognised by its class's module name, without importing it.
"""

from __future__ import annotations

import copy
import importlib
import logging
import sys
import warnings
from typing import Any, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: bitsandbytes layer classes (by name; subclasses such as ``LinearNF4`` included) and their kind.
SUPPORTED = {"Linear8bitLt": "int8", "Linear4bit": "4bit"}

INSTALL_HINT = ('pip install -e ".[quantized]" from a clone, pip install "fourierft[quantized]" from a package index '
                '(or: pip install --no-deps bitsandbytes)')


def is_bitsandbytes_module(module: nn.Module) -> bool:
    """Whether ``module``'s class comes from bitsandbytes (checked without importing it)."""
    return any(cls.__module__.split(".")[0] == "bitsandbytes" for cls in type(module).__mro__)


def quant_kind(module: nn.Module) -> Optional[str]:
    """``"int8"`` (``Linear8bitLt``), ``"4bit"`` (``Linear4bit`` and subclasses) or ``None``."""
    return _kind_of_class(type(module))


def _kind_of_class(cls: type) -> Optional[str]:
    # Not cached: a walk over a few base classes, run on every forward, and torch.compile traces it as plain
    # Python (it would skip an lru_cache wrapper, and warn that skipping it may be silently wrong).
    for base in cls.__mro__:
        if base.__module__.split(".")[0] == "bitsandbytes" and base.__name__ in SUPPORTED:
            return SUPPORTED[base.__name__]
    return None


def values_per_element(param: torch.Tensor) -> int:
    """Weights stored per element of ``param``: ``2 * element_size`` for a packed bitsandbytes 4-bit weight
    (two 4-bit values per byte), else 1."""
    if type(param).__name__ == "Params4bit" and is_bitsandbytes_module(param):
        return 2 * param.element_size()
    return 1


def import_bitsandbytes(what: str = "a quantized layer"):
    """bitsandbytes, imported now.

    Raises:
        ImportError: It is not installed (or fails to import); the message says how to install it.
    """
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as err:
        raise ImportError(f"{what} needs bitsandbytes, which cannot be imported ({err}); {INSTALL_HINT}") from err


def check_target(module: nn.Module, key: str) -> None:
    """Raise before anything is changed if ``module`` is a bitsandbytes layer this library cannot adapt.

    Raises:
        TypeError: A bitsandbytes layer other than ``Linear8bitLt`` or ``Linear4bit``.
        ImportError: A bitsandbytes layer, but bitsandbytes cannot be imported.
    """
    if not is_bitsandbytes_module(module):
        return
    if quant_kind(module) is None:
        raise TypeError(f"Target module {key} is a bitsandbytes {type(module).__name__}, which is not supported; "
                        f"supported bitsandbytes layers: {', '.join(SUPPORTED)}")
    import_bitsandbytes(f"Target module {key} ({type(module).__name__})")


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module``'s weight is stored quantized (an int8 or packed 4-bit bitsandbytes weight)."""
    kind = quant_kind(module)
    if kind == "4bit":
        return getattr(module.weight, "quant_state", None) is not None
    return kind == "int8" and module.weight.dtype == torch.int8


def _int8_scales(module: nn.Module) -> torch.Tensor:
    """Row scales ``SCB`` (absmax per output row): on the weight before the first forward, then in the state."""
    scb = getattr(module.weight, "SCB", None)
    return scb if scb is not None else module.state.SCB


def _unpacked_4bit(weight) -> tuple[torch.Tensor, Any]:
    """``(data, quant_state)`` in bitsandbytes' canonical layout. On a CPU with AVX512-BF16, an inference
    forward repacks the weight in place; it is unpacked here on copies, leaving the layer as it is."""
    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return weight.data, state
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # no public inverse exists

    return _convert_weight_packed_for_cpu_inverse(weight.data.clone(), copy.deepcopy(state))


def is_repacked(module: nn.Module) -> bool:
    """Whether bitsandbytes repacked ``module``'s 4-bit weight for its CPU inference kernel.

    On a CPU with AVX512-BF16, an inference forward of ``Linear4bit`` (eval mode, input without gradient)
    repacks the weight in place for a bfloat16 kernel that has no backward: a later forward with gradients
    then passes no gradient to its input (measured with bitsandbytes 0.50.2: silently without a bias, an
    error with one), which would leave every adapter before that layer untrained. Adapter layers call
    :func:`unpack` first in that case.
    """
    if _kind_of_class(type(module)) != "4bit":  # every adapter layer asks on every forward: answer fast
        return False
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return state is not None and bool(getattr(state, "packing_format_for_cpu", False))


def unpack(module: nn.Module) -> None:
    """Undo the repacking :func:`is_repacked` detects, in place (bitsandbytes' own inverse)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # no public inverse exists

    weight = module.weight
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    module.quant_state = weight.quant_state
    logger.debug("unpacked the CPU-inference layout of a %s for a forward with gradients", type(module).__name__)


def unpack_all(model: nn.Module) -> None:
    """:func:`unpack` every repacked 4-bit layer of ``model``, adapted or not: a training step needs gradients
    through all of them. Costs one ``sys.modules`` lookup when bitsandbytes was never imported."""
    if "bitsandbytes" not in sys.modules:
        return
    for module in model.modules():
        if is_repacked(module):
            unpack(module)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The base weight as a dense floating tensor of shape ``(out, in)`` (a plain layer's own ``weight.data``).

    A quantized bitsandbytes weight is de-quantized to a new float32 tensor (int8: ``CB * SCB / 127``;
    4 bit: bitsandbytes' ``dequantize_4bit``).
    """
    if not is_quantized(module):
        return module.weight.data
    bnb = import_bitsandbytes()
    if quant_kind(module) == "int8":
        return bnb.functional.int8_vectorwise_dequant(module.weight.data, _int8_scales(module).float()).float()
    data, state = _unpacked_4bit(module.weight)
    return bnb.functional.dequantize_4bit(data, state).float()


def _snapshot(module: nn.Module) -> dict:
    if quant_kind(module) == "int8":
        return {"weight": module.weight, "CB": module.state.CB, "SCB": module.state.SCB}
    return {"weight": module.weight, "quant_state": getattr(module, "quant_state", None)}


def restore_weight(module: nn.Module, snapshot: dict) -> None:
    """Put back the weight :func:`replace_weight` took out (bit-exact undo of a merge)."""
    module.weight = snapshot["weight"]
    if "CB" in snapshot:
        module.state.CB, module.state.SCB = snapshot["CB"], snapshot["SCB"]
    else:
        module.quant_state = snapshot["quant_state"]


def replace_weight(module: nn.Module, weight: torch.Tensor) -> Optional[dict]:
    """Store the dense ``weight`` into ``module``; returns a snapshot for :func:`restore_weight`, or
    ``None`` for a plain weight (written in its own dtype, as before).

    A quantized weight is re-quantized with the layer's settings (int8 row-wise; 4 bit with its
    ``quant_type``, ``blocksize``, double quantization and storage type), rounding once.
    """
    if not is_quantized(module):
        module.weight.data = weight.to(module.weight.dtype).contiguous()
        if quant_kind(module) == "int8":  # float weights: drop the int8 copy bitsandbytes keeps for inference
            module.state.CB = module.state.SCB = None
        return None
    bnb = import_bitsandbytes()
    warnings.warn(
        f"Merging into a bitsandbytes {type(module).__name__} re-quantizes its weight: the merged layer holds "
        "Q(W + dW), within half a quantization step of W + dW (see the docs, 'Quantized base layers'). For a "
        "merge without rounding, call fourierft.quantized.dequantize_model(model) first.", UserWarning, stacklevel=4,
    )
    snapshot = _snapshot(module)
    old = module.weight
    if quant_kind(module) == "int8":
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.to(old.device, torch.float16).contiguous())
        module.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
        module.state.CB = module.state.SCB = None  # filled from the new weight on the next forward
        return snapshot
    data, state = _unpacked_4bit(old)
    new = bnb.nn.Params4bit(
        weight.to("cpu", state.dtype).contiguous(), requires_grad=False, blocksize=old.blocksize,
        compress_statistics=old.compress_statistics, quant_type=old.quant_type, quant_storage=old.quant_storage,
        module=module,
    )
    module.weight = new.to(old.device)  # quantizes
    return snapshot


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace, in place, every bitsandbytes ``Linear8bitLt``/``Linear4bit`` of ``model`` (also the base layers
    inside adapter layers) by a frozen ``nn.Linear`` holding its de-quantized weight.

    Use it to merge into a full-precision copy: ``dequantize_model(peft_model).merge_and_unload()`` merges
    without re-quantization rounding (the merged weights are ``deq(W) + dW`` exactly).

    Args:
        model: Any module, e.g. a ``PeftModel``.
        dtype: Floating dtype of the new weights.

    Returns:
        ``model``.

    Raises:
        ValueError: An adapter is merged into a quantized layer (unmerge it first); nothing is changed.
    """
    found = [(key, m) for key, m in model.named_modules() if is_quantized(m) or quant_kind(m) is not None]
    merged = [key for key, m in model.named_modules() if getattr(m, "_premerge_weights", None)]
    if merged:
        raise ValueError(f"Adapters are merged into the quantized layer {merged[0]}; unmerge them before "
                         "dequantize_model")
    for key, module in found:
        parent_name, _, attr = key.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=module.weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(dense_weight(module))
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        linear.requires_grad_(False)
        setattr(parent, attr, linear)
        logger.info("de-quantized %s (%s) to a %s nn.Linear", key, type(module).__name__, dtype)
    return model
