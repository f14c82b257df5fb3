"""Model checks for DP-SGD, done when the run is configured (like Opacus's ``ModuleValidator``).

DP-SGD bounds each example's influence through its own gradient. A layer that mixes the
examples of a batch (BatchNorm's batch statistics, or a running-statistics buffer updated
from the data) has no per-example gradient, and its statistics leak outside the clipping:
such a model is refused with the layer's name and the fix.
"""

from __future__ import annotations

from torch import nn

from fedguard.pipeline.base import ConfigurationError

_FIX = (
    "Replace it with GroupNorm (e.g. nn.GroupNorm(min(8, C // 2), C) for C channels), LayerNorm or no "
    "normalisation; for the built-in CNNs set task.norm=group (or none)."
)


def mixing_layers(model: nn.Module) -> list[tuple[str, str]]:
    """(name, type) of every layer that mixes examples of a batch or keeps running statistics."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and (
            isinstance(module, nn.modules.batchnorm._BatchNorm) or module.track_running_stats
        ):
            found.append((name or "<model>", type(module).__name__))
    return found


def validate_for_dpsgd(model: nn.Module) -> None:
    """Raise :class:`ConfigurationError` naming the first example-mixing layer, if any."""
    found = mixing_layers(model)
    if not found:
        return
    name, kind = found[0]
    more = f" (and {len(found) - 1} more such layers)" if len(found) > 1 else ""
    raise ConfigurationError(
        f"dp.mode=sample: layer '{name}' ({kind}){more} mixes the examples of a batch, so per-example "
        f"gradients (and DP-SGD's guarantee) do not exist for this model. {_FIX}"
    )
