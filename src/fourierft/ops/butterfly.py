"""BOFT's tensor functions in one namespace (re-exports only; each job lives in its own module).

* :mod:`.butterfly_geometry`: block sizes and the block-butterfly permutations.
* :mod:`.butterfly_blocks`: ``Q = cayley(R)`` and the multiplicative dropout.
* :mod:`.butterfly_plan`: the index tensors of one geometry on one device.
* :mod:`.butterfly_paths`: the three ways to rotate; :mod:`.butterfly_routes`: which one runs, and why.
* :mod:`.butterfly_op`: the entry a layer calls (:func:`butterfly_rotate`) and the ``Q``-level rotations.
* :mod:`.butterfly_scale`: the output scale ``(y - b) s + b``.
"""

from .butterfly_blocks import cayley, multiplicative_dropout
from .butterfly_geometry import block_butterfly_perm, block_geometry, butterfly_permutations
from .butterfly_op import (butterfly_rotate, dense_rotation, rotate, rotate_per_sample, rotate_transpose,
                           rotation_blocks)
from .butterfly_plan import ButterflyPlan, make_butterfly_plan, permutation_plan
from .butterfly_routes import RotationChoice, choose_rotation
from .butterfly_scale import scale_output

__all__ = [
    "ButterflyPlan",
    "RotationChoice",
    "block_butterfly_perm",
    "block_geometry",
    "butterfly_permutations",
    "butterfly_rotate",
    "cayley",
    "choose_rotation",
    "dense_rotation",
    "make_butterfly_plan",
    "multiplicative_dropout",
    "permutation_plan",
    "rotate",
    "rotate_per_sample",
    "rotate_transpose",
    "rotation_blocks",
    "scale_output",
]
