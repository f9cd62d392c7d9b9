"""Artifacts on disk: checksums, manifests, atomic writes, content-addressed build keys.

Every artifact (an index, a trained ranker, a catalog snapshot) is a folder with a
``manifest.json`` recording what it was built from and the SHA-256 of each file. Loading checks
the checksums, so a truncated or altered file fails with a clear message instead of garbage.
Nothing here uses pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import ArtifactError

__all__ = ["sha256_file", "build_key", "write_json_atomic", "read_manifest", "read_artifact", "verify_files", "MANIFEST"]

MANIFEST = "manifest.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def build_key(**parts: Any) -> str:
    """A stable hash of JSON-serialisable parts (parameters, input digests, upstream keys)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp makes files private; artifacts are shared like any other output
    os.replace(tmp, path)


def read_manifest(folder: str | Path, *, what: str) -> dict[str, Any]:
    """Read ``folder/manifest.json``; ``what`` names the artifact in errors."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise ArtifactError(f"{what} not found at {folder} (no {MANIFEST}); run `funnel build CONFIG` first")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{what}: {path} is not valid JSON ({exc}); rebuild it with `funnel build`") from exc


def read_verified_manifest(folder: str | Path, *, what: str) -> dict[str, Any]:
    """:func:`read_manifest`, then :func:`verify_files`: the manifest of an artifact whose files are intact."""
    manifest = read_manifest(folder, what=what)
    verify_files(folder, manifest, what=what)
    return manifest


def read_artifact(folder: str | Path, *, what: str, kind: str, expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """:func:`read_verified_manifest` of an artifact that must be of ``kind`` and built with the
    ``expect`` settings (manifest key -> the value the stage has); any difference names both and
    says to rebuild."""
    manifest = read_verified_manifest(folder, what=what)
    if manifest.get("kind") != kind:
        raise ArtifactError(f"{what}: {folder} holds a {manifest.get('kind')!r} artifact, not a {kind} artifact")
    for name, want in (expect or {}).items():
        if manifest.get(name) != want:
            raise ArtifactError(f"{what}: {folder} was built with {name} {manifest.get(name)!r} but the stage has "
                                f"{want!r}; rebuild it with `funnel build`")
    return manifest


def verify_files(folder: str | Path, manifest: dict[str, Any], *, what: str) -> None:
    """Check every ``manifest["files"]`` entry's SHA-256 against the file on disk."""
    for name, digest in manifest.get("files", {}).items():
        path = Path(folder) / name
        if not path.exists():
            raise ArtifactError(f"{what}: file {path} listed in the manifest is missing; rebuild it with `funnel build`")
        found = sha256_file(path)
        if found != digest:
            raise ArtifactError(
                f"{what}: file {path} is corrupted or was changed: expected sha256 {digest[:12]}…, found {found[:12]}…; "
                "rebuild it with `funnel build`"
            )
