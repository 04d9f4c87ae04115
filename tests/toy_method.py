"""A third adapter method written outside the package with the documented API only (docs/adding-a-method.md).

``TOYSCALE`` rescales each output of a Linear layer: ``y = s * (base(x) - b) + b``, merged as
``W' = diag(s) W``. One tensor per adapter, ``toyscale_s`` of shape ``(out,)``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fourierft import AdapterLayer, AdapterModel, TunerConfig, register_method


@dataclasses.dataclass
class ToyScaleConfig(TunerConfig):
    """Args:
        init_weights: ``True`` starts from ``s = 1`` (the identity); ``False`` draws ``s ~ N(1, 0.1)``.
    """

    init_weights: bool = True


class ToyScaleLinear(AdapterLayer):
    adapter_layer_names = ("toyscale_s",)

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: ToyScaleConfig, key: str = "") -> None:
        super().__init__(base_layer)
        self.toyscale_s = nn.ParameterDict()
        self.update_layer(adapter_name, config, key=key)

    def update_layer(self, adapter_name: str, config: ToyScaleConfig, key: str = "") -> None:
        s = torch.ones(self.get_base_layer().out_features)
        if not config.init_weights:
            nn.init.normal_(s, mean=1.0, std=0.1)
        self.toyscale_s[adapter_name] = nn.Parameter(s)

    def adapter_forward(self, x, adapter_names, *args, **kwargs):
        y = self.base_layer(x, *args, **kwargs)
        bias = self.get_base_layer().bias
        for name in adapter_names:
            s = self.toyscale_s[name].to(y.dtype)
            y = y * s if bias is None else (y - bias) * s + bias
        return y

    def merged_weight(self, adapter_name, weight):
        return weight * self.toyscale_s[adapter_name].to(weight.dtype)[:, None]

    def unmerged_weight(self, adapter_name, weight):
        return weight / self.toyscale_s[adapter_name].to(weight.dtype)[:, None]

    def hotswap_values(self, adapter_name, key, new, new_config, config):
        """Optional hook: any new scale of the same shape; a layer the new adapter leaves out gets ``s = 1``."""
        if new is None:
            return {"toyscale_s": torch.ones_like(self.toyscale_s[adapter_name])}
        return super().hotswap_values(adapter_name, key, new, new_config, config)


class ToyScaleModel(AdapterModel):
    prefix = "toyscale_"
    layer_cls = ToyScaleLinear
    target_types = (nn.Linear,)


register_method("TOYSCALE", ToyScaleConfig, ToyScaleModel, default_adapter_lr=1e-2)
