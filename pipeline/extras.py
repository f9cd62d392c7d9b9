"""Optional dependencies: check them before the work that needs them, and name the install command.

Funnel's core installs what every pipeline needs; some commands need an *extra* (``train``:
``datasets`` and ``accelerate`` for fine-tuning an encoder). Without it they used to run for
minutes and then fail on an import deep inside a library. :func:`require_extra` imports the
modules up front and raises one :class:`~pipeline.errors.ConfigError` naming what is missing,
the extra and both ways to install it (from a checkout and from PyPI).
"""

from __future__ import annotations

import importlib

from .errors import ConfigError

__all__ = ["EXTRAS", "MISSING_EXTRA", "require_extra"]

#: The modules each extra of ``pyproject.toml`` provides that Funnel checks for.
EXTRAS: dict[str, tuple[str, ...]] = {"train": ("datasets", "accelerate")}

MISSING_EXTRA = ("{what} needs the optional package(s) {missing} (the '{extra}' extra), which cannot be imported "
                 "here; install them with `pip install -e \".[{extra}]\"` in a Funnel checkout, or "
                 "`pip install 'funnel-rank[{extra}]'`")


def require_extra(extra: str, *, what: str) -> None:
    """Raise :class:`ConfigError` (:data:`MISSING_EXTRA`) unless every module of ``EXTRAS[extra]`` imports."""
    missing = []
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            missing.append(module if getattr(exc, "name", None) in (None, module) else f"{module} ({exc})")
    if missing:
        raise ConfigError(MISSING_EXTRA.format(what=what, missing=", ".join(missing), extra=extra))
