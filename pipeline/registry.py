"""Stage registry: entry points of the group ``funnel.stages``, plus in-process registrations.

A package provides stages by declaring, in its ``pyproject.toml``::

    [project.entry-points."funnel.stages"]
    "filter.brand_quota" = "my_package.stages:BrandQuotaFilter"

The key is the name configs use (``type = "filter.brand_quota"``) and must equal the class'
``name``. Classes are imported only when a config asks for them, so a broken plug-in cannot
break unrelated pipelines. When one is asked for and cannot be loaded, the error says which
installed package registered it and how to reinstall it; when a key is not registered at all,
it lists the keys that are and suggests close ones.

``funnel stages list`` and ``funnel stages show KEY`` print what :func:`list_stages`,
:func:`describe_stage` and :func:`parameter_docs` find: the package and version behind each
key, devices, declared columns, tags and parameters (types and defaults from the ``__init__``
signature, descriptions and constraints from the ``Args:`` section of the class docstring).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import re
import textwrap
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from .errors import ConfigError

if TYPE_CHECKING:
    from .stage import Stage

__all__ = [
    "ENTRY_POINT_GROUP", "StageInfo", "available_stages", "get_stage_class", "register_stage", "list_stages",
    "stage_info", "describe_stage", "parameter_docs", "format_stage_list", "format_stage_details",
]

ENTRY_POINT_GROUP = "funnel.stages"
_LOCAL: dict[str, type] = {}


def register_stage(cls: type["Stage"]) -> type["Stage"]:
    """Register a stage class under ``cls.name`` for this process (tests, notebooks).

    Usable as a decorator. Installed packages should use the entry point instead.
    """
    _LOCAL[cls.name] = cls
    return cls


@dataclass(frozen=True)
class StageInfo:
    """What the registry knows about a key without importing its class.

    ``package``/``version`` name the installed distribution that declares the entry point
    (``None`` for classes registered in process with :func:`register_stage`).
    """

    key: str
    target: str
    package: str | None = None
    version: str | None = None
    entry_point: metadata.EntryPoint | None = None
    conflicts: tuple[str, ...] = ()

    def load(self) -> type["Stage"]:
        return get_stage_class(self.key)


def _entry_points() -> dict[str, list[metadata.EntryPoint]]:
    found: dict[str, list[metadata.EntryPoint]] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        same = found.setdefault(ep.name, [])
        if all(other.value != ep.value for other in same):
            same.append(ep)
    return found


def _dist_label(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "an unknown package"


def _info(key: str, eps: list[metadata.EntryPoint]) -> StageInfo:
    ep = eps[-1]
    dist = getattr(ep, "dist", None)
    conflicts = tuple(f"{_dist_label(e)} ({e.value})" for e in eps) if len(eps) > 1 else ()
    return StageInfo(key, ep.value, dist.name if dist else None, dist.version if dist else None, ep, conflicts)


def list_stages() -> list[StageInfo]:
    """Every registered key, sorted, with the package that provides it (no class is imported)."""
    infos = {key: _info(key, eps) for key, eps in _entry_points().items()}
    for key, cls in _LOCAL.items():
        infos[key] = StageInfo(key, f"{cls.__module__}:{cls.__qualname__}")
    return [infos[k] for k in sorted(infos)]


def available_stages() -> dict[str, str]:
    """Registry key -> ``module:Class`` (or the class' qualified name for local ones)."""
    return {info.key: info.target for info in list_stages()}


def stage_info(name: str) -> StageInfo:
    """The registry entry of ``name``; an unknown name raises :class:`ConfigError` (see :func:`get_stage_class`)."""
    for info in list_stages():
        if info.key == name:
            return info
    raise _unknown(name)


def _unknown(name: str) -> ConfigError:
    known = list(available_stages())
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.75)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    listed = ", ".join(known) or "(none: is funnel-rank installed?)"
    return ConfigError(
        f"unknown stage type '{name}'; known types: {listed}.{hint} If it comes from a plug-in, install the package "
        "that provides it (`funnel stages list` shows what is installed)."
    )


def _install_command(dist: metadata.Distribution | None) -> str | None:
    """How to reinstall ``dist`` from where pip installed it (a folder, editable or not), else by name."""
    if dist is None:
        return None
    try:
        direct = json.loads(dist.read_text("direct_url.json") or "null")
    except (OSError, ValueError):
        direct = None
    if isinstance(direct, dict) and str(direct.get("url", "")).startswith("file:"):
        path = unquote(urlparse(direct["url"]).path)
        if (direct.get("dir_info") or {}).get("editable"):
            return f"pip install -e {path}"
        return f"pip install --force-reinstall {path}"
    return f"pip install --force-reinstall {dist.name}"


