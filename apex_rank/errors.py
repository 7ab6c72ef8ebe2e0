"""The exceptions apex-rank raises.

Every error a user can cause derives from :class:`ApexRankError`, so a service can catch one
type. Messages name the file, row, column, key or id at fault and the rule that was broken;
when another library's exception is the cause it is chained (``raise ... from err``).
"""

from __future__ import annotations


class ApexRankError(Exception):
    """Base class of every error raised on purpose by apex-rank."""


class ConfigError(ApexRankError, ValueError):
    """A configuration value or file is invalid (unknown key, wrong type, out of range)."""


class SchemaError(ApexRankError, ValueError):
    """A table lacks a required column, has a wrong dtype, or holds invalid values."""


class DeviceError(ApexRankError, RuntimeError):
    """The requested compute device is not available (e.g. ``cuda`` without CUDA)."""


class CheckpointError(ApexRankError, ValueError):
    """A model file or artifact folder cannot be loaded (not a checkpoint, wrong shape, ...)."""


class ArtifactError(ApexRankError, ValueError):
    """A saved artifact or bundle is missing a file or comes from an unsupported schema."""


class AudioError(ApexRankError, ValueError):
    """An audio file cannot be decoded or holds unusable samples."""


class UnknownIdError(ApexRankError, KeyError):
    """A song or user id is not known to the component that was asked."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class NotFittedError(ApexRankError, RuntimeError):
    """A component was used before it was fitted or loaded."""


class MissingDependencyError(ApexRankError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class StoreError(ApexRankError, RuntimeError):
    """The online store (Redis) failed or holds inconsistent data."""


class VersionMovedError(StoreError):
    """A write aimed at the current version found the pointer moved (a publish committed in
    between); the caller re-reads the pointer and writes to the new version."""


class ContentionError(StoreError):
    """An optimistic transaction lost every retry to concurrent writers; nothing was written."""


class RequestError(ApexRankError, ValueError):
    """A caller passed an invalid argument to the online layer (malformed id, bad ``k``...)."""
