r"""FourierFT (Gao et al., ICML 2024): a weight change learned as ``n`` spectral coefficients.

For a layer ``W0`` of shape ``(d_out, d_in)`` the adapter holds coefficients :math:`c \in \mathbb{R}^n` at
fixed random 2-D frequencies :math:`(p_i, q_i)` and adds

.. math::

    \Delta W = a \cdot \mathrm{Re}\big(\mathrm{ifft2}(S)\big), \qquad S[p_i, q_i] = c_i,

so that :math:`\Delta W_{jk} = \frac{a}{d_{out} d_{in}} \sum_i c_i \cos 2\pi (p_i j / d_{out} + q_i k / d_{in})`.
The frequencies are rebuilt from ``random_loc_seed`` exactly as PEFT draws them, never saved. A layer holds
its coefficients and plans (derived from the seed and the shape), nothing that depends on the coefficients'
values. Its forward hands them to :func:`fourierft.ops.spectral_op.fourierft_linear`, which picks a route per
call (on the activations through FFTs, or one GEMM on ``W + dW`` built for that call or reused inside
:func:`~fourierft.cached_merged_weights`) and says which with :func:`~fourierft.explain_routes`. Merging adds the dense
:math:`\Delta W` of :func:`fourierft.ops.spectral.delta_weight` once.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
import warnings
from types import MappingProxyType
from typing import Mapping, Optional

import torch
from torch import nn

from ..config import TunerConfig
from ..contract import register_method
from ..layer import AdapterLayer, has_hooks
from ..mixed_batch import sample_slots
from ..plans import SharedPlans
from ..ops import _native, spectral
from ..ops._placement import on_real_cpu, place
from ..ops.spectral_op import fourierft_linear
from ..tuner import AdapterModel
from .weighted import combine_fourierft

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


PlanKey = tuple  # (d_out, d_in, n, seed, band or None): everything the positions depend on


def frequency_positions(key: PlanKey) -> torch.Tensor:
    """``(2, n)`` positions of ``key`` (PEFT's ``randperm`` draw, or the band-biased one), real and on the CPU
    even while adapters are created on the meta device or inside ``FakeTensorMode``."""
    d_out, d_in, n, seed, band = key
    if band is None:
        return on_real_cpu(spectral.frequency_indices, d_out, d_in, n, seed)
    return on_real_cpu(spectral.band_frequency_indices, d_out, d_in, n, seed, band[0], band[1])


#: Positions (CPU) and plans (per device and plan type) shared by every live layer and adapter with the same
#: shape, count and seed (PEFT uses one seed for all layers, so usually one per shape): an adapter's own memory
#: is then just its ``n`` coefficients. Weak references only: deleting the models frees them.
_POSITIONS = SharedPlans()
_PLANS = SharedPlans()


class FourierFTLayer(AdapterLayer):
    """What every FourierFT layer shares: coefficients, frequencies, plans, the dense ``dW`` for merging.

    Subclasses set :attr:`layer_shape` (the 2-D shape ``dW`` is defined on) and :meth:`make_plan` (what their
    forward reads), and implement the forward.
    """

    adapter_layer_names = ("fourierft_spectrum",)
    other_param_names = ("fourierft_n_frequency", "fourierft_scaling", "fourierft_random_loc_seed",
                         "fourierft_plan_key", "_positions", "_plans")
    #: ``(d_in, d_out, is_conv1d)`` of the base layer: the shape of the weight ``dW`` is defined on.
    layer_shape = None

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
        self._plans: dict[str, object] = {}  # on the adapter's device, rebuilt after a move
        self.update_layer(adapter_name, config, key=key)

    @staticmethod
    def make_plan(positions: torch.Tensor, d_out: int, d_in: int):
        """The plan this layer's forward reads, from CPU positions (default: what building ``dW`` needs)."""
        return spectral.make_weight_plan(positions, d_out, d_in)

    @classmethod
    def check_target(cls, module: nn.Module, config: FourierFTConfig, key: str) -> None:
        """The one ``n_frequency`` check (``n <= d_out * d_in`` of :attr:`layer_shape`), in PEFT's words."""
        base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
        d_in, d_out, _ = cls.layer_shape(base)
        n = config.n_frequency_for(key)
        if n > d_in * d_out:
            raise ValueError(
                f"`n_frequency` should be less than or equal to the product of the input and output dimensions "
                f"but the value passed is {n} and the product is {d_in * d_out} ({cls.describe_shape(base, key)})"
            )

    @classmethod
    def describe_shape(cls, base: nn.Module, key: str) -> str:
        """``"layer lin1, 2x20"``: the layer and the 2-D shape ``dW`` is defined on, for error messages."""
        d_in, d_out, _ = cls.layer_shape(base)
        return f"layer {key}, {d_out}x{d_in}"

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

    def plan(self, adapter_name: str):
        """The adapter's plan (:meth:`make_plan`) on the device of its spectrum, shared with same-shape layers.

        After the model moves (``.to()``), the first call builds the plan for the new device; the layer then
        holds that one only. Dtype changes (``.half()``) leave plans alone: they stay float32 and integer.
        """
        plan = self._plans.get(adapter_name)
        device = self.fourierft_spectrum[adapter_name].device
        if plan is None or _plan_device(plan) != device:
            key, positions = self.fourierft_plan_key[adapter_name], self._positions[adapter_name]
            build = type(self).make_plan
            plan = self._plans[adapter_name] = _PLANS.get(
                (build, key, str(device)), lambda: _move_plan(on_real_cpu(build, positions, key[0], key[1]), device))
        return plan

    def weight_plan(self, adapter_name: str) -> spectral.WeightPlan:
        plan = self.plan(adapter_name)
        return plan if isinstance(plan, spectral.WeightPlan) else plan.weight

    @property
    def indices(self) -> Mapping[str, torch.Tensor]:
        """PEFT's attribute: ``(2, n)`` frequency positions (rows, columns) per adapter, on the CPU.

        A live read-only view: a reference taken earlier follows ``update_layer`` and ``delete_adapter``, as
        PEFT's one dict does. It cannot be written to, since the plans are derived from these positions."""
        return MappingProxyType(self._positions)

    def derived_tensors(self, adapter_name: str) -> list[torch.Tensor]:
        return [self._positions[adapter_name]]

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """True: :func:`fourierft.convert_to_lora` converts every FourierFT layer type (Conv1D included)."""
        return True

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The dense ``(d_out, d_in)`` weight change ``a * Re(ifft2(S))`` of adapter ``adapter``."""
        spectrum = self.fourierft_spectrum[adapter]
        return spectral.delta_weight([spectrum], [self.weight_plan(adapter)],
                                     [self.fourierft_scaling[adapter]]).to(spectrum.dtype)

    def _oriented_delta(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        delta = self.get_delta_weight(adapter_name).to(weight.device, torch.promote_types(weight.dtype, torch.float32))
        delta = delta.T if self.fan_in_fan_out else delta
        return delta.reshape(weight.shape)

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        delta = self._oriented_delta(adapter_name, weight)
        return (weight.to(delta.dtype) + delta).to(weight.dtype)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        delta = self._oriented_delta(adapter_name, weight)
        return (weight.to(delta.dtype) - delta).to(weight.dtype)

    # ------------------------------------------------------------------ hot-swapping
    def hotswap_values(self, adapter_name: str, key: str, new: Optional[dict], new_config: Optional[FourierFTConfig],
                       config: FourierFTConfig) -> dict[str, torch.Tensor]:
        """The model-shaped spectrum holding the new adapter: zero-padded, its scaling folded in.

        The new adapter's frequency positions must be the first ``n'`` of the model's ``n`` (``n' <= n``).
        Positions are ``randperm(d_out * d_in, seed)[:n]``, and the first ``n'`` entries of one seeded
        permutation do not depend on how many are kept: an adapter with ``n'`` coefficients *is* the adapter
        with ``n`` coefficients whose last ``n - n'`` are zero (same seed, same shape), so a smaller adapter
        with the same ``random_loc_seed`` and ``frequency_band`` is zero-padded (the band draw keeps the top
        ``n`` of one seeded ordering, nested in the same way; ``tests/test_hotswap.py`` checks both draws
        against the drawing code, so nothing is redrawn here). A different ``scaling`` is folded into the
        coefficients (``dW`` is linear in ``c``), because the layer's scaling is a Python float a compiled
        graph is specialised on. An untargeted layer gets ``c = 0``, the identity.
        """
        current = self.fourierft_spectrum[adapter_name]
        n = current.shape[0]
        if new is None:
            return {"fourierft_spectrum": torch.zeros_like(current)}
        c = new["fourierft_spectrum"]
        if c.dim() != 1:
            raise ValueError(f"fourierft_spectrum must be 1-D, got shape {tuple(c.shape)}")
        new_config = new_config or config
        n_new, scaling, new_scaling = c.shape[0], float(config.scaling), float(new_config.scaling)
        if new_config is not config and new_config.n_frequency_for(key) != n_new:
            raise ValueError(f"the new adapter's config gives n_frequency={new_config.n_frequency_for(key)} but its "
                             f"fourierft_spectrum holds {n_new} coefficients")
        if n_new > n:
            raise ValueError(f"the new adapter has n_frequency={n_new}, the model's adapter {adapter_name!r} only {n}; "
                             f"call prepare_model_for_hotswap(model, target_n_frequency={n_new}) before compiling")
        if (new_config.random_loc_seed, _band(new_config)) != (config.random_loc_seed, _band(config)):
            raise ValueError(
                f"the new adapter's frequency positions (random_loc_seed={new_config.random_loc_seed}, "
                f"frequency_band={new_config.frequency_band}) are not the model's (random_loc_seed="
                f"{config.random_loc_seed}, frequency_band={config.frequency_band}); FourierFT adapters swap only "
                "with the same seed and band")
        if scaling == 0 and new_scaling != 0:
            raise ValueError(f"the model's adapter has scaling=0, which no coefficients can rescale to "
                             f"scaling={new_scaling}")
        value = torch.zeros(n, dtype=torch.float64)
        value[:n_new] = c.detach().to(torch.float64) * (1.0 if new_scaling == scaling else new_scaling / scaling)
        return {"fourierft_spectrum": value}

    def hotswap_padding(self, adapter_name: str, key: str, config: FourierFTConfig) -> FourierFTConfig:
        """Zero coefficients at the next positions of the seeded permutation: the first ``n`` stay where they
        are (:meth:`hotswap_values`), so the outputs do not change."""
        n, target = self.fourierft_spectrum[adapter_name].shape[0], config.n_frequency
        if not isinstance(target, int) or isinstance(target, bool) or target < n:
            raise ValueError(f"target_n_frequency={target!r} must be an int >= its n_frequency {n}")
        self.check_target(self, config, key)
        return config

    def _adapter_args(self, adapter_names: list[str]) -> tuple[list, list, list]:
        return ([self.fourierft_spectrum[n] for n in adapter_names], [self.plan(n) for n in adapter_names],
                [self.fourierft_scaling[n] for n in adapter_names])

    def prepare_plans(self) -> None:
        for name, spectrum in self.fourierft_spectrum.items():
            if spectrum.device.type != "meta":
                self.plan(name)  # built now, so that a torch.compile'd forward only looks it up
            if spectrum.device.type == "cpu" and type(spectrum.data) is torch.Tensor:
                _native.available()  # the CPU kernels too (built once per machine, loaded once per process)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()

    def __repr__(self) -> str:
        return "fourierft." + super().__repr__()


def _band(config: FourierFTConfig):
    return tuple(config.frequency_band) if config.frequency_band is not None else None


def _plan_device(plan) -> torch.device:
    return next(iter(plan.tensors().values())).device


def _move_plan(plan, device: torch.device):
    """The real CPU plan on ``device`` (a fake tensor plan inside ``FakeTensorMode``)."""
    return plan.map(lambda t: place(t, device))


class FourierFTLinear(FourierFTLayer):
    """FourierFT on an ``nn.Linear`` or a transformers ``Conv1D`` (``fan_in_fan_out``)."""

    layer_shape = staticmethod(_features)
    make_plan = staticmethod(spectral.make_spectral_plan)

    def _fuses_base(self, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
        """Whether the op may compute the base product itself: a plain, frozen, fully materialised Linear or
        Conv1D (no hooks, e.g. DeepSpeed's or accelerate's; no autocast; no extra arguments)."""
        base = self.base_layer
        if args or kwargs or type(base) not in _FUSABLE or has_hooks(base):
            return False
        weight, bias = base.weight, base.bias
        autocast = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)  # meta has no autocast
        if autocast or weight.requires_grad or (bias is not None and bias.requires_grad):
            return False
        # a wrong input width or dtype goes to the base layer, which raises its own error (as in peft)
        return (x.dtype == weight.dtype and x.shape[-1] == self.in_features
                and weight.numel() == self.in_features * self.out_features)

    def adapter_forward(self, x: torch.Tensor, adapter_names: list[str], *args, **kwargs) -> torch.Tensor:
        spectra, plans, scalings = self._adapter_args(adapter_names)
        base = self.base_layer
        if self._fuses_base(x, args, kwargs):
            return fourierft_linear(x, spectra, plans, scalings, weight=base.weight, bias=base.bias,
                                    transposed=self.fan_in_fan_out)
        result = base(x, *args, **kwargs)
        return result + fourierft_linear(x, spectra, plans, scalings).to(result.dtype)

    def mixed_forward(self, x: torch.Tensor, groups: dict[str, torch.Tensor], *args, **kwargs) -> torch.Tensor:
        """One base matmul for the whole batch; adapters sharing frequency positions (the usual case: same
        shape, ``n`` and seed) then share one FFT pass with a coefficient row per sample."""
        out = self.base_layer(x, *args, **kwargs)
        by_key: dict[PlanKey, list[str]] = {}
        for name in groups:
            by_key.setdefault(self.fourierft_plan_key[name], []).append(name)
        for names in by_key.values():
            spectra, plans, scalings = self._adapter_args(names)
            if len(by_key) == 1:  # the whole batch; samples without adapter get a zero row
                slots = sample_slots(self.sample_adapters, x.shape[0], names, x.device)
                out = out + fourierft_linear(x, spectra, plans, scalings, slots=slots).to(out.dtype)
                continue
            index = torch.cat([groups[n] for n in names])
            slots = torch.cat([torch.full_like(groups[n], i) for i, n in enumerate(names)])
            delta = fourierft_linear(x[index], spectra, plans, scalings, slots=slots)
            out = out.index_add(0, index, delta.to(out.dtype))
        return out


class FourierFTModel(AdapterModel):
    """Injects :class:`FourierFTLinear` layers into a model (PEFT's ``FourierFTModel``); ``nn.Conv2d`` and
    ``nn.Embedding`` get the layers of :mod:`fourierft.methods.fourierft_layers`."""

    prefix = "fourierft_"
    layer_cls = FourierFTLinear
    linear_types = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
    target_types = linear_types  # and the types fourierft_layers registers (register_layer)
    default_target_overrides = {"gpt2": ["mlp.c_proj"], "gpt_bigcode": ["mlp.c_proj"]}
    #: ``add_weighted_adapter``: exact for adapters sharing frequency positions (:mod:`.weighted`).
    combine_weighted = combine_fourierft

    @classmethod
    def hotswap_padded_config(cls, config: FourierFTConfig, *, target_n_frequency: Optional[int] = None,
                              **others) -> FourierFTConfig:
        """Every layer's ``n_frequency`` becomes ``target_n_frequency`` (``>=`` its current one)."""
        if target_n_frequency is None or others:
            raise ValueError(f"FourierFT adapters are padded by target_n_frequency, got {sorted(others) or 'none'}")
        padded = copy.deepcopy(config)
        padded.n_frequency, padded.n_frequency_pattern = target_n_frequency, {}
        return padded


# The official GLUE and instruction-tuning scripts train the spectrum at 0.05 to 0.12 (scaling 29 to 300), far
# above a head's learning rate: AdapterTrainer uses 5e-2 for it unless told otherwise.
register_method("FOURIERFT", FourierFTConfig, FourierFTModel, default_adapter_lr=5e-2)
