"""What a model must be for the functional training paths, checked when a job is loaded.

DP-SGD takes per-example gradients with `torch.func.vmap`, and the vectorised cohort trains a
whole cohort's parameters side by side the same way: both need a model whose forward pass is a
pure function of (parameters, one example or one client's batch). A layer that breaks that
is named here, with the alternative, before any training starts.
"""

from __future__ import annotations

from torch import nn

_NORM_ADVICE = "use nn.GroupNorm (or nn.LayerNorm) instead"


def per_example_blocker(model: nn.Module) -> str | None:
    """Why DP-SGD cannot take per-example gradients of this model (None: it can).

    Batch normalisation mixes the examples of a batch (its statistics), so one example's gradient
    depends on the others and per-example clipping bounds nothing; its running statistics are
    also updated in place, outside the parameters DP-SGD noises."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return (
                f"layer {name or 'model'!r} ({type(module).__name__}) normalises with batch statistics, which mix "
                f"the examples whose gradients DP-SGD clips one by one; {_NORM_ADVICE}, or train without dp"
            )
    return None


def vectorize_blocker(model: nn.Module) -> str | None:
    """Why a cohort of this model cannot be trained vectorised (None: it can)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            return (
                f"layer {name or 'model'!r} ({type(module).__name__}) updates running statistics in place; "
                f"{_NORM_ADVICE} to train cohorts vectorised"
            )
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"layer {name or 'model'!r} ({type(module).__name__}) draws random masks in a different order"
    if any(b.is_floating_point() for b in model.buffers()):
        return "the model has floating-point buffers, which training may change in place"
    return None
