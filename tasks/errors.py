"""Exceptions a user can act on: each message says what was wrong, what was expected, what to do."""
from __future__ import annotations


class MlopsError(Exception):
    """Base class of every error mlops-flows raises on purpose."""


class DataError(MlopsError, ValueError):
    """The data cannot be used: missing, unreadable, empty, or not what the model needs."""


class InvalidModelNameError(MlopsError, ValueError):
    """A model name MLflow and Prefect keys cannot both carry."""


class ModelNotFoundError(MlopsError, LookupError):
    """No registered model of that name."""


class VersionNotFoundError(MlopsError, LookupError):
    """No such version or alias of a registered model."""


class RegistryError(MlopsError, RuntimeError):
    """A registry operation that cannot be done in the registry's current state."""


class ConfigurationError(MlopsError, ValueError):
    """A parameter or block setting outside what is supported."""
