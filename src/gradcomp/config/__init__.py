"""Job-file models. Every input a user writes is validated here, before any work starts.

`common` holds the shared pieces (loading, overrides, the compression field); each
entry point has its own module (`train`, `fed`, `sweep`) with its top-level model.
"""

from gradcomp.config.common import (
    ConfigError,
    StrictModel,
    TaskConfig,
    apply_overrides,
    compression_spec,
    load_job,
    load_yaml,
    validate,
)

__all__ = [
    "ConfigError",
    "StrictModel",
    "TaskConfig",
    "apply_overrides",
    "compression_spec",
    "load_job",
    "load_yaml",
    "validate",
]
