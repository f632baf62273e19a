"""The compression stages, one module per family (selection, dp, transforms, markers, ...).

Every module of this package is imported here, so a stage registers itself (`@register` in
`base`) by existing: adding one is adding one file. `STAGES` maps spec names to classes and
`make_stage` builds one from a parsed spec.
"""

from __future__ import annotations

import importlib
import pkgutil

from gradcomp.compression.stages.base import (
    SHARE_MODES,
    STAGES,
    Chooser,
    Stage,
    StepContext,
    Work,
    dense_only,
    keep_count,
    register,
)
from gradcomp.compression.stages.dp import DP
from gradcomp.compression.stages.make import make_stage
from gradcomp.compression.stages.markers import ErrorFeedback, NoneStage, PowerSGD
from gradcomp.compression.stages.select import RandomK, RTopK, TopK
from gradcomp.compression.stages.transform import BF16, FP16, Cast, Unit

# Every other stage module (one file per stage family) registers itself on import.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


__all__ = [
    "BF16",
    "DP",
    "FP16",
    "SHARE_MODES",
    "STAGES",
    "Cast",
    "Chooser",
    "ErrorFeedback",
    "NoneStage",
    "PowerSGD",
    "RTopK",
    "RandomK",
    "Stage",
    "StepContext",
    "TopK",
    "Unit",
    "Work",
    "dense_only",
    "keep_count",
    "make_stage",
    "register",
]
