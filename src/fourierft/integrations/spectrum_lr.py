"""The learning rate a FourierFT spectrum needs, layer by layer, and a warning when it gets far less.

A coefficient ``c_i`` moves the weight of a ``(d_out, d_in)`` layer by ``a / (d_out d_in)`` times a cosine
pattern whose Frobenius norm is about ``sqrt(d_out d_in / 2)`` (``a`` is the adapter's ``scaling``). Adam and
AdamW move every coefficient by about the learning rate ``lr`` per step whatever the size of its gradient, so
one step of all ``n`` coefficients changes the weight by about

.. math::

    \\lVert \\Delta W \\rVert_F \\approx lr \\cdot a \\sqrt{n / (2 d_{out} d_{in})}.

A weight initialised with entries of size ``1/sqrt(d_in)`` (transformers' and torch's schemes, and what
pre-training keeps) has ``||W||_F ~ sqrt(d_out)``. For a step to change the layer by the same *relative*
amount ``step`` at every width, the learning rate has to carry the width:

.. math::

    lr = step \\cdot \\sqrt{2} \\, d_{out} \\sqrt{d_{in}} / (a \\sqrt{n}).

One learning rate for every layer (1e-4 as for LoRA, or even the paper's 5e-2) therefore trains a
384-wide layer and leaves a 4096-wide one nearly where it started; within one model, a feed-forward layer four
times wider than the attention projections needs a four times larger rate. :func:`spectrum_lr` is this rule;
:data:`SPECTRUM_STEP` (2% of the layer per step at the start of training, before the schedule decays it) was
fitted on benchmarks/width_sweep.py and gives 0.045 for a 384 x 384 layer with PEFT's defaults (n=1000,
scaling=150), where the paper's 5e-2 is known to train. Only the optimizer's rate changes: the adapter's
parametrisation and its file are PEFT's. The rule covers FourierFT on ``Linear``, ``Conv1D`` and ``Conv2d``
(flattened kernel); embedding tables keep one fixed learning rate.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterator, Optional

from torch import nn

from ..methods.fourierft import FourierFTLayer
from ..methods.fourierft_layers import FourierFTEmbedding

#: Relative change of a layer's weight per optimizer step that :func:`spectrum_lr` aims at.
SPECTRUM_STEP = 0.02
#: A spectrum trained this many times slower than :func:`spectrum_lr` gets a warning.
TOO_SMALL_FACTOR = 10.0


def spectrum_lr(layer: FourierFTLayer, adapter_name: str, step: float = SPECTRUM_STEP) -> float:
    """Learning rate that moves ``layer``'s weight by the relative amount ``step`` per Adam step.

    Args:
        layer: A FourierFT layer.
        adapter_name: One of its adapters.
        step: Relative change of the weight per step (default :data:`SPECTRUM_STEP`).

    Returns:
        ``step * sqrt(2) * d_out * sqrt(d_in) / (|scaling| * sqrt(n_frequency))``.

    Raises:
        ValueError: ``step`` is not positive, or the adapter's scaling is zero (its spectrum cannot move the
            layer at any learning rate).
    """
    if not step > 0:
        raise ValueError(f"step must be a positive relative change per step, got {step!r}")
    scaling = abs(layer.fourierft_scaling[adapter_name])
    if scaling == 0:
        raise ValueError(f"Adapter {adapter_name!r} has scaling 0: its spectrum cannot change the layer")
    n = layer.fourierft_n_frequency[adapter_name]
    return step * math.sqrt(2.0) * layer.out_features * math.sqrt(layer.in_features) / (scaling * math.sqrt(n))


def describe(layer: FourierFTLayer, adapter_name: str) -> str:
    """``"576x576 n=1000 scaling=150"``: what :func:`spectrum_lr` depends on."""
    return (f"{layer.out_features}x{layer.in_features} n={layer.fourierft_n_frequency[adapter_name]} "
            f"scaling={layer.fourierft_scaling[adapter_name]:g}")


def spectra(model: nn.Module) -> Iterator[tuple[str, FourierFTLayer, str, nn.Parameter]]:
    """``(layer name, layer, adapter name, spectrum)`` for every trainable spectrum of a FourierFT layer on a
    ``Linear``, ``Conv1D`` or ``Conv2d`` of ``model``.

    Embedding tables are left out: their rows are looked up, not multiplied, and their entries are not of size
    ``1/sqrt(d_in)``, so the width rule does not describe them.
    """
    for key, module in model.named_modules():
        if isinstance(module, FourierFTLayer) and not isinstance(module, FourierFTEmbedding):
            for adapter_name, spectrum in module.fourierft_spectrum.items():
                if spectrum.requires_grad:
                    yield key, module, adapter_name, spectrum


def slow_spectra(model: nn.Module, lr_of: Callable[[nn.Parameter], Optional[float]],
                 factor: float = TOO_SMALL_FACTOR) -> list[tuple[str, str, float, float]]:
    """Spectra whose learning rate is ``factor`` or more times below :func:`spectrum_lr`.

    Args:
        model: The model being trained.
        lr_of: The learning rate the optimizer gives a tensor (``None``: not in the optimizer, not checked).
        factor: How much slower than the rule counts as too slow.

    Returns:
        ``(layer name, shape description, lr, needed lr)`` per slow spectrum, in module order.
    """
    slow = []
    for key, layer, adapter_name, spectrum in spectra(model):
        lr = lr_of(spectrum)
        if lr is None or layer.fourierft_scaling[adapter_name] == 0:
            continue
        needed = spectrum_lr(layer, adapter_name)
        if lr * factor <= needed:
            slow.append((f"{key} ({adapter_name!r})", describe(layer, adapter_name), lr, needed))
    return slow


def warn_slow_spectra(model: nn.Module, lr_of: Callable[[nn.Parameter], Optional[float]]) -> bool:
    """Warn once (one ``UserWarning`` for the whole model) if any spectrum trains far too slowly.

    Returns:
        Whether a warning was given.
    """
    slow = slow_spectra(model, lr_of)
    if not slow:
        return False
    key, shape, lr, needed = min(slow, key=lambda s: s[2] / s[3])
    others = f" and {len(slow) - 1} more FourierFT layer(s)" if len(slow) > 1 else ""
    warnings.warn(
        f"FourierFT spectrum learning rate {lr:g} of layer {key} [{shape}]{others} is {needed / lr:,.0f}x "
        f"smaller than the {needed:.3g} this layer needs to change by {SPECTRUM_STEP:.0%} per step, so its weight "
        f"moves about {needed / lr:,.0f}x slower (at 100x and more it barely moves at all). A spectrum coefficient "
        "changes the weight by scaling/(d_out*d_in), so wider layers need larger learning rates. Leave adapter_lr "
        "unset (AdapterTrainer, adapter_param_groups) to get a learning rate per layer from its width, or raise "
        "it.", UserWarning, stacklevel=3)
    return True


def optimizer_lr_of(optimizer) -> Callable[[nn.Parameter], Optional[float]]:
    """``lr_of`` for :func:`slow_spectra` from an optimizer: a group's ``initial_lr`` (its peak before a
    scheduler's warm-up or decay) if set, else its ``lr``."""
    lrs = {}
    for group in optimizer.param_groups:
        lr = group.get("initial_lr", group.get("lr"))
        for param in group["params"]:
            lrs[id(param)] = float(lr) if lr is not None else None
    return lambda param: lrs.get(id(param))
