"""Expert Merging and Expert Merging++ for mergekit.

Importing this package registers the ``expert_merging`` and ``expert_merging_pp``
merge methods with mergekit's registry (idempotently).
"""

from .coefficients import CoefficientArtifact
from .errors import ExpertMergingError
from .methods import EXPERT_MERGING, EXPERT_MERGING_PP, register

__version__ = "0.1.0"

register()

__all__ = [
    "CoefficientArtifact",
    "EXPERT_MERGING",
    "EXPERT_MERGING_PP",
    "ExpertMergingError",
    "register",
]
