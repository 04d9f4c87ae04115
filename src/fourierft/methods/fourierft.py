r"""FourierFT (Gao et al., ICML 2024): a weight change learned as ``n`` spectral coefficients.

For a layer ``W0`` of shape ``(d_out, d_in)`` the adapter holds coefficients :math:`c \in \mathbb{R}^n` at
fixed random 2-D frequencies :math:`(p_i, q_i)` and adds

.. math::

    \Delta W = a \cdot \mathrm{Re}\big(\mathrm{ifft2}(S)\big), \qquad S[p_i, q_i] = c_i,

so that :math:`\Delta W_{jk} = \frac{a}{d_{out} d_{in}} \sum_i c_i \cos 2\pi (p_i j / d_{out} + q_i k / d_{in})`.
The frequencies are rebuilt from ``random_loc_seed`` exactly as PEFT draws them, never saved. Unmerged,
the layer applies :math:`\Delta W` to the activations through FFTs (:mod:`fourierft.ops.spectral`) and never
builds the ``d_out x d_in`` matrix; merging adds the dense :math:`\Delta W` once.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import warnings
from typing import Optional

import torch
from torch import nn
from torch.nn.modules import module as _module_registry  # the global hook dicts

from ..config import TunerConfig
from ..contract import register_method
from ..layer import AdapterLayer, SharedPlans, sample_slots
from ..ops import spectral
from ..tuner import AdapterModel

logger = logging.getLogger(__name__)

try:  # transformers' GPT-2 style layer with an (in, out) weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None


@dataclasses.dataclass
class FourierFTConfig(TunerConfig):
    """Configuration of a FourierFT adapter (PEFT's fields and defaults, plus ``frequency_band``).

    Args:
        n_frequency: Number of learnable spectral coefficients per layer (``0 < n <= d_out * d_in``). The
            paper's scripts use 1000 for RoBERTa and LLaMA and 3000 for ViT-base.
        scaling: Multiplier ``a`` of the weight change; the paper's scripts use 29-151 per GLUE task for
            RoBERTa and 300 for LLaMA and ViT.
        random_loc_seed: Seed of the frequency positions (shared by all layers, as in PEFT).
        n_frequency_pattern: Per-layer ``n_frequency``: ``{regex_suffix: n}``, first match wins.
        init_weights: ``True`` starts from zero coefficients (identity); PEFT's default ``False`` draws N(0, 1).
        frequency_band: Not in PEFT; ``None`` (default) draws the positions uniformly like PEFT. ``[center,
            width]`` draws them with a Gaussian band-pass weight on the normalised radial frequency
            (``0`` = lowest, about ``0.7`` = highest), the paper's frequency-bias option. Saved in the config
            and rebuilt on load; PEFT ignores it (with a warning), so such adapters only load correctly here.
    """

    EXTENSION_FIELDS = ("frequency_band",)

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: Optional[int] = 777
    n_frequency_pattern: Optional[dict] = dataclasses.field(default_factory=dict)
    frequency_band: Optional[list] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("n_frequency", self.n_frequency)
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)) or not math.isfinite(self.scaling):
            raise ValueError(f"scaling must be a number and finite, got {self.scaling!r}")
        if not isinstance(self.random_loc_seed, int) or isinstance(self.random_loc_seed, bool):
            raise ValueError(f"random_loc_seed must be an int (it fixes the frequencies), got {self.random_loc_seed!r}")
        if not -(2**63) <= self.random_loc_seed < 2**64:  # torch.Generator.manual_seed's range
            raise ValueError(f"random_loc_seed must be in [-2**63, 2**64), got {self.random_loc_seed!r}")
        if self.n_frequency_pattern is None:
            self.n_frequency_pattern = {}
        if not isinstance(self.n_frequency_pattern, dict):
            raise ValueError(f"n_frequency_pattern must be a dict {{name: n}}, got {self.n_frequency_pattern!r}")
        for key, value in self.n_frequency_pattern.items():
            if not isinstance(key, str):
                raise ValueError(f"n_frequency_pattern keys must be module names or regexes (str), got {key!r}")
            _check_positive_int(f"n_frequency_pattern[{key!r}]", value)
            try:
                re.compile(key)
            except re.error as err:
                raise ValueError(f"n_frequency_pattern key {key!r} is not a valid regex: {err}") from err
        if self.frequency_band is not None:
            band = self.frequency_band
            if not isinstance(band, (list, tuple)) or len(band) != 2:
                raise ValueError(f"frequency_band must be [center, width], got {band!r}")
            center, width = float(band[0]), float(band[1])
            if not (0.0 <= center <= 0.75 and width > 0):
                raise ValueError(
                    f"frequency_band=[center, width] needs 0 <= center <= 0.75 and width > 0, got {band!r}"
                )
            self.frequency_band = [center, width]

    def n_frequency_for(self, key: str) -> int:
        """``n_frequency`` of the module named ``key`` (PEFT's rule: first pattern ``.*\\.{k}$``, then exact)."""
        for pattern, n in self.n_frequency_pattern.items():
            if re.match(rf".*\.{pattern}$", key):
                return n
        return self.n_frequency_pattern.get(key, self.n_frequency)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _features(module: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, is_conv1d)`` of a Linear or transformers Conv1D."""
    if Conv1D is not None and isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return d_in, d_out, True
    return module.in_features, module.out_features, False


_FUSABLE = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (its own or global ones), which skipping the call would lose.

    Private API: torch has no public way to ask whether a module (or the global registry filled by
    ``register_module_forward_hook`` and friends) holds hooks; these dicts are where ``Module.__call__``
    itself looks. tests/test_private_api.py fails loudly if they are renamed.
    """
    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
           getattr(module, "_backward_pre_hooks", None))
    shared = (getattr(_module_registry, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))
    if any(bool(h) for h in (*own, *shared)):
        return True
    # accelerate's hooks (device_map offload, align_devices) replace the instance's forward instead
    return "forward" in module.__dict__ or hasattr(module, "_hf_hook")


PlanKey = tuple  # (d_out, d_in, n, seed, band or None): everything the positions depend on


def frequency_positions(key: PlanKey) -> torch.Tensor:
    """``(2, n)`` positions of ``key`` (PEFT's ``randperm`` draw, or the band-biased one), on the CPU."""
    d_out, d_in, n, seed, band = key
    with torch.device("cpu"):  # real data even while adapters are being created on the meta device
        if band is None:
            return spectral.frequency_indices(d_out, d_in, n, seed)
        return spectral.band_frequency_indices(d_out, d_in, n, seed, band[0], band[1])


#: Positions (CPU) and plans (per device) shared by every live layer and adapter with the same shape, count
#: and seed (PEFT uses one seed for all layers, so usually one per shape): an adapter's own memory is then
#: just its ``n`` coefficients. Weak references only: deleting the models frees them.
_POSITIONS = SharedPlans()
_PLANS = SharedPlans()


def _build_plan(positions: torch.Tensor, key: PlanKey, device: torch.device) -> spectral.SpectralPlan:
    with torch.device("cpu"):
        plan = spectral.make_spectral_plan(positions, key[0], key[1])
    return plan.to(device)


class FourierFTLinear(AdapterLayer):
    """FourierFT on an ``nn.Linear`` or a transformers ``Conv1D`` (``fan_in_fan_out``)."""

    adapter_layer_names = ("fourierft_spectrum",)
    other_param_names = ("fourierft_n_frequency", "fourierft_scaling", "fourierft_random_loc_seed",
                         "fourierft_plan_key", "_positions", "_plans")
    #: ``(d_in, d_out, is_conv1d)`` of the base layer: the shape of the weight ``dW`` is defined on.
    layer_shape = staticmethod(_features)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: FourierFTConfig, key: str = "") -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, is_conv1d = self.layer_shape(base_layer)
        if config.fan_in_fan_out != is_conv1d:
            warnings.warn(
                f"fan_in_fan_out is set to {config.fan_in_fan_out} but the target module is "
                f"`{type(base_layer).__name__}`. Setting fan_in_fan_out to {is_conv1d}."
            )
            config.fan_in_fan_out = is_conv1d
        self.fan_in_fan_out = is_conv1d
        self.fourierft_spectrum = nn.ParameterDict()
        self.fourierft_n_frequency: dict[str, int] = {}
        self.fourierft_scaling: dict[str, float] = {}
        self.fourierft_random_loc_seed: dict[str, int] = {}
        self.fourierft_plan_key: dict[str, PlanKey] = {}  # positions are rebuilt from these, never saved
        self._positions: dict[str, torch.Tensor] = {}  # (2, n) on the CPU, shared through _POSITIONS
        self._plans: dict[str, spectral.SpectralPlan] = {}  # on the adapter's device, rebuilt after a move
        self._merged_cache: Optional[tuple] = None  # (key, spectra snapshots, W + dW), see _merged_for
        self.update_layer(adapter_name, config, key=key)

    @classmethod
    def check_target(cls, module: nn.Module, config: FourierFTConfig, key: str) -> None:
        d_in, d_out, _ = cls.layer_shape(module.get_base_layer() if isinstance(module, AdapterLayer) else module)
        n = config.n_frequency_for(key)
        if n > d_in * d_out:
            raise ValueError(
                f"`n_frequency` should be less than or equal to the product of the input and output dimensions "
                f"but the value passed is {n} and the product is {d_in * d_out} (layer {key}, {d_out}x{d_in})"
            )

    def update_layer(self, adapter_name: str, config: FourierFTConfig, key: str = "") -> None:
        """Create adapter ``adapter_name``: frequencies from the seed, then ``torch.randn(n)`` (PEFT's draw)."""
        n = config.n_frequency_for(key)
        self.check_target(self, config, key)
        band = tuple(config.frequency_band) if config.frequency_band is not None else None
        key = (self.out_features, self.in_features, n, config.random_loc_seed, band)
        positions = _POSITIONS.get(key, lambda: frequency_positions(key))  # a bad value fails before any change
        spectrum = torch.randn(n)  # drawn even when zeroed below, to keep PEFT's RNG stream
        if config.init_weights:
            spectrum = torch.zeros_like(spectrum)
        self.fourierft_spectrum[adapter_name] = nn.Parameter(spectrum)
        self.fourierft_n_frequency[adapter_name] = n
        self.fourierft_scaling[adapter_name] = float(config.scaling)
        self.fourierft_random_loc_seed[adapter_name] = config.random_loc_seed
        self.fourierft_plan_key[adapter_name] = key
        self._positions[adapter_name] = positions
        self._plans.pop(adapter_name, None)

    def plan(self, adapter_name: str) -> spectral.SpectralPlan:
        """The adapter's gather/scatter plan on the device of its spectrum (shared with same-shape layers).

        After the model moves (``.to()``), the first call builds the plan for the new device; the layer then
        holds that one only. Dtype changes (``.half()``) leave plans alone: they stay float32 and int64.
        """
        plan = self._plans.get(adapter_name)
        device = self.fourierft_spectrum[adapter_name].device
        if plan is None or plan.in_bins.device != device:
            key, positions = self.fourierft_plan_key[adapter_name], self._positions[adapter_name]
            plan = self._plans[adapter_name] = _PLANS.get(
                (key, str(device)), lambda: _build_plan(positions, key, device))
        return plan

    @property
    def indices(self) -> dict[str, torch.Tensor]:
        """PEFT's attribute: ``(2, n)`` frequency positions (rows, columns) per adapter, on the CPU."""
        return dict(self._positions)

    def derived_tensors(self, adapter_name: str) -> list[torch.Tensor]:
        return [self._positions[adapter_name]]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The dense ``(d_out, d_in)`` weight change ``a * Re(ifft2(S))`` of adapter ``adapter`` (merging only)."""
        return spectral.dense_delta_weight(
            self.fourierft_spectrum[adapter], self.plan(adapter).indices,
            self.out_features, self.in_features, self.fourierft_scaling[adapter],
        )

    def _oriented_delta(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        delta = self.get_delta_weight(adapter_name).to(weight.device, torch.promote_types(weight.dtype, torch.float32))
        return delta.T if self.fan_in_fan_out else delta

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        delta = self._oriented_delta(adapter_name, weight)
        return (weight.to(delta.dtype) + delta).to(weight.dtype)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        delta = self._oriented_delta(adapter_name, weight)
        return (weight.to(delta.dtype) - delta).to(weight.dtype)

    def delta_output(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """``x @ (sum of the adapters' dW)^T`` without building any ``dW`` (one shared FFT of ``x``)."""
        return spectral.spectral_apply(
            x,
            [self.fourierft_spectrum[n] for n in adapter_names],
            [self.plan(n) for n in adapter_names],
            [self.fourierft_scaling[n] for n in adapter_names],
            self.out_features,
        )

    def _fusable(self, x: torch.Tensor, adapter_names: list[str], args: tuple, kwargs: dict) -> bool:
        """Whether the base product can run inside the adapter's op: a plain frozen Linear/Conv1D (no hooks,
        no autocast, no extra arguments), trained or not."""
        base = self.base_layer
        if args or kwargs or type(base) not in _FUSABLE:
            return False
        if _has_hooks(base) or torch.is_autocast_enabled(x.device.type):
            return False
        if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            return False
        return x.shape[-1] == self.in_features and x.dtype == base.weight.dtype  # else the base layer raises

    # ------------------------------------------------------------------ merged path and its cache
    #: When a layer keeps ``W + dW`` (the merged path's weight) after a forward, for the next one:
    #: ``"train"`` (default) in training-mode forwards that need gradients, which reuse it across the
    #: micro-batches of one optimizer step (gradient accumulation) and in checkpointed recomputation. It
    #: stays until the next forward replaces it (through the optimizer step too), the layer takes the
    #: spectral path, switches between train and eval, merges, moves or loses an adapter: one extra
    #: ``d_out x d_in`` weight per layer, which autograd holds anyway from forward to backward.
    #: ``"always"`` also keeps it in inference (repeated eval forwards and generation then cost what the
    #: frozen layer costs); ``"off"`` never. Set it model-wide with :func:`fourierft.set_merged_weight_cache`.
    #: A kept weight is checked against the spectra exactly and against the base weight's version counter:
    #: write a frozen base weight through ``load_state_dict`` or under ``torch.no_grad()``, not ``.data``.
    merged_cache = "train"

    def _merged_key(self, adapter_names: list[str], weight: torch.Tensor) -> tuple:
        spectra = [self.fourierft_spectrum[n] for n in adapter_names]
        return (tuple(adapter_names), tuple(self.fourierft_scaling[n] for n in adapter_names),
                tuple((s.data_ptr(), s._version, s.dtype) for s in spectra),
                weight.data_ptr(), weight._version, weight.dtype, weight.device, self.fan_in_fan_out)

    def _cached_merged(self, adapter_names: list[str], weight: torch.Tensor) -> Optional[torch.Tensor]:
        """The kept ``W + dW`` if it is exactly that of the current spectra and weight, else ``None``.

        Besides version counters (which an optimizer step or ``load_state_dict`` bumps) the spectra are
        compared with a snapshot, so that writes that bypass them (``p.data.copy_(...)``) are seen too."""
        entry = self._merged_cache
        if entry is None or entry[0] != self._merged_key(adapter_names, weight):
            return None
        if not all(torch.equal(snap, self.fourierft_spectrum[n]) for snap, n in zip(entry[1], adapter_names)):
            return None
        return entry[2]

    def drop_merged_cache(self) -> None:
        """Free the kept ``W + dW`` (also done by ``train()``/``eval()``, merging and deleting adapters)."""
        self._merged_cache = None

    def _merged_for(self, x: torch.Tensor, adapter_names: list[str]) -> tuple[str, Optional[torch.Tensor]]:
        """The path :func:`~fourierft.ops.spectral.choose_path` picks for this forward and, for the merged
        path, ``W + dW`` (kept or built, and kept when the cache policy allows).

        With gradients the path depends only on the shapes, never on whether a weight is kept: a forward that
        gradient checkpointing recomputes in backward must take the path (and save the tensors) of the
        original one."""
        weight = self.base_layer.weight
        spectra = [self.fourierft_spectrum[n] for n in adapter_names]
        training = torch.is_grad_enabled() and (x.requires_grad or any(s.requires_grad for s in spectra))
        if torch.compiler.is_compiling():  # traced graphs keep the activation path: no cache, no sparse kernels
            return "spectral", None
        mode = self.merged_cache
        # a kept weight may serve this forward: training-mode layers (also the no-grad first pass of reentrant
        # checkpointing), or any forward with "always"; never inference-mode tensors (no version counter)
        inference_tensors = torch.is_inference_mode_enabled() or weight.is_inference() or any(
            s.is_inference() for s in spectra)
        usable = not inference_tensors and (mode == "always" or (mode == "train" and self.training))
        store = usable and (mode == "always" or training)
        cached = self._cached_merged(adapter_names, weight) if usable else None
        path = spectral.choose_path(
            x.numel() // self.in_features, self.out_features, self.in_features, sum(s.numel() for s in spectra),
            training, fused=True, dtype=weight.dtype,
            cached=not training and (cached is not None or mode == "always"))
        if path != "merged" or not usable:
            self._merged_cache = None  # nothing kept that this layer does not use
        if path != "merged":
            return path, None
        if cached is None:
            plans, scalings = [self.plan(n) for n in adapter_names], [self.fourierft_scaling[n] for n in adapter_names]
            cached = spectral.merged_weight(weight, spectra, plans, scalings, transposed=self.fan_in_fan_out)
            if store:
                snapshots = tuple(s.detach().clone() for s in spectra)
                self._merged_cache = (self._merged_key(adapter_names, weight), snapshots, cached)
        elif not store:
            self._merged_cache = None
        return path, cached

    def prepare_plans(self) -> None:
        self.drop_merged_cache()  # called after the model moves: a kept weight is on the old device
        for name, spectrum in self.fourierft_spectrum.items():
            if spectrum.device.type != "meta":
                self.plan(name)  # built now, so that a torch.compile'd forward only looks it up

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_merged_cache"] = None  # pickling or deep-copying a model does not copy the kept weight
        return state

    def train(self, mode: bool = True):
        if mode != self.training:  # Trainer calls train() every step: keep the cache across those
            self.drop_merged_cache()
        return super().train(mode)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        self.drop_merged_cache()
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_last(self) -> None:
        self.drop_merged_cache()
        super().unmerge_last()

    def delete_adapter(self, adapter_name: str) -> None:
        self.drop_merged_cache()
        super().delete_adapter(adapter_name)

    def adapter_forward(self, x: torch.Tensor, adapter_names: list[str], *args, **kwargs) -> torch.Tensor:
        if self._fusable(x, adapter_names, args, kwargs):
            path, merged = self._merged_for(x, adapter_names)
            return spectral.linear_spectral_apply(
                x, self.base_layer.weight, self.base_layer.bias,
                [self.fourierft_spectrum[n] for n in adapter_names], [self.plan(n) for n in adapter_names],
                [self.fourierft_scaling[n] for n in adapter_names], transposed=self.fan_in_fan_out,
                path=path, merged=merged,
            )
        base = self.base_layer
        result = base(x, *args, **kwargs)
        delta = self.delta_output(x, adapter_names).to(result.dtype)
        if type(base) in _FUSABLE and not (_has_hooks(base) or args or kwargs):  # a fresh tensor of ours
            return result.add_(delta)
        return result + delta

    def mixed_forward(self, x: torch.Tensor, groups: dict[str, torch.Tensor], *args, **kwargs) -> torch.Tensor:
        """One base matmul for the whole batch; adapters sharing frequency positions (the usual case: same
        shape, ``n`` and seed) then share one FFT pass with a coefficient row per sample."""
        out = self.base_layer(x, *args, **kwargs)
        by_key: dict[PlanKey, list[str]] = {}
        for name in groups:
            by_key.setdefault(self.fourierft_plan_key[name], []).append(name)
        for names in by_key.values():
            spectra = [self.fourierft_spectrum[n] for n in names]
            scalings = [self.fourierft_scaling[n] for n in names]
            plan = self.plan(names[0])
            if len(by_key) == 1:  # the whole batch; samples without adapter get a zero row
                slots = sample_slots(self.sample_adapters, x.shape[0], names, x.device)
                out = out + spectral.spectral_apply_per_sample(x, spectra, plan, scalings, slots).to(out.dtype)
                continue
            index = torch.cat([groups[n] for n in names])
            slots = torch.cat([torch.full_like(groups[n], i) for i, n in enumerate(names)])
            delta = spectral.spectral_apply_per_sample(x[index], spectra, plan, scalings, slots)
            out = out.index_add(0, index, delta.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()

    def __repr__(self) -> str:
        return "fourierft." + super().__repr__()


MERGED_CACHE_MODES = ("train", "always", "off")


def set_merged_weight_cache(model: nn.Module, mode: str) -> int:
    """Set :attr:`FourierFTLinear.merged_cache` on every FourierFT linear layer of ``model``.

    Args:
        model: a :class:`~fourierft.PeftModel`, an injected model, or any module holding FourierFT layers.
        mode: ``"train"`` (the default), ``"always"`` or ``"off"``.

    Returns:
        The number of layers set (kept weights are freed when the new mode does not keep them).

    Raises:
        ValueError: on an unknown mode, or if ``model`` holds no FourierFT linear layer.
    """
    if mode not in MERGED_CACHE_MODES:
        raise ValueError(f"unknown merged-weight cache mode {mode!r}: expected one of {MERGED_CACHE_MODES}")
    layers = [m for m in model.modules() if isinstance(m, FourierFTLinear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no FourierFT linear layer")
    for layer in layers:
        layer.merged_cache = mode
        layer.drop_merged_cache()
    return len(layers)


class FourierFTModel(AdapterModel):
    """Injects :class:`FourierFTLinear` layers into a model (PEFT's ``FourierFTModel``); ``nn.Conv2d`` and
    ``nn.Embedding`` get the layers of :mod:`fourierft.methods.fourierft_layers`."""

    prefix = "fourierft_"
    layer_cls = FourierFTLinear
    linear_types = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
    target_types = linear_types
    default_target_overrides = {"gpt2": ["mlp.c_proj"], "gpt_bigcode": ["mlp.c_proj"]}
    #: Other base-layer types and the adapter layer class for each (filled by :meth:`register_layer`).
    extra_layer_classes: dict = {}

    @classmethod
    def register_layer(cls, base_type: type, layer_class: type[AdapterLayer]) -> None:
        """Let FourierFT wrap ``base_type`` modules with ``layer_class`` (``"all-linear"`` still means linear)."""
        cls.extra_layer_classes[base_type] = layer_class
        if base_type not in cls.target_types:
            cls.target_types = cls.target_types + (base_type,)

    @classmethod
    def layer_class_for(cls, module: nn.Module) -> type[AdapterLayer]:
        base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
        for base_type, layer_class in cls.extra_layer_classes.items():
            if isinstance(base, base_type):
                return layer_class
        return FourierFTLinear


# The official GLUE and instruction-tuning scripts train the spectrum at 0.05 to 0.12 (scaling 29 to 300), far
# above a head's learning rate: AdapterTrainer uses 5e-2 for it unless told otherwise.
register_method("FOURIERFT", FourierFTConfig, FourierFTModel, default_adapter_lr=5e-2)