def _load_error(name: str, ep: metadata.EntryPoint, exc: BaseException, *, imported: bool) -> ConfigError:
    dist = getattr(ep, "dist", None)
    package = dist.name if dist is not None else "the package that declares it"
    where = f"stage type '{name}' is registered by package {_dist_label(ep)} ({ep.value})"
    install = _install_command(dist)
    again = f" (`{install}`)" if install else ""
    if imported:
        return ConfigError(f"{where} but its module does not define {ep.attr} ({exc}); "
                           f"the installed {package} may be out of date: reinstall it{again}")
    reason = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ModuleNotFoundError) and exc.name and exc.name.split(".")[0] != ep.module.split(".")[0]:
        fix = f"{package} needs the module '{exc.name}', which is not installed; install {package}'s dependencies{again}"
    elif isinstance(exc, ImportError):
        fix = f"try `{install}`" if install else f"reinstall {package}"
    else:
        fix = f"importing it raised an error inside {package} (run with --debug for the traceback)"
    return ConfigError(f"{where} but cannot be imported ({reason}); {fix}")


def _load(name: str, ep: metadata.EntryPoint) -> Any:
    try:
        obj = importlib.import_module(ep.module)
    except Exception as exc:  # a plug-in may fail on import in any way; report it as config trouble
        raise _load_error(name, ep, exc, imported=False) from exc
    try:
        for part in (ep.attr or "").split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise _load_error(name, ep, exc, imported=True) from exc
    return obj


def get_stage_class(name: str) -> type["Stage"]:
    """The stage class registered as ``name``.

    Errors (:class:`ConfigError`, one line): an unknown key lists the known ones and suggests
    close matches; a key two packages claim names both; a plug-in whose module cannot be
    imported names its package and version and says how to reinstall it; an entry point that
    is not a :class:`Stage` subclass, or whose class has a different ``name``, names the package.
    """
    from .stage import Stage

    if name in _LOCAL:
        return _LOCAL[name]
    eps = _entry_points().get(name)
    if not eps:
        raise _unknown(name)
    if len(eps) > 1:
        claims = ", ".join(_info(name, eps).conflicts)
        raise ConfigError(f"stage type '{name}' is registered by more than one package: {claims}; uninstall all but one")
    ep = eps[0]
    cls = _load(name, ep)
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise ConfigError(f"stage type '{name}' of package {_dist_label(ep)} points to {ep.value}, "
                          f"which is a {type(cls).__name__}, not a subclass of pipeline.Stage")
    if cls.name != name:
        raise ConfigError(f"stage type '{name}' of package {_dist_label(ep)} points to {ep.value}, whose name is "
                          f"{cls.name!r}; the entry point key and the class' name must be equal")
    return cls


# -- description -------------------------------------------------------------------------------

_ARGS_HEADER = re.compile(r"^(\s*)(Args|Arguments|Parameters|Params):\s*$")
_ARG_LINE = re.compile(r"^(\*{0,2}\w+)\s*(\([^)]*\))?\s*:\s*(.*)$")


def _split_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """The docstring without its ``Args:`` section, and that section as name -> text."""
    lines = inspect.cleandoc(doc or "").splitlines()
    body, params = [], {}
    i = 0
    while i < len(lines):
        header = _ARGS_HEADER.match(lines[i])
        if not header:
            body.append(lines[i])
            i += 1
            continue
        indent, current = len(header.group(1)), None
        i += 1
        while i < len(lines):
            line = lines[i]
            if line.strip() and len(line) - len(line.lstrip()) <= indent:
                break
            entry = _ARG_LINE.match(line.strip())
            if entry and line.strip() and len(line) - len(line.lstrip()) <= indent + 4:
                current = entry.group(1).lstrip("*")
                params[current] = entry.group(3).strip()
            elif current and line.strip():
                params[current] = f"{params[current]} {line.strip()}".strip()
            i += 1
    return "\n".join(body).strip(), params


def parameter_docs(cls: type) -> list[dict[str, Any]]:
    """One dict per ``__init__`` parameter: ``name``, ``type``, ``default`` (``None`` + ``required``), ``doc``.

    Types are the annotations as written (or the default's type), descriptions and constraints
    come from the class docstring's ``Args:`` section (Google style).
    """
    sig = inspect.signature(cls.__init__)
    _, docs = _split_docstring(cls.__doc__ or "")
    out = []
    for name in cls._param_names():
        p = sig.parameters[name]
        if p.annotation is not inspect.Parameter.empty:
            kind = p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)
        elif p.default is not inspect.Parameter.empty and p.default is not None:
            kind = type(p.default).__name__
        else:
            kind = ""
        required = p.default is inspect.Parameter.empty
        out.append({"name": name, "type": kind, "required": required,
                    "default": None if required else p.default, "doc": docs.get(name, "")})
    return out


def _columns(schema) -> list[dict[str, str]]:
    from .schema import describe

    return [{"name": f.name, "type": describe(f.type)} for f in schema]


