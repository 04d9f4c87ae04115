"""Adapter weights files: safetensors (preferred) or a weights-only ``torch.save``, with a checksum."""

from __future__ import annotations

import hashlib

import safetensors
import safetensors.torch
import torch

SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"
#: Weights files in order of preference.
WEIGHTS_NAMES = (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)
#: SHA-256 of the tensors themselves, written by fourierft into safetensors metadata: safetensors has no
#: checksum, so without it a damaged byte in the payload would load silently as a wrong value.
CHECKSUM_KEY = "fourierft_tensors_sha256"


class CheckpointError(ValueError):
    """An adapter file does not fit the model (missing, unexpected or mis-shaped tensors) or is unreadable."""


def save_tensors(tensors: dict[str, torch.Tensor], path: str, safe: bool, metadata: dict[str, str]) -> None:
    """Write tensors to ``path`` (safetensors or a weights-only ``torch.save``)."""
    seen, clean = set(), {}
    for key, value in tensors.items():
        value = value.detach()
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset()) if value.device.type != "meta" else None
        if ptr in seen:
            value = value.clone()
        seen.add(ptr)
        clean[key] = value.contiguous().cpu()
    if safe:  # looked up at call time (tests replace it to simulate a full disk)
        safetensors.torch.save_file(clean, path, metadata={**metadata, CHECKSUM_KEY: tensors_checksum(clean)})
    else:
        torch.save(clean, path)


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in key order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read an adapter weights file; never runs pickled code.

    Raises:
        CheckpointError: The file is truncated, corrupt or not a tensor file.
    """
    try:
        if path.endswith(".safetensors"):
            tensors = {}
            with safetensors.safe_open(path, framework="pt", device="cpu") as fh:
                metadata = fh.metadata() or {}
                for key in fh.keys():
                    tensors[key] = fh.get_tensor(key)
            if CHECKSUM_KEY in metadata and metadata[CHECKSUM_KEY] != tensors_checksum(tensors):
                raise CheckpointError(f"{path} is corrupted: its tensors do not match the checksum saved with them")
            return tensors, metadata
        data = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as err:  # safetensors / pickle raise many types; name the file
        raise CheckpointError(f"Cannot read adapter weights {path}: {type(err).__name__}: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a dict of tensors")
    for key, value in data.items():  # checked here, before any method looks at the values
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: {key!r} is not a tensor ({type(value).__name__})")
    return data, {}
