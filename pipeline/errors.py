"""Errors raised by Funnel.

Every user-facing failure is a :class:`FunnelError`. Its message is one line that says
*where* (stage, file or column), *what was expected* and *what was found*, so the command line
can print it without a traceback. The message templates below are the only place that wording
lives: checks and tests build their text from the same constants.
"""

from __future__ import annotations

__all__ = [
    "FunnelError",
    "SchemaError",
    "ConfigError",
    "ArtifactError",
    "DataError",
    "DeviceError",
    "DependencyError",
    "FunnelWarning",
    "MISSING_COLUMN",
    "WRONG_TYPE",
    "BAD_PARAM",
    "MISSING_EXTRA",
    "WONT_FIT",
]

#: A stage needs a column that is not there.
MISSING_COLUMN = "stage '{stage}' needs column '{column}' ({type}) but {where} has only: {found}"
#: A column is there with an incompatible Arrow type.
WRONG_TYPE = "stage '{stage}' needs column '{column}' of type {expected} but {where} gives {found}"
#: A parameter is out of range or of the wrong kind (scikit-learn's template).
BAD_PARAM = "the '{param}' parameter of stage '{stage}' must be {expected}; got {found!r} instead"
#: An optional dependency is not installed (see :func:`pipeline.extras.require_extra`).
MISSING_EXTRA = "{needed_by} needs {modules}, which {verb} not installed (extra '{extra}'): {command}"

#: A build step would hold more than the memory there is (checked before it starts).
WONT_FIT = ("stage '{stage}': {what} would hold about {estimate} in memory but only {available}; "
            "lower '{param}' (now {value!r}) or give the build more memory")


class FunnelError(Exception):
    """Base class of every error Funnel raises on bad input, config or artifacts."""


class SchemaError(FunnelError, KeyError):
    """A batch or a composed pipeline lacks a column, or has it with the wrong type."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(FunnelError, ValueError):
    """A config file, a stage type or a parameter is invalid."""


class ArtifactError(FunnelError):
    """An index or model on disk is missing, corrupted or does not match the pipeline."""


class DataError(FunnelError, ValueError):
    """An input file cannot be read or its contents are not what the stage expects."""


class DeviceError(FunnelError):
    """The requested device is not available or not supported by a stage."""


class DependencyError(FunnelError):
    """An optional dependency a command or stage needs is not installed (names the extra to install)."""


class FunnelWarning(UserWarning):
    """Input that runs but probably not as meant (an empty queries file, text the model cannot read).

    Issued with :func:`warnings.warn`; the command line prints each as one ``funnel: warning:`` line.
    """
