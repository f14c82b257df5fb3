"""Compatibility shim: the update pipeline's contracts live in :mod:`fedguard.core.pipeline`."""

from fedguard.core.pipeline import (
    AggregateResult,
    Aggregator,
    ClientContext,
    ClientStep,
    ConfigurationError,
    PrivacyLedger,
    ServerContext,
    ServerOptimizer,
    ServerStep,
    UpdatePipeline,
)

__all__ = [
    "AggregateResult",
    "Aggregator",
    "ClientContext",
    "ClientStep",
    "ConfigurationError",
    "PrivacyLedger",
    "ServerContext",
    "ServerOptimizer",
    "ServerStep",
    "UpdatePipeline",
]
