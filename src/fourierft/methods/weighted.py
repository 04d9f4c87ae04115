r"""Exact weighted combinations of FourierFT adapters (``add_weighted_adapter(..., combination_type="linear")``).

A FourierFT weight change is linear in its coefficients: :math:`\Delta W = a\,\mathrm{Re}(\mathrm{ifft2}(S))`
with :math:`S[p_i, q_i] = c_i`. Adapters that share their frequency positions at a layer (same shape, ``n``,
``random_loc_seed`` and ``frequency_band``: the usual case) therefore combine exactly:

.. math::

    \sum_k w_k \Delta W_k = a_{new}\,\mathrm{Re}(\mathrm{ifft2}(S_{new})), \qquad
    c_{new} = \sum_k w_k \frac{a_k}{a_{new}} c_k,

and the result is an ordinary FourierFT adapter (PEFT loads its file). Anything else, adapters on different
positions, trained biases or ``modules_to_save`` copies, is refused with what to do instead; nothing is
approximated.
"""

from __future__ import annotations

import copy
import re

import torch

#: What to do when an exact FourierFT combination does not exist.
ALTERNATIVE = (
    "convert each adapter to LoRA first (fourierft.convert_to_lora or save_as_lora; exact at full rank) and "
    "combine the LoRA adapters with peft's add_weighted_adapter(..., combination_type='cat'), which is the "
    "exact weighted sum of their weight changes"
)


def combine_fourierft(tuner, adapters: list[str], weights: list[float], adapter_name: str) -> None:
    """Add ``adapter_name`` to ``tuner`` whose weight change is ``sum(w * dW)`` of ``adapters``, exactly.

    Raises:
        ValueError: The adapters use different frequency positions at some layer or model-wide settings, or
            hold trained biases or ``modules_to_save`` copies; nothing is added.
    """
    configs = [tuner.peft_config[name] for name in adapters]
    _check_configs(adapters, configs)
    layers = [(key, layer) for key, layer in tuner.adapter_layers()
              if any(name in layer.adapter_names() for name in adapters)]
    plan_keys = {key: _shared_plan_key(key, layer, adapters) for key, layer in layers}
    config = _combined_config(configs, plan_keys)
    tuner.inject_adapter(tuner.model, adapter_name, config)
    try:
        with torch.no_grad():
            for key, layer in layers:
                if layer.fourierft_plan_key[adapter_name] != plan_keys[key]:
                    raise ValueError(f"Layer {key}: the combined config does not rebuild the adapters' positions "
                                     f"({layer.fourierft_plan_key[adapter_name]} != {plan_keys[key]})")
                layer.fourierft_spectrum[adapter_name].copy_(_combined_spectrum(layer, adapters, weights,
                                                                                config.scaling))
    except BaseException:
        tuner.delete_adapter(adapter_name)
        raise


def _check_configs(adapters: list[str], configs: list) -> None:
    for name, config in zip(adapters, configs):
        if config.bias != "none" or config.modules_to_save:
            raise ValueError(
                f"Adapter {name!r} trains biases or modules_to_save copies (bias={config.bias!r}, modules_to_save="
                f"{config.modules_to_save}); a weighted sum of those is not part of a FourierFT adapter. Retrain "
                f"with bias='none' and no modules_to_save, or {ALTERNATIVE}"
            )
    for field in ("random_loc_seed", "frequency_band", "fan_in_fan_out"):
        values = {repr(getattr(c, field)) for c in configs}
        if len(values) > 1:
            raise ValueError(
                f"Adapters {adapters} differ in {field} ({', '.join(sorted(values))}), so their frequency positions "
                f"differ and their weighted sum is not a FourierFT adapter; {ALTERNATIVE}"
            )


def _shared_plan_key(key: str, layer, adapters: list[str]) -> tuple:
    """The ``(d_out, d_in, n, seed, band)`` every adapter present at ``layer`` shares."""
    found = {name: layer.fourierft_plan_key[name] for name in adapters if name in layer.adapter_names()}
    if len(set(found.values())) > 1:
        raise ValueError(
            f"Layer {key}: the adapters use different frequency positions (n, seed or band differ: {found}), so "
            f"their weighted sum is not a FourierFT adapter with one set of coefficients; {ALTERNATIVE}"
        )
    return next(iter(found.values()))


def _combined_config(configs: list, plan_keys: dict[str, tuple]):
    """The first config, targeting exactly the combined layers, with each layer's ``n`` as the sources'."""
    config = copy.deepcopy(configs[0])
    counts = {key: plan_key[2] for key, plan_key in plan_keys.items()}
    config.n_frequency = counts[next(iter(counts))]
    config.n_frequency_pattern = {key: n for key, n in counts.items() if n != config.n_frequency}
    config.target_modules = "(" + "|".join(re.escape(key) for key in plan_keys) + ")"
    config.exclude_modules = None
    config.layers_to_transform = None
    config.layers_pattern = None
    config.init_weights = True  # the coefficients are written next; True only avoids drawing them
    if config.scaling == 0:  # a_new divides: take a source's non-zero scaling (all zero: every dW is zero)
        config.scaling = next((c.scaling for c in configs if c.scaling != 0), 1.0)
    return config


def _combined_spectrum(layer, adapters: list[str], weights: list[float], scaling: float) -> torch.Tensor:
    """``sum_k w_k (a_k / a_new) c_k`` over the adapters present at ``layer``, in float64 then cast back."""
    total = None
    for name, weight in zip(adapters, weights):
        if name not in layer.adapter_names():
            continue
        spectrum = layer.fourierft_spectrum[name].detach()
        term = spectrum.double() * (weight * layer.fourierft_scaling[name] / scaling)
        total = term if total is None else total + term
        dtype = spectrum.dtype
    return total.to(dtype)
