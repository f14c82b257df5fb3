"""Compatibility shim: the parameter-dict types live in :mod:`fedguard.core.types`."""

from fedguard.core.types import JSON, Params, flatten, num_params, params_of, unflatten, zeros_like

__all__ = ["JSON", "Params", "flatten", "num_params", "params_of", "unflatten", "zeros_like"]
