"""Parameters an engine keeps partitioned across processes, and gathering them for a moment.

Under DeepSpeed ZeRO-3 every parameter outside its module's forward is an empty placeholder
(``param.shape == (0,)``); the full tensor exists only inside ``deepspeed.zero.GatheredParameters`` (or while
the module runs). Code that reads or writes adapter or base tensors outside a forward -- saving, state dicts,
merging, loading, hot-swapping -- gathers them here first. Gathering is a collective: every rank must make
the same call, as ``save_pretrained(is_main_process=...)`` already asks.

Nothing here imports DeepSpeed unless a partitioned parameter is met (then DeepSpeed is installed: it made
the parameter). Other engines are only recognised: a tensor whose shape is not its module's (FSDP1's flat
shards) makes :func:`check_full` refuse with a message saying how to gather.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional

import torch

__all__ = ["PartitionedError", "check_full", "check_gatherable", "declared_weight_shape", "full_shape", "gathered",
           "is_partitioned"]


class PartitionedError(RuntimeError):
    """A tensor that is only a shard or a placeholder was about to be read as the whole tensor."""


def is_partitioned(tensor: object) -> bool:
    """Whether ``tensor`` is a DeepSpeed ZeRO-3 parameter (its data may be an empty placeholder)."""
    return isinstance(tensor, torch.Tensor) and hasattr(tensor, "ds_id") and hasattr(tensor, "ds_shape")


def full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The shape ``tensor`` has when gathered (its own shape if it is not partitioned)."""
    return tuple(tensor.ds_shape) if is_partitioned(tensor) else tuple(tensor.shape)


@contextlib.contextmanager
def gathered(tensors: Iterable[Optional[torch.Tensor]], modify: bool = False) -> Iterator[None]:
    """Make the full data of every ZeRO-3 parameter among ``tensors`` available inside the block.

    A collective under ZeRO-3: every rank must enter it with the same tensors. Does nothing when no tensor
    is partitioned.

    Args:
        tensors: Parameters (``None`` entries are skipped).
        modify: The block writes to the parameters: on leaving, rank 0's values are sent to every rank
            before the parameters are partitioned again (every rank should have computed the same values).
    """
    parts = list({id(t): t for t in tensors if is_partitioned(t)}.values())
    if not parts:
        yield
        return
    from deepspeed import zero  # optional dependency, installed: it partitioned these parameters
    with zero.GatheredParameters(parts, modifier_rank=0 if modify else None):
        yield


def check_full(tensor: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    """Refuse a shard or an empty placeholder where the whole tensor of ``shape`` is needed.

    Raises:
        PartitionedError: ``tensor.shape != shape``; the message names ``what`` and how to gather it.
    """
    if tuple(tensor.shape) == tuple(shape):
        return
    raise PartitionedError(
        f"{what} has shape {tuple(tensor.shape)}, not its full shape {tuple(shape)}: it is a shard or a placeholder "
        "of a partitioned model (DeepSpeed ZeRO-3, FSDP). Call this on every rank on the model itself (fourierft "
        "gathers ZeRO-3 parameters), gather first (deepspeed.zero.GatheredParameters; FSDP1: "
        "FullyShardedDataParallel.summon_full_params(model, writeback=True); FSDP2: "
        "get_model_state_dict(..., full_state_dict=True)), or save the adapter and use it on an unsharded model."
    )


def declared_weight_shape(module: torch.nn.Module) -> Optional[tuple[int, ...]]:
    """The weight shape a plain ``Linear`` / ``Conv*d`` declares, ``None`` for other (e.g. quantized) layers."""
    nn = torch.nn
    if type(module) is nn.Linear:
        return (module.out_features, module.in_features)
    if type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
    return None


def check_gatherable(module: torch.nn.Module, what: str) -> None:
    """Refuse a base layer whose weight is a shard fourierft cannot gather (FSDP1's flat views, FSDP2's DTensors).

    A ZeRO-3 parameter passes: :func:`gathered` makes it whole.

    Raises:
        PartitionedError: The weight is a DTensor, or its shape is not the one the layer declares.
    """
    shape, weight = declared_weight_shape(module), getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and hasattr(weight, "placements"):  # a DTensor: FSDP2, tensor parallel
        raise PartitionedError(
            f"The base weight of {what} is a DTensor sharded over processes (FSDP2 / tensor parallel): merge the "
            "adapter into an unsharded model (save it, load it onto the base model in one process, merge there)"
        )
    if shape is not None and isinstance(weight, torch.Tensor) and not is_partitioned(weight):
        check_full(weight, shape, f"The base weight of {what}")
