"""Optional dependencies: check a command's extras before it does any work.

Some commands need packages that a plain ``pip install funnel-rank`` does not bring: the Ray
engine (extra ``ray``), the encoder trainer (``train``: datasets, accelerate), the benchmark's
comparisons (``bench``). A command calls :func:`require_extra` first thing, so a missing package
is one line naming the extra and the command that installs it — before any model is loaded or
any output folder is made, instead of an ``ImportError`` halfway through::

    require_extra("ray", ["ray", "ray.data"], needed_by="--engine ray")
    # funnel: error: --engine ray needs ray.data, which is not installed (extra 'ray'):
    #     pip install -e "/home/me/funnel[ray]"

The install command follows how funnel-rank itself was installed: from a clone (editable or a
local folder) it names that folder, otherwise the package on PyPI. Modules are looked up with
:func:`importlib.util.find_spec`, so nothing heavy is imported by the check itself.
"""

from __future__ import annotations

import importlib.util
import json
from importlib import metadata
from pathlib import Path
from typing import Sequence
from urllib.parse import unquote, urlparse

from .errors import MISSING_EXTRA, DependencyError

__all__ = ["require_extra", "missing_modules", "install_command"]

DISTRIBUTION = "funnel-rank"


def missing_modules(modules: Sequence[str]) -> list[str]:
    """The modules of ``modules`` that cannot be imported (a dotted name needs its parents)."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package is missing or broken
            found = False
        if not found:
            missing.append(name)
    return missing


def install_command(extra: str) -> str:
    """``pip install`` of funnel-rank with ``extra``, from where funnel-rank was installed."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
        direct = json.loads(dist.read_text("direct_url.json") or "null")
    except (metadata.PackageNotFoundError, OSError, ValueError):
        direct = None
    if isinstance(direct, dict) and str(direct.get("url", "")).startswith("file:"):
        path = Path(unquote(urlparse(direct["url"]).path))
        shown = "." if path == Path.cwd() else str(path)
        editable = "-e " if (direct.get("dir_info") or {}).get("editable") else ""
        return f'pip install {editable}"{shown}[{extra}]"'
    return f'pip install "{DISTRIBUTION}[{extra}]"'


def require_extra(extra: str, modules: Sequence[str], *, needed_by: str) -> None:
    """Raise :class:`~pipeline.errors.DependencyError` unless every module of ``modules`` imports.

    ``extra`` is the optional-dependency group of pyproject.toml that provides them and
    ``needed_by`` what needs them (``"--engine ray"``, ``"funnel train encoder"``); both appear
    in the message together with the install command (:func:`install_command`).
    """
    missing = missing_modules(modules)
    if missing:
        raise DependencyError(MISSING_EXTRA.format(needed_by=needed_by, modules=", ".join(missing),
                                                   verb="is" if len(missing) == 1 else "are", extra=extra,
                                                   command=install_command(extra)))
