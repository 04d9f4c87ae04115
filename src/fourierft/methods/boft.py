r"""BOFT (Liu et al., ICLR 2024): orthogonal butterfly fine-tuning.

The weight is rotated by a product of ``m`` butterfly factors and rescaled per output:

.. math::

    W' = \mathrm{diag}(s)\, W M^\top, \quad M = B_{m-1} \cdots B_0, \quad
    B_i = P_i\, \mathrm{blockdiag}(Q_{i,1}, \dots, Q_{i,N})\, P_i^\top, \quad Q = (I - S)(I + S)^{-1},

with :math:`S = (R - R^\top)/2` (Cayley, so every block is orthogonal and ``R = 0`` gives the identity).
For a Linear layer the rotation is applied to the activations, ``y = s * (base(x M) - b) + b``, as ``m``
gathers and ``m`` small batched matmuls (:mod:`fourierft.ops.butterfly`); no ``n x n`` matrix is built.
A Conv2d rotates its flattened ``(out, in * kh * kw)`` weight instead (the unfolded activations would be
larger) and then runs the base convolution with all its settings (stride, padding, dilation, mode).

Unlike PEFT without its CUDA extension, ``boft_n_butterfly_factor`` is always honoured.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import warnings

import torch
from torch import nn

from ..config import TunerConfig
from ..contract import register_method
from ..layer import AdapterLayer
from ..mixed_batch import sample_slots
from ..plans import SharedPlans
from ..ops import butterfly
from ..tuner import AdapterModel

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class BOFTConfig(TunerConfig):
    """Configuration of a BOFT adapter (PEFT's fields and defaults).

    Args:
        boft_block_size: Size ``b`` of each orthogonal block; ``n`` must be divisible by it.
        boft_block_num: Number ``N`` of blocks instead (``n = N * b``). Give one of the two: both raise
            ``ValueError``, as in PEFT. Passing only ``boft_block_num`` works here (PEFT rejects it because
            the size defaults to 4).
        boft_n_butterfly_factor: Number ``m`` of butterfly factors (1 = block diagonal, as in OFT).
        boft_dropout: Multiplicative dropout: in training, each block of one random factor is replaced
            by the identity with probability ``p`` (PEFT drops ``int(p * N)`` blocks, so nothing when
            ``p * N < 1``; here the count is rounded at random to keep the mean at ``p * N``).
        bias: ``"none"``, ``"all"`` or ``"boft_only"``.
        init_weights: ``True`` (default) starts from the identity rotation and unit scale; ``False``
            draws ``R ~ N(0, 0.1)`` and ``s ~ N(1, 0.1)``.
    """

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("boft_block_size", "boft_block_num"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        given = self.__dict__.pop("_block_size_given", True)  # set by __init__ below
        if self.boft_block_size and self.boft_block_num:
            if given:
                raise ValueError(
                    f"Set either boft_block_size or boft_block_num, not both (got {self.boft_block_size} and "
                    f"{self.boft_block_num}); the other is derived from the layer width"
                )
            self.boft_block_size = 0  # only the number was given; 4 is the default size
        if not self.boft_block_size and not self.boft_block_num:
            raise ValueError("Set boft_block_size or boft_block_num to a positive value")
        m = self.boft_n_butterfly_factor
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"boft_n_butterfly_factor must be an int >= 1, got {m!r}")
        p = self.boft_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"boft_dropout must be in [0, 1), got {p!r}")


def _note_block_size_given(init):
    """``BOFTConfig.__init__`` that tells ``__post_init__`` whether ``boft_block_size`` was passed: its default, 4,
    cannot be told apart from a 4 the caller gave, and both sizes given is an error (PEFT's) where the number
    alone is not (here)."""
    position = [f.name for f in dataclasses.fields(BOFTConfig) if f.init].index("boft_block_size")

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        self.__dict__["_block_size_given"] = "boft_block_size" in kwargs or len(args) > position
        init(self, *args, **kwargs)

    return __init__


BOFTConfig.__init__ = _note_block_size_given(BOFTConfig.__init__)


def _width(module: nn.Module) -> int:
    """``n``: features the rotation acts on (Conv2d: ``in_channels * kh * kw``)."""
    if isinstance(module, nn.Conv2d):
        return module.weight[0].numel()
    return module.in_features


#: Butterfly plans shared by the live layers of one geometry and device (weak references only).
_PLANS = SharedPlans()


class _BOFTLayer(AdapterLayer):
    """Shared BOFT state and maths; subclasses say how the rotation reaches the output."""

    adapter_layer_names = ("boft_R", "boft_s")
    other_param_names = ("boft_block_size", "boft_block_num", "boft_dropout", "boft_n_butterfly_factor", "_plans")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BOFTConfig, key: str = "") -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        conv = isinstance(base, nn.Conv2d)
        self.in_features = base.in_channels if conv else base.in_features
        self.out_features = base.out_channels if conv else base.out_features
        self.boft_R = nn.ParameterDict()
        self.boft_s = nn.ParameterDict()
        self.boft_block_size: dict[str, int] = {}
        self.boft_block_num: dict[str, int] = {}
        self.boft_dropout: dict[str, float] = {}
        self.boft_n_butterfly_factor: dict[str, int] = {}
        self._plans: dict[str, butterfly.ButterflyPlan] = {}  # on the adapter's device, rebuilt after a move
        self.update_layer(adapter_name, config, key=key)

    @classmethod
    def check_target(cls, module: nn.Module, config: BOFTConfig, key: str) -> tuple[int, int]:
        base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
        if isinstance(base, nn.Conv2d) and base.groups != 1:  # PEFT's type and wording
            raise NotImplementedError(
                f"BOFT does not support Conv2d layers with groups > 1 (got groups={base.groups}).")
        try:
            return butterfly.block_geometry(_width(base), config.boft_block_size, config.boft_block_num,
                                            config.boft_n_butterfly_factor)
        except ValueError as err:
            raise ValueError(f"Layer {key}: {err}") from err

    def update_layer(self, adapter_name: str, config: BOFTConfig, key: str = "") -> None:
        """Create ``boft_R`` ``(m, N, b, b)`` and ``boft_s``; with ``init_weights=False`` draw R then s (PEFT's order)."""
        size, num = self.check_target(self, config, key)
        m = config.boft_n_butterfly_factor
        out = self.out_features  # not weight.shape[0]: a bitsandbytes 4-bit weight is stored packed
        R = torch.zeros(m, num, size, size)
        s = torch.ones(self.scale_shape(out))
        if not config.init_weights:
            nn.init.normal_(R, mean=0.0, std=0.1)
            nn.init.normal_(s, mean=1.0, std=0.1)
        self.boft_R[adapter_name] = nn.Parameter(R)
        self.boft_s[adapter_name] = nn.Parameter(s)
        self.boft_block_size[adapter_name] = size
        self.boft_block_num[adapter_name] = num
        self.boft_dropout[adapter_name] = float(config.boft_dropout)
        self.boft_n_butterfly_factor[adapter_name] = m
        self._plans.pop(adapter_name, None)

    def plan(self, adapter_name: str) -> butterfly.ButterflyPlan:
        """The adapter's butterfly plan on the device of its ``boft_R`` (shared with same-geometry layers).

        After the model moves (``.to()``), the first call builds the plan for the new device; the layer then
        holds that one only.
        """
        plan = self._plans.get(adapter_name)
        device = self.boft_R[adapter_name].device
        if plan is None or plan.device != device:
            geometry = (self.boft_block_num[adapter_name], self.boft_block_size[adapter_name],
                        self.boft_n_butterfly_factor[adapter_name])
            plan = self._plans[adapter_name] = _PLANS.get(
                (*geometry, str(device)), lambda: butterfly.make_butterfly_plan(*geometry, device))
        return plan

    def prepare_plans(self) -> None:
        for name, r in self.boft_R.items():
            if r.device.type != "meta":
                self.plan(name)  # built now, not inside a torch.compile'd forward

    @staticmethod
    def scale_shape(out: int) -> tuple[int, int]:
        return (out, 1)

    def _scale(self, adapter_name: str) -> torch.Tensor:
        """``s`` as a vector of length ``out``."""
        return self.boft_s[adapter_name].reshape(-1)

    def _dropout(self, adapter_name: str, dropout: bool) -> float:
        """The multiplicative dropout probability to apply now (0 outside training or when not asked)."""
        return self.boft_dropout[adapter_name] if dropout and self.training else 0.0

    def rotation_blocks(self, adapter_name: str, dropout: bool = False) -> torch.Tensor:
        """Orthogonal blocks ``Q = cayley(R)`` (float32 or wider), with multiplicative dropout if asked.

        Computed on every call, except inside :func:`~fourierft.cached_merged_weights`, which reuses one
        ``Q`` per ``R`` and version (:func:`~fourierft.ops.butterfly_op.rotation_blocks`)."""
        return butterfly.rotation_blocks(self.boft_R[adapter_name], dropout=self._dropout(adapter_name, dropout))

    def rotated_weight(self, adapter_names: list[str], weight: torch.Tensor, dropout: bool) -> torch.Tensor:
        """``diag(s) W M^T`` for the adapters in order (the weight flattened to ``(out, n)``), >= float32."""
        dtype = torch.promote_types(weight.dtype, torch.float32)
        flat = weight.reshape(weight.shape[0], -1).to(dtype)
        for name in adapter_names:
            flat = butterfly.butterfly_rotate(flat, self.boft_R[name], self.plan(name), transpose=True,
                                              dropout=self._dropout(name, dropout))
            flat = flat * self._scale(name).to(dtype)[:, None]
        return flat.reshape(weight.shape)

    def check_merge(self, adapter_names=None) -> None:
        """Also refuse a scale with zeros: the merge would be finite but could never be undone."""
        for name in self._to_merge(adapter_names):
            self._check_invertible(name)
        super().check_merge(adapter_names)

    def _check_invertible(self, adapter_name: str) -> None:
        if not bool((self._scale(adapter_name) != 0).all()):
            raise ValueError(f"boft_s of adapter {adapter_name} has zero entries: its merge cannot be undone "
                             "(unmerging divides by s)")

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        return self.rotated_weight([adapter_name], weight, dropout=False).to(weight.dtype)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        self._check_invertible(adapter_name)  # dividing by 0 would turn the base weight into NaN
        dtype = torch.promote_types(weight.dtype, torch.float32)
        flat = weight.reshape(weight.shape[0], -1).to(dtype) / self._scale(adapter_name).to(dtype)[:, None]
        flat = butterfly.butterfly_rotate(flat, self.boft_R[adapter_name], self.plan(adapter_name))
        return flat.reshape(weight.shape).to(weight.dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """True: :func:`fourierft.convert_to_lora` converts BOFT Linear and Conv2d layers."""
        return True

    def get_delta_weight(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """PEFT's return value for adapter ``adapter``: the dense rotation ``M`` ``(n, n)`` and the scale ``s``."""
        return butterfly.dense_rotation(self.rotation_blocks(adapter), plan=self.plan(adapter)), self.boft_s[adapter]

    # ------------------------------------------------------------------ hot-swapping
    def hotswap_values(self, adapter_name: str, key: str, new, new_config, config) -> dict[str, torch.Tensor]:
        """The model-shaped ``boft_R`` and ``boft_s`` holding the new adapter: same blocks (``N`` of size
        ``b``) and at most as many butterfly factors ``m' <= m``. Missing factors are ``R = 0``, the identity
        rotation: factor ``i``'s permutation depends only on ``(n, N, b, i)``, never on ``m``, so identity
        factors above ``m'`` leave the ``m'``-factor rotation. An untargeted layer gets ``R = 0, s = 1``."""
        R, s = self.boft_R[adapter_name], self.boft_s[adapter_name]
        if new is None:
            return {"boft_R": torch.zeros_like(R), "boft_s": torch.ones_like(s)}
        new_R, new_s = new["boft_R"], new["boft_s"]
        m, num, size, _ = R.shape
        if new_R.dim() != 4 or tuple(new_R.shape[1:]) != (num, size, size):
            raise ValueError(f"the new boft_R has shape {tuple(new_R.shape)}, the model's adapter {adapter_name!r} "
                             f"has blocks (m, N, b, b) = {tuple(R.shape)}; BOFT adapters can only be swapped with the "
                             f"same blocks (N={num}, b={size})")
        if new_R.shape[0] > m:
            raise ValueError(f"the new adapter has {new_R.shape[0]} butterfly factors, the model's adapter "
                             f"{adapter_name!r} only {m}; call prepare_model_for_hotswap(model, "
                             f"target_n_butterfly_factor={new_R.shape[0]}) before compiling")
        if tuple(new_s.shape) != tuple(s.shape):
            raise ValueError(f"the new boft_s has shape {tuple(new_s.shape)}, the model expects {tuple(s.shape)}")
        padded = torch.zeros(R.shape, dtype=new_R.dtype)
        padded[: new_R.shape[0]] = new_R.detach()
        return {"boft_R": padded, "boft_s": new_s.detach()}

    def hotswap_padding(self, adapter_name: str, key: str, config: BOFTConfig) -> BOFTConfig:
        """Identity factors (``R = 0``) after the layer's own, with its blocks kept (the model's config may give
        a block number instead of a size)."""
        m, num, size, _ = self.boft_R[adapter_name].shape
        target = config.boft_n_butterfly_factor
        if not isinstance(target, int) or isinstance(target, bool) or target < m:
            raise ValueError(f"target_n_butterfly_factor={target!r} must be an int >= its {m} factors")
        config = dataclasses.replace(config, boft_block_size=size, boft_block_num=0)
        try:
            self.check_target(self, config, key)
        except ValueError as err:
            raise ValueError(f"cannot use {target} butterfly factors with {num} blocks of size {size}: {err}") from err
        return config

    def __repr__(self) -> str:
        return "boft." + super().__repr__()


class BOFTLinear(_BOFTLayer):
    """BOFT on ``nn.Linear``: ``y = s * (base(x M) - b) + b``, the rotation applied to the activations."""

    peft_module_type = "boft.Linear"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BOFTConfig, key: str = "") -> None:
        if config.fan_in_fan_out:  # PEFT's correction of the config, with its warning
            warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                          "Setting fan_in_fan_out to False.")
            config.fan_in_fan_out = False
        super().__init__(base_layer, adapter_name, config, key=key)
        self.fan_in_fan_out = False

    def adapter_forward(self, x: torch.Tensor, adapter_names: list[str], *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        z = x
        scale = None
        for name in reversed(adapter_names):  # x M_k ... M_1, which equals merging adapter 1 first
            z = butterfly.butterfly_rotate(z, self.boft_R[name], self.plan(name), dropout=self._dropout(name, True))
        for name in adapter_names:
            s = self._scale(name)
            scale = s if scale is None else scale * s
        y = self.base_layer(z, *args, **kwargs)
        return butterfly.scale_output(y, scale.to(y.dtype), base.bias)


    def mixed_forward(self, x: torch.Tensor, groups: dict[str, torch.Tensor], *args, **kwargs) -> torch.Tensor:
        """Samples rotated by their adapters (one batched pass when the geometries agree), one base matmul,
        then per-sample scales."""
        base = self.get_base_layer()
        names = list(groups)
        slots = sample_slots(self.sample_adapters, x.shape[0], names, x.device)
        z = butterfly.rotate_per_sample(x, [self.rotation_blocks(n, dropout=True) for n in names], slots,
                                        [self.plan(n) for n in names])
        ones = torch.ones(self.out_features, dtype=x.dtype, device=x.device)
        scale = torch.stack([self._scale(n).to(x.dtype) for n in names] + [ones]).index_select(0, slots)
        y = self.base_layer(z, *args, **kwargs)
        scale = scale.view(scale.shape[0], *([1] * (y.dim() - 2)), scale.shape[1]).to(y.dtype)
        if base.bias is None:
            return y * scale
        return (y - base.bias) * scale + base.bias


class BOFTConv2d(_BOFTLayer):
    """BOFT on ``nn.Conv2d`` (any kernel shape, stride, dilation, padding and padding mode; ``groups=1``)."""

    peft_module_type = "boft.Conv2d"

    @staticmethod
    def scale_shape(out: int) -> tuple[int, int]:
        return (1, out)

    def adapter_forward(self, x: torch.Tensor, adapter_names: list[str], *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        weight = self.rotated_weight(adapter_names, base.weight, dropout=True).to(base.weight.dtype)
        # Private API: ``Conv2d._conv_forward(x, weight, bias)`` runs the convolution with every setting of
        # the base layer (padding_mode included) on another weight; the public F.conv2d has no padding_mode
        # and torch.func.functional_call would run the base layer's hooks. tests/test_private_api.py checks it.
        return base._conv_forward(x, weight, base.bias)


class BOFTModel(AdapterModel):
    """Injects BOFT layers into ``nn.Linear`` and ``nn.Conv2d`` modules (PEFT's ``BOFTModel``)."""

    prefix = "boft_"
    layer_cls = BOFTLinear
    target_types = (nn.Linear, nn.Conv2d)
    layer_classes = ((nn.Conv2d, BOFTConv2d),)

    @classmethod
    def hotswap_padded_config(cls, config: BOFTConfig, *, target_n_butterfly_factor=None, **others) -> BOFTConfig:
        """Every layer's number of butterfly factors becomes ``target_n_butterfly_factor`` (``>=`` its current
        one; the block geometry must allow it: ``b`` even, ``N`` divisible by ``2**(m-1)``)."""
        if target_n_butterfly_factor is None or others:
            raise ValueError("BOFT adapters are padded by target_n_butterfly_factor, got "
                             f"{sorted(others) or 'none'}")
        return dataclasses.replace(config, boft_n_butterfly_factor=target_n_butterfly_factor)


    @staticmethod
    def config_from_weights(config: BOFTConfig, tensors: dict[str, torch.Tensor]) -> None:
        """Take the number of butterfly factors from the file's ``boft_R`` (PEFT on CPU saves 1 whatever
        the config says); a file with inconsistent counts is rejected."""
        counts = {t.shape[0] for k, t in tensors.items() if k.endswith(".boft_R") and t.dim() == 4}
        if len(counts) > 1:
            raise ValueError(f"The adapter file mixes boft_R tensors with {sorted(counts)} butterfly factors")
        if counts and counts != {config.boft_n_butterfly_factor}:
            (m,) = counts
            logger.warning(
                "adapter_config.json says boft_n_butterfly_factor=%d but the weights hold %d factor(s) "
                "(PEFT without its CUDA extension silently uses 1); using %d.",
                config.boft_n_butterfly_factor, m, m,
            )
            config.boft_n_butterfly_factor = m


# PEFT < 0.13 saved the butterfly permutations as ``<layer>.boft_P``; they are rebuilt here, never loaded.
register_method("BOFT", BOFTConfig, BOFTModel, legacy_ignored_suffixes=(".boft_P",))
