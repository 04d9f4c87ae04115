"""TRL's trainers for fourierft models, under TRL's own names (``pip install -e ".[trl]"`` from a clone,
``pip install "fourierft[trl]"`` from a package index).

A script written for peft and TRL runs after changing its imports::

    from fourierft import FourierFTConfig, get_peft_model     # was: from peft import ...
    from fourierft.trl import SFTTrainer                      # was: from trl import SFTTrainer

Each class is TRL's trainer with fourierft's adapter paths in front
(:mod:`fourierft.integrations.trl`): adapter-only checkpoints in PEFT's format, resume, TRL's fused LM head on
the adapted model, the adapter-disabled model as the reference (no copy of the base), and a fourierft
``peft_config`` building the fourierft model. Trainers this TRL version lacks are absent.
"""

import importlib.util

from .integrations.trl import TRAINER_NAMES, AdapterDisabledReference, trainer_classes

if importlib.util.find_spec("trl") is None:
    raise ImportError('fourierft.trl needs TRL: pip install -e ".[trl]" from a clone of the repository, or '
                      'pip install "fourierft[trl]" from a package index')

globals().update(trainer_classes())

__all__ = ["AdapterDisabledReference", *[name for name in TRAINER_NAMES if name in globals()]]
