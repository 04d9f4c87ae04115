r"""FourierFT beyond linear layers: ``nn.Conv2d`` and ``nn.Embedding``.

The weight change keeps FourierFT's definition, :math:`\Delta W = a\,\mathrm{Re}(\mathrm{ifft2}(S))`, on a
2-D view of the weight:

* **Conv2d** (any kernel, stride, padding, dilation and padding mode; ``groups=1``): ``dW`` is defined on the
  flattened ``(out_channels, in_channels * kh * kw)`` weight (flattened in ``(in, kh, kw)`` order, as
  ``weight.reshape(out, -1)``) and reshaped to the kernel. ``d_out = out_channels``,
  ``d_in = in_channels * kh * kw``, and ``n_frequency`` must not exceed their product. Unmerged, the layer
  runs one convolution with ``W + dW`` (``dW`` by one real ``irfft2`` per forward,
  :func:`fourierft.ops.spectral.delta_weight`; the unfolded activations would be ``kh * kw`` times larger than
  the input).
* **Embedding**: ``dW`` is defined on the ``(num_embeddings, embedding_dim)`` table (``d_out`` =
  ``num_embeddings``, ``d_in`` = ``embedding_dim``). Unmerged, only the looked-up rows are computed where
  that is cheaper than the whole table: for a row ``j``,

  .. math::

      \Delta W_{j,:} = \frac{a}{d_{out}}\,\mathrm{Re}\,\mathrm{ifft}(Z_j), \qquad
      Z_j[q_i] \mathrel{+}= c_i\, e^{2\pi i\, p_i j / d_{out}},

  which costs ``O(U (n + d_in log d_in))`` for ``U`` distinct ids, against ``O(d_out d_in log(d_out d_in))``
  for the table (:func:`embedding_path` chooses by a measured cost model).

The adapter tensors and the file layout are those of linear layers (``...fourierft_spectrum``), and the
frequencies are drawn from ``random_loc_seed`` on the 2-D shape above. PEFT has no such layers: its
FourierFT cannot load these adapters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..layer import AdapterLayer, has_hooks
from ..ops import spectral
from .fourierft import FourierFTConfig, FourierFTLayer, FourierFTModel


def _conv_shape(module: nn.Conv2d) -> tuple[int, int, bool]:
    return module.weight[0].numel(), module.out_channels, False


def _embedding_shape(module: nn.Embedding) -> tuple[int, int, bool]:
    return module.embedding_dim, module.num_embeddings, False


class FourierFTConv2d(FourierFTLayer):
    """FourierFT on ``nn.Conv2d`` (``groups=1``): ``dW`` on the flattened ``(out, in * kh * kw)`` weight."""

    layer_shape = staticmethod(_conv_shape)

    @classmethod
    def check_target(cls, module: nn.Module, config: FourierFTConfig, key: str) -> None:
        base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
        if base.groups != 1:
            raise ValueError(f"FourierFT does not support grouped convolutions: {key} has groups={base.groups} "
                             "(only groups=1)")
        super().check_target(module, config, key)

    @classmethod
    def describe_shape(cls, base: nn.Module, key: str) -> str:
        d_in, d_out, _ = _conv_shape(base)
        return f"layer {key}: Conv2d weight {tuple(base.weight.shape)} flattened to ({d_out}, {d_in})"

    def extra_repr(self) -> str:
        return f"dW on ({self.out_features}, {self.in_features}), " + AdapterLayer.extra_repr(self)

    def _kernel_delta(self, adapter_names: Sequence[str]) -> torch.Tensor:
        """Sum of the adapters' ``dW`` as a kernel ``(out, in, kh, kw)`` (differentiable in the spectra)."""
        weight = self.get_base_layer().weight
        spectra = [self.fourierft_spectrum[n] for n in adapter_names]
        delta = spectral.delta_weight(spectra, [self.weight_plan(n) for n in adapter_names],
                                      [self.fourierft_scaling[n] for n in adapter_names])
        return delta.reshape(weight.shape)

    def _fuses_base(self, args: tuple, kwargs: dict) -> bool:
        """Whether one convolution with ``W + dW`` may replace the base call: a plain, frozen Conv2d without
        hooks or extra arguments, with a float32/float64 weight (as in the linear op, ``dW`` is never rounded
        into a bf16/fp16 ``W + dW``, which would lose most of it)."""
        base = self.base_layer
        return (type(base) is nn.Conv2d and not (args or kwargs or has_hooks(base)) and not base.weight.requires_grad
                and base.weight.dtype in (torch.float32, torch.float64))

    def adapter_forward(self, x: torch.Tensor, adapter_names: list[str], *args, **kwargs) -> torch.Tensor:
        base = self.base_layer
        delta = self._kernel_delta(adapter_names)
        if self._fuses_base(args, kwargs):
            return base._conv_forward(x, base.weight + delta.to(base.weight.dtype), base.bias)  # one convolution
        result = base(x, *args, **kwargs)
        return result + self.get_base_layer()._conv_forward(x, delta.to(x.dtype), None).to(result.dtype)

    def mixed_forward(self, x: torch.Tensor, groups: dict[str, torch.Tensor], *args, **kwargs) -> torch.Tensor:
        """One base convolution for the batch, then each adapter's ``conv(x_group, dW)`` added to its samples."""
        out = self.base_layer(x, *args, **kwargs)
        conv = self.get_base_layer()._conv_forward
        for name, index in groups.items():
            delta = conv(x[index], self._kernel_delta([name]).to(x.dtype), None)
            out = out.index_add(0, index, delta.to(out.dtype))
        return out


