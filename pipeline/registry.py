"""Stage registry: entry points of the group ``funnel.stages``, plus in-process registrations.

A package provides stages by declaring, in its ``pyproject.toml``::

    [project.entry-points."funnel.stages"]
    "filter.brand_quota" = "my_package.stages:BrandQuotaFilter"

The key is the name configs use (``type = "filter.brand_quota"``). Classes are imported only
when a config asks for them, so a broken plug-in cannot break unrelated pipelines.
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .stage import Stage

__all__ = ["ENTRY_POINT_GROUP", "available_stages", "get_stage_class", "register_stage"]

ENTRY_POINT_GROUP = "funnel.stages"
_LOCAL: dict[str, type] = {}


def register_stage(cls: type["Stage"]) -> type["Stage"]:
    """Register a stage class under ``cls.name`` for this process (tests, notebooks).

    Usable as a decorator. Installed packages should use the entry point instead.
    """
    _LOCAL[cls.name] = cls
    return cls


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_stages() -> dict[str, str]:
    """Registry key -> ``module:Class`` (or the class' qualified name for local ones)."""
    found = {name: ep.value for name, ep in _entry_points().items()}
    found.update({name: f"{cls.__module__}:{cls.__qualname__}" for name, cls in _LOCAL.items()})
    return dict(sorted(found.items()))


def get_stage_class(name: str) -> type["Stage"]:
    """The stage class registered as ``name``; the error lists every known name."""
    if name in _LOCAL:
        return _LOCAL[name]
    eps = _entry_points()
    if name not in eps:
        known = ", ".join(available_stages()) or "(none: is funnel-rank installed?)"
        raise ConfigError(f"unknown stage type '{name}'; known types: {known}")
    ep = eps[name]
    try:
        return ep.load()
    except ImportError as exc:
        dist = getattr(ep, "dist", None)
        hint = f"; try `pip install {dist.name}`" if dist is not None else ""
        raise ConfigError(f"stage type '{name}' is registered by {ep.value} but cannot be imported ({exc}){hint}") from exc
