"""What ``transformers.Trainer`` reads from a model, supplied by :class:`~fourierft.PeftModel`.

The stock Trainer recognises PEFT models by ``isinstance(model, peft.PeftModel)`` only, so it treats a
fourierft model as a plain ``nn.Module`` and looks at the wrapper itself:

* **Dataset columns.** Trainer keeps only the columns named in ``inspect.signature(model.forward)``. A
  wrapper whose forward is ``(*args, **kwargs)`` makes it drop every column ("The batch received was
  empty"). :func:`expose_forward_signature` gives each instance a forward whose signature is the base
  model's, so ``token_type_ids``, ``decoder_input_ids`` and the like survive as well.
* **Label names.** Trainer reads them from the *class*' forward (``find_labels(type(model))``);
  :func:`delegating_forward` builds the task classes' forwards, which declare their label arguments.
* **Checkpoints.** Trainer saves ``model.state_dict()`` with ``safetensors.torch.save_file``, which refuses
  tensors that share memory, as tied input/output embeddings do. :func:`untie_shared_tensors` (a
  ``state_dict`` post-hook) hands out a copy for the second and later names of a shared tensor; keys and
  values are unchanged, and loading writes the same values into the shared tensor twice.
"""

from __future__ import annotations

import inspect
import logging
import types
from typing import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

_SELF = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)


def delegating_forward(*label_names: str) -> Callable:
    """A ``forward(self, *args, **kwargs)`` that runs ``self.base_model`` and declares ``label_names``.

    The labels are declared keyword-only (default ``None``) in ``__signature__``; they reach the base
    model through ``**kwargs`` like every other argument.
    """

    def forward(self, *args, **kwargs):
        """Run the adapted model (all arguments go to the base model's forward)."""
        return self.base_model(*args, **kwargs)

    params = [_SELF, inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL)]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in label_names]
    params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
    forward.__signature__ = inspect.Signature(params)
    forward._fourierft_delegates = True
    return forward


def expose_forward_signature(model: nn.Module) -> None:
    """Make ``inspect.signature(model.forward)`` the base model's forward signature.

    Only a forward built by :func:`delegating_forward` is replaced (a user subclass keeps its own). The
    instance gets a bound method, which ``copy.deepcopy`` rebinds to the copy (``PeftModel.__setstate__``
    calls this again after unpickling).
    """
    class_forward = type(model).forward
    if not getattr(class_forward, "_fourierft_delegates", False):
        return
    try:
        base_signature = inspect.signature(model.get_base_model().forward)
    except (TypeError, ValueError):  # builtins or C extensions without a signature: keep the generic one
        return

    def forward(self, *args, **kwargs):
        return class_forward(self, *args, **kwargs)

    forward.__signature__ = base_signature.replace(parameters=[_SELF, *base_signature.parameters.values()])
    forward.__doc__ = class_forward.__doc__
    forward.__qualname__ = class_forward.__qualname__
    model.forward = types.MethodType(forward, model)


def untie_shared_tensors(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict`` post-hook: later names of a storage already in the dict get a detached copy.

    Parameters returned with ``keep_vars=True`` are left shared (that caller wants the live objects).
    """
    seen = set()
    for key in [k for k in state_dict if k.startswith(prefix)]:
        value = state_dict[key]
        if type(value) is not torch.Tensor or value.device.type == "meta" or value.numel() == 0:
            continue  # Parameters (keep_vars=True), DTensors and other subclasses, empty tensors
        identity = (value.device, value.untyped_storage().data_ptr())
        if identity in seen:  # safetensors refuses any two names on one storage, views included
            state_dict[key] = value.clone()
        else:
            seen.add(identity)