def describe_stage(name: str) -> dict[str, Any]:
    """Everything ``funnel stages show`` prints about ``name``, as plain data (JSON-ready).

    Columns are the class' declarations; ``input_depends_on_params`` / ``output_depends_on_params``
    say the class extends them from its parameters (``required_columns`` / ``produced_columns``).
    """
    from dataclasses import asdict

    from .stage import Stage

    info = stage_info(name)
    cls = get_stage_class(name)
    summary, _ = _split_docstring(cls.__doc__ or "")
    return {
        "key": info.key, "class": info.target, "package": info.package, "version": info.version,
        "devices": list(cls.tags.devices), "tags": asdict(cls.tags),
        "input": _columns(cls.input_schema), "output": _columns(cls.output_schema), "drops": list(cls.drops),
        "input_depends_on_params": cls.required_columns is not Stage.required_columns,
        "output_depends_on_params": cls.produced_columns is not Stage.produced_columns,
        "top_param": cls.top_param, "path_params": list(cls.path_params),
        "doc": summary, "parameters": parameter_docs(cls),
    }


def _row(info: StageInfo) -> dict[str, Any]:
    row = {"key": info.key, "class": info.target, "package": info.package or "(in process)",
           "version": info.version or "", "devices": [], "input": [], "output": [], "error": None}
    try:
        d = describe_stage(info.key)
    except ConfigError as exc:
        row["error"] = str(exc)
        return row
    more = {side: ["(+ from params)"] if d[f"{side}_depends_on_params"] else [] for side in ("input", "output")}
    row.update(devices=d["devices"], input=[c["name"] for c in d["input"]] + more["input"],
               output=[c["name"] for c in d["output"]] + more["output"])
    return row


def format_stage_list(as_json: bool = False) -> str:
    """The ``funnel stages list`` table (or JSON); a key whose class cannot be loaded gets its error."""
    rows = [_row(info) for info in list_stages()]
    if as_json:
        return json.dumps(rows, indent=2)
    head = ("key", "class", "package", "version", "devices", "input columns", "output columns")
    table = [head] + [(r["key"], r["class"], r["package"], r["version"], ",".join(r["devices"]) or "?",
                       ", ".join(r["input"]) or "-", ", ".join(r["output"]) or "-") for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(head) - 1)]
    lines = []
    for n, t in enumerate(table):
        lines.append("  ".join(c.ljust(w) for c, w in zip(t, widths)) + "  " + t[-1])
        if n == 0:
            lines.append("-" * len(lines[0]))
        elif rows[n - 1]["error"]:
            lines.append(f"    ! {rows[n - 1]['error']}")
    return "\n".join(lines)


def format_stage_details(name: str, as_json: bool = False) -> str:
    """The ``funnel stages show KEY`` text (or JSON)."""
    d = describe_stage(name)
    if as_json:
        return json.dumps(d, indent=2, default=repr)
    package = f"{d['package']} {d['version']}" if d["package"] else "(registered in process)"
    tags = ", ".join(f"{k}={v}" for k, v in d["tags"].items() if k != "devices")
    lines = [f"{d['key']}  ({d['class']})", f"package     {package}", f"devices     {', '.join(d['devices'])}",
             f"tags        {tags}"]
    if d["top_param"]:
        lines.append(f"top-N       parameter '{d['top_param']}' (set by `funnel run --top`)")
    if d["path_params"]:
        lines.append(f"paths       {', '.join(d['path_params'])} (relative to the config file's folder)")
    if d["doc"]:
        lines += ["", d["doc"]]
    lines += ["", "parameters"]
    params = d["parameters"]
    if not params:
        lines.append("  (none)")
    w_name = max((len(p["name"]) for p in params), default=0)
    w_type = max((len(p["type"]) for p in params), default=0)
    for p in params:
        shown = repr(p["default"])
        default = "required" if p["required"] else f"default {shown if len(shown) <= 60 else shown[:57] + '...'}"
        line = f"  {p['name']:<{w_name}}  {p['type']:<{w_type}}  {default}"
        lines.append(line)
        if p["doc"]:
            pad = " " * (w_name + 4)
            lines.append(textwrap.fill(p["doc"], width=max(100, len(pad) + 40), initial_indent=pad, subsequent_indent=pad))
    for side, title in (("input", "input columns (needed)"), ("output", "output columns (added or replaced)")):
        note = "; parameters may add or rename columns" if d[f"{side}_depends_on_params"] else ""
        lines += ["", f"{title}{note}"]
        cols = d[side]
        lines += [f"  {c['name']}: {c['type']}" for c in cols] or ["  (none)"]
    if d["drops"]:
        lines += ["", "dropped columns", "  " + ", ".join(d["drops"])]
    return "\n".join(lines)
