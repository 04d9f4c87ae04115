"""A minimal model card (``README.md``) next to saved adapters, with PEFT's YAML header keys."""

from __future__ import annotations

import os
import re
import uuid

from torch import nn

from .._version import __version__

_BODY = """
# Adapter

This folder holds adapter weights in the PEFT format (`adapter_config.json`,
`adapter_model.safetensors`), written by fourierft {version}. Load them with either library:

```python
from fourierft import PeftModel   # or: from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "<this folder or repo id>")
```

### Framework versions

- fourierft {version} (PEFT 0.21.2 file format)
"""


def _yaml_value(value) -> str:
    if isinstance(value, list):
        return "\n" + "".join(f"- {v}\n" for v in value)
    return f" {value}\n" if value != "" else " ''\n"


def write_model_card(save_directory: str, peft_model: nn.Module) -> None:
    """Create or update ``README.md``: the YAML header gets ``library_name: peft``, ``base_model`` and tags."""
    path = os.path.join(save_directory, "README.md")
    base = peft_model.get_base_model()
    header: dict = {"library_name": "peft"}
    config = getattr(base, "config", None)
    tags = []
    if config is not None and hasattr(config, "_name_or_path"):
        header["base_model"] = config._name_or_path
        tags.append(f"base_model:adapter:{config._name_or_path}")
    # a class attribute (inherited by FSDP2's renamed FSDPPeftModelForCausalLM), read on the type so that
    # PeftModel's attribute delegation to the base model is not consulted
    pipeline_tag = getattr(type(peft_model), "model_card_pipeline_tag", None)
    if pipeline_tag and hasattr(base, "generate"):
        header["pipeline_tag"] = pipeline_tag
    if type(base).__module__.startswith("transformers"):
        tags.insert(0, "transformers")
    tags.append("fourierft")
    header["tags"] = tags
    body = _BODY.format(version=__version__)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        match = re.match(r"^---\n.*?\n---\n", text, flags=re.S)
        body = text[match.end():] if match else text
    yaml = "".join(f"{k}:{_yaml_value(v)}" for k, v in header.items())
    # write a new file and move it over the old one: never half written, never through a symlink
    tmp = os.path.join(save_directory, f".README-{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            fh.write(f"---\n{yaml}---\n{body}")
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
