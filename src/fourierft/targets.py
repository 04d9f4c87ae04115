"""Which modules an adapter targets: config validation, PEFT's matching rules and default targets."""

from __future__ import annotations

import re
from typing import Optional, Union

from torch import nn

#: PEFT 0.21.2's default targets per ``model_type`` (its LoRA table; facts, shared by both methods).
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    **dict.fromkeys(["t5", "mt5"], ["q", "v"]),
    **dict.fromkeys(
        ["bart", "opt", "gptj", "gpt_neo", "llama", "llama4", "mistral", "mixtral", "stablelm", "gemma",
         "gemma2", "gemma3_text", "qwen2", "qwen3"],
        ["q_proj", "v_proj"],
    ),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]),
    **dict.fromkeys(
        ["bloom", "gpt_neox", "chatglm", "RefinedWebModel", "RefinedWeb", "falcon"], ["query_key_value"]
    ),
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "layoutlm"], ["query", "value"]),
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "mpt": ["Wqkv"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{name}={pattern!r} is not a valid regular expression: {err}") from err


def _check_names(name: str, value) -> None:
    if not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{name} must hold non-empty strings, got {sorted(map(repr, value))}")


def validate_tuner_fields(config) -> None:
    """Normalise and check the module-selection fields of a tuner config (PEFT's rules plus type checks).

    Raises:
        ValueError: A field has a wrong type or value; the message names the field and the value.
    """
    for name in ("target_modules", "exclude_modules"):
        value = getattr(config, name)
        if isinstance(value, str):
            if name == "target_modules" and value == "all-linear":
                continue
            _check_regex(name, value)
        elif isinstance(value, (list, tuple, set, frozenset)):
            _check_names(name, value)
            setattr(config, name, set(value))
        elif value is not None:
            raise ValueError(f"{name} must be a list of names, a regex string or None, got {value!r}")
    if isinstance(config.target_modules, str) and config.layers_to_transform is not None:
        raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
    if isinstance(config.target_modules, str) and config.layers_pattern is not None:
        raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
    pattern = config.layers_pattern
    if pattern:  # PEFT reads an empty pattern as "any"
        patterns = [pattern] if isinstance(pattern, str) else pattern
        if not isinstance(patterns, (list, tuple)):
            raise ValueError(f"layers_pattern must be a name, a list of names or None, got {pattern!r}")
        _check_names("layers_pattern", patterns)
        for p in patterns:
            _check_regex("layers_pattern", p)
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
    layers = config.layers_to_transform
    if layers is not None:
        items = [layers] if isinstance(layers, int) else layers
        if isinstance(layers, bool) or not isinstance(items, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items
        ):
            raise ValueError(f"layers_to_transform must be a non-negative int or a list of them, got {layers!r}")
        if isinstance(layers, tuple):
            config.layers_to_transform = list(layers)
    bias = config.bias
    if not isinstance(bias, str) or not (bias in ("none", "all") or bias.endswith("_only")):
        raise ValueError(f"bias={bias!r} is not supported; use 'none', 'all' or '<method>_only'")
    if config.modules_to_save is not None:
        if isinstance(config.modules_to_save, str) or not isinstance(config.modules_to_save, (list, tuple, set)):
            raise ValueError(f"modules_to_save must be a list of module names, got {config.modules_to_save!r}")
        _check_names("modules_to_save", config.modules_to_save)
        for name in config.modules_to_save:  # matched as regex fragments, as in PEFT
            _check_regex("modules_to_save entry", name)
        config.modules_to_save = list(config.modules_to_save)
    if not isinstance(config.fan_in_fan_out, bool):
        raise ValueError(f"fan_in_fan_out must be a bool, got {config.fan_in_fan_out!r}")
    if not isinstance(config.init_weights, bool):
        raise ValueError(f"init_weights must be a bool, got {config.init_weights!r}")


def _layer_index(key: str, layers_pattern: Optional[Union[str, list[str]]]) -> Optional[int]:
    """The first numbered path segment after the layer-list name (PEFT's rule)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    return int(match.group("idx")) if match else None


def is_excluded(config, key: str) -> bool:
    """True when ``key`` is excluded: by ``exclude_modules`` or because it lies in a ``modules_to_save`` module."""
    excluded = config.exclude_modules
    if excluded:
        if isinstance(excluded, str):
            if re.fullmatch(excluded, key):
                return True
        elif key in excluded or any(key.endswith("." + e) for e in excluded):
            return True
    for m in config.modules_to_save or ():
        if re.match(rf"(^|.*\.){m}($|\..*)", key):
            return True
    return False


def is_target(config, key: str) -> bool:
    """PEFT's target rule: a str is a regex (full match); a list matches exact names or dotted suffixes."""
    targets = config.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith("." + t) for t in targets):
        return False
    layers = config.layers_to_transform
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = _layer_index(key, config.layers_pattern)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def layer_coverage(config, keys: list[str]) -> tuple[Optional[list[int]], list[int]]:
    """``(requested layer indices no target-named module lies in, indices that hold one)``.

    The first item is ``None`` when ``layers_to_transform`` does not apply (unset, empty, or a regex target).
    """
    layers, targets = config.layers_to_transform, config.target_modules
    if layers is None or layers == [] or isinstance(targets, str) or not targets:
        return None, []
    present = set()
    for key in keys:
        if key and any(key.endswith("." + t) for t in targets):
            index = _layer_index(key, config.layers_pattern)
            if index is not None:
                present.add(index)
    requested = {layers} if isinstance(layers, int) else set(layers)
    return sorted(requested - present), sorted(present)


def all_linear_names(model: nn.Module, linear_types: tuple[type, ...]) -> set[str]:
    """Names (last path component) of every linear layer except the output embedding."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, linear_types) and name}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        for name, m in model.named_modules():
            if m is output:
                names.discard(name.rsplit(".", 1)[-1])
    return names


def resolve_target_modules(config, model: nn.Module, linear_types: tuple[type, ...]):
    """The value ``config.target_modules`` resolves to on ``model`` (``config`` is not changed).

    ``None`` becomes the model type's default and ``"all-linear"`` the names of every linear layer;
    anything else is returned as it is.

    Raises:
        ValueError: ``target_modules`` is ``None`` and the model type has no default.
    """
    if config.target_modules == "all-linear":
        return all_linear_names(model, linear_types)
    if config.target_modules is not None:
        return config.target_modules
    model_config = getattr(model, "config", None)
    model_type = model_config.get("model_type") if isinstance(model_config, dict) else getattr(
        model_config, "model_type", None
    )
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(
            f"Please specify target_modules in peft_config: there is no default for model type {model_type!r}"
        )
    default = DEFAULT_TARGETS[model_type]
    return default if isinstance(default, str) else set(default)
