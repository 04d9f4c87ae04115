"""Where an adapter file comes from: a local folder, or the Hugging Face Hub (its cache honoured offline)."""

from __future__ import annotations

import os
from typing import Optional

#: Keyword arguments passed on to ``huggingface_hub.hf_hub_download`` (the one list of them).
HUB_KWARGS = ("revision", "cache_dir", "token", "force_download", "local_files_only")
#: Everything that says where an adapter lies: the Hub arguments and the sub-folder.
LOCATION_KWARGS = HUB_KWARGS + ("subfolder",)


def hub_kwargs(kwargs: dict) -> dict:
    """The Hub arguments among ``kwargs`` that are set."""
    return {k: kwargs[k] for k in HUB_KWARGS if kwargs.get(k) is not None}


def _local_folder(model_id: str, subfolder: Optional[str]) -> str:
    return os.path.join(model_id, subfolder) if subfolder else model_id


def resolve_file(model_id: str, names: tuple[str, ...], subfolder: Optional[str] = None, **kwargs) -> str:
    """Path of the first of ``names`` found for ``model_id`` (a folder, else a Hub repo id).

    A local folder is searched alone (no Hub lookup); a repo id is looked up with ``hf_hub_download``,
    which reads its cache when offline.

    Args:
        model_id: A local folder or a Hub repo id.
        names: File names in order of preference.
        subfolder: Sub-folder holding the files.
        **kwargs: Hub arguments (:data:`HUB_KWARGS`); other keys are ignored.

    Raises:
        FileNotFoundError: None of ``names`` exists.
    """
    folder = _local_folder(model_id, subfolder)
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    wanted = " or ".join(names)
    if os.path.isdir(model_id):
        raise FileNotFoundError(f"No {wanted} in {folder}")
    from huggingface_hub import hf_hub_download  # slow to import; only needed for repo ids

    errors = []
    for name in names:
        try:
            return hf_hub_download(model_id, name, subfolder=subfolder or None, **hub_kwargs(kwargs))
        except Exception as err:  # not found, offline and not cached, ...: the hub raises many types
            errors.append(f"{name}: {type(err).__name__}: {err}")
    raise FileNotFoundError(
        f"Can't find {wanted} for {model_id!r} (subfolder={subfolder!r}): not a local directory and not "
        f"resolvable on the Hugging Face Hub or in its cache ({'; '.join(errors)})"
    )
