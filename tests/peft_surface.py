"""Shared harness of the PEFT public-surface tests (``tests/test_peft_surface*.py``), with peft as the oracle.

A *probe* is user code written against PEFT's public API; it gets the library module ``lib`` (``peft`` or
``fourierft``), a scratch folder and, for most rows, the method (``"fourierft"`` or ``"boft"``). :func:`check`
runs it in both libraries on the same tiny model with the same seed and compares the results with
:func:`same`: values and dtypes of tensors, types and values of plain objects, exception classes (their nearest
built-in class) and messages, warning categories.
"""

from __future__ import annotations

import contextlib
import enum
import io
import json
import os
import warnings
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

import fourierft

import peft  # noqa: E402  (a test-only dependency; the test modules importorskip it first)

from conftest import MLP, make_inputs  # noqa: E402

LIBS = {"peft": peft, "fourierft": fourierft}
X = make_inputs("mlp")["X"]
# Not compared: PEFT's BOFT warns twice per layer on a CPU-only torch (its CUDA extension does not build; the
# documented difference "butterfly factors are always honoured"), and PEFT reads an attribute transformers 5
# deprecates (transformers' FutureWarning, not PEFT's).
_PEFT_NOISE = ("CUDA extension", "boft_n_butterfly_factor to 1", "`is_gradient_checkpointing` is deprecated")


# ---------------------------------------------------------------------------------------------- building
def fft_config(lib, **kw):
    kw = {"target_modules": ["lin0"], "n_frequency": 10, **kw}
    return lib.FourierFTConfig(**kw)


def boft_config(lib, **kw):
    kw = {"target_modules": ["lin0"], "boft_block_size": 2, "init_weights": False, **kw}
    return lib.BOFTConfig(**kw)


CONFIGS = {"fourierft": fft_config, "boft": boft_config}


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def build(lib, method: str = "fourierft", seed: int = 0, **kw):
    """``get_peft_model(MLP(), <method config>)`` with a fixed seed (same tensors in both libraries)."""
    torch.manual_seed(seed)
    base = MLP()
    return quiet(lib.get_peft_model, base, CONFIGS[method](lib, **kw))


def two_adapters(lib, method: str = "fourierft", **kw):
    model = build(lib, method, **kw)
    torch.manual_seed(1)
    quiet(model.add_adapter, "other", CONFIGS[method](lib, **kw))
    return model


def tiny_llama(lib, method: str = "fourierft"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    kw = {"n_frequency": 10} if method == "fourierft" else {"boft_block_size": 4}
    config = getattr(lib, "FourierFTConfig" if method == "fourierft" else "BOFTConfig")(
        task_type="CAUSAL_LM", init_weights=False, **kw)
    return quiet(lib.get_peft_model, base.eval(), config)


def tiny_bert(lib, method: str = "fourierft"):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64, num_labels=3,
                                                    max_position_embeddings=64))
    kw = {"n_frequency": 10} if method == "fourierft" else {"boft_block_size": 4}
    config = getattr(lib, "FourierFTConfig" if method == "fourierft" else "BOFTConfig")(
        task_type="SEQ_CLS", init_weights=False, **kw)
    return quiet(lib.get_peft_model, base.eval(), config)


# ---------------------------------------------------------------------------------------------- probing
class Raised(NamedTuple):
    """An exception, compared by its nearest built-in class (and message when ``message`` is set)."""

    kind: str
    message: str | None


def builtin_base(exc_type: type) -> str:
    for cls in exc_type.__mro__:
        if cls.__module__ == "builtins":
            return cls.__name__
    return "BaseException"  # pragma: no cover - every exception derives from a built-in one


def raises(fn: Callable, message: bool = False) -> Raised | None:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the class is what is compared
        return Raised(builtin_base(type(err)), str(err) if message else None)
    return None


def warned(fn: Callable) -> tuple[Any, list[str]]:
    """``fn()``'s result and the categories of the warnings it issued, through ``warnings.warn``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    cats = sorted({w.category.__name__ for w in caught if not any(s in str(w.message) for s in _PEFT_NOISE)})
    return result, cats


def output(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def printed(fn: Callable) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn()
    return buf.getvalue()


def grads(model) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def layer(model, name: str = "lin0"):
    return model.base_model.model.get_submodule(name)


def type_name(obj) -> str:
    return type(obj).__name__


def torch_type(obj) -> str:
    """The class of a torch module, or ``"adapter layer"`` for either library's wrapper of it."""
    return type(obj).__name__ if type(obj).__module__.startswith("torch.") else "adapter layer"


def saved(model, tmp: str, **kw) -> dict:
    """What ``save_pretrained`` wrote: files, config keys, tensor names, shapes and dtypes."""
    from safetensors.torch import load_file

    quiet(model.save_pretrained, tmp, **kw)
    files = sorted(os.path.relpath(os.path.join(r, f), tmp) for r, _, fs in os.walk(tmp) for f in fs)
    config = json.load(open(os.path.join(tmp, "adapter_config.json")))
    tensors = load_file(os.path.join(tmp, "adapter_model.safetensors"))
    return {"files": files, "config keys": sorted(config),
            "tensors": {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}}


def same(a, b, path: str = "") -> None:
    """Assert ``a`` (peft) and ``b`` (fourierft) agree; tensors to float tolerance, enums by class name."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: expected a tensor, got {type(b).__name__}"
        assert (a.dtype, a.shape) == (b.dtype, b.shape), \
            f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.allclose(a.double(), b.double(), atol=1e-5, rtol=1e-4), f"{path}: values differ"
    elif isinstance(a, enum.Enum):
        assert isinstance(b, enum.Enum), f"{path}: expected an enum member, got {b!r}"
        assert (type(a).__name__, a.value) == (type(b).__name__, b.value), f"{path}: {a!r} vs {b!r}"
    elif isinstance(a, nn.Module):
        assert torch_type(a) == torch_type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    elif isinstance(a, dict):
        assert isinstance(b, dict), f"{path}: expected a dict, got {type(b).__name__}"
        assert sorted(a, key=str) == sorted(b, key=str), f"{path}: keys {sorted(a, key=str)} vs {sorted(b, key=str)}"
        for k in a:
            same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)) and not isinstance(a, Raised):
        assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} ({type(a).__name__}) vs {b!r} ({type(b).__name__})"


class Case(NamedTuple):
    name: str  # the public name checked (what a PEFT user writes)
    probe: Callable  # probe(lib, tmp_dir) -> value compared between the libraries


def case_id(case: Case) -> str:
    return case.name


def for_both_methods(rows: list[tuple[str, Callable]]) -> list[Case]:
    """One :class:`Case` per row and method; a row's probe is ``probe(lib, tmp, method)``."""
    return [Case(f"{label} [{method}]", (lambda p, m: lambda lib, tmp: p(lib, tmp, m))(probe, method))
            for method in ("fourierft", "boft") for label, probe in rows]


def check(case: Case, tmp_path) -> None:
    """Run ``case`` in both libraries, each in its own folder under ``tmp_path``, and compare its results and the
    categories of the warnings it issued."""
    results = {}
    for name, lib in LIBS.items():
        tmp = tmp_path / name
        tmp.mkdir()
        results[name] = warned(lambda: case.probe(lib, str(tmp)))  # the probe's result and its warnings
    same(results["peft"], results["fourierft"], case.name)