# Cost model of embedding_path (one thread, torch 2.13, a 2-core AMD EPYC CPU), in ns.
_NS_ROW_UNIT = 10.0  # per distinct id and (n + d_in * log2(d_in)): phases, scatter, inverse FFT
_NS_ROW_OVERHEAD = 100_000.0
_NS_TABLE_POINT = 3.0  # per d_out * d_in * log2(d_out * d_in): ifft2 of the whole table


def embedding_path(distinct_ids: int, num_embeddings: int, dim: int, n_total: int) -> str:
    """``"rows"`` (only the looked-up rows of ``dW``) or ``"table"`` (the whole ``dW`` by ``irfft2``).

    Measured (training step, one thread, n=1000): 50,000 x 768 with 512 ids: rows 27 ms, table 4.5 s;
    5,000 x 256 with 512 ids: rows 18 ms, table 62 ms; 1,000 x 64 with 256 ids: rows 8.5 ms, table 0.9 ms.
    """
    size = num_embeddings * dim
    rows = _NS_ROW_OVERHEAD + _NS_ROW_UNIT * distinct_ids * (n_total + dim * math.log2(max(dim, 2)))
    table = _NS_TABLE_POINT * size * math.log2(max(size, 2))
    return "rows" if rows < table else "table"


@dataclass(frozen=True)
class EmbeddingPlan:
    """An embedding layer's plan: the frequencies on the device (rows route) and the weight plan (table)."""

    indices: torch.Tensor
    weight: spectral.WeightPlan

    def map(self, fn) -> "EmbeddingPlan":
        return EmbeddingPlan(fn(self.indices), self.weight.map(fn))

    def to(self, device) -> "EmbeddingPlan":
        return self.map(lambda t: t.to(device))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"indices": self.indices, **{f"weight.{k}": v for k, v in self.weight.tensors().items()}}


def _embedding_plan(positions: torch.Tensor, d_out: int, d_in: int) -> EmbeddingPlan:
    return EmbeddingPlan(positions.clone(), spectral.make_weight_plan(positions, d_out, d_in))


class FourierFTEmbedding(FourierFTLayer):
    """FourierFT on ``nn.Embedding``: ``dW`` on the ``(num_embeddings, embedding_dim)`` table, added to the
    looked-up rows (``padding_idx`` rows included, as merging changes them too)."""

    layer_shape = staticmethod(_embedding_shape)
    make_plan = staticmethod(_embedding_plan)

    @classmethod
    def check_target(cls, module: nn.Module, config: FourierFTConfig, key: str) -> None:
        base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
        if base.max_norm is not None:
            raise ValueError(f"FourierFT does not support nn.Embedding with max_norm: {key} has "
                             f"max_norm={base.max_norm} (its renormalisation would differ merged and unmerged)")
        super().check_target(module, config, key)

    def extra_repr(self) -> str:
        return f"dW on ({self.out_features}, {self.in_features}), " + AdapterLayer.extra_repr(self)

    def embedding_delta(self, ids: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor:
        """``dW[ids]`` summed over the adapters, shape ``(*ids.shape, embedding_dim)``, float32 or wider."""
        V, D = self.out_features, self.in_features
        flat = ids.reshape(-1)
        if flat.numel() == 0:
            return torch.zeros(*ids.shape, D, dtype=self.fourierft_spectrum[adapter_names[0]].dtype, device=ids.device)
        distinct, inverse = torch.unique(flat, return_inverse=True)
        n_total = sum(self.fourierft_n_frequency[n] for n in adapter_names)
        if embedding_path(distinct.numel(), V, D, n_total) == "table":
            spectra = [self.fourierft_spectrum[n] for n in adapter_names]
            table = spectral.delta_weight(spectra, [self.weight_plan(n) for n in adapter_names],
                                          [self.fourierft_scaling[n] for n in adapter_names])
            return table[flat].reshape(*ids.shape, D)
        rows = sum(spectral.delta_rows(distinct, self.fourierft_spectrum[n], self.plan(n).indices, V, D,
                                       self.fourierft_scaling[n]) for n in adapter_names)
        return rows[inverse].reshape(*ids.shape, D)

    def adapter_forward(self, x: torch.Tensor, adapter_names: list[str], *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)  # raises on bad ids before any spectral work
        return result + self.embedding_delta(x, adapter_names).to(result.dtype)

    def mixed_forward(self, x: torch.Tensor, groups: dict[str, torch.Tensor], *args, **kwargs) -> torch.Tensor:
        """One base lookup for the batch, then each adapter's rows added to its samples."""
        out = self.base_layer(x, *args, **kwargs)
        for name, index in groups.items():
            out = out.index_add(0, index, self.embedding_delta(x[index], [name]).to(out.dtype))
        return out


FourierFTModel.register_layer(nn.Conv2d, FourierFTConv2d)
FourierFTModel.register_layer(nn.Embedding, FourierFTEmbedding)
