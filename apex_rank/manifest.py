"""JSON manifests for saved artifacts: a kind, a schema version, library versions, payload.

Every artifact folder apex-rank writes (APEX predictor, recommender bundle, embedding cache)
holds a ``manifest.json``. Readers refuse a newer schema version than they know and name the
folder and the file that is missing, so a half-copied artifact fails loudly. The manifest
records each component file's size and SHA-256 (``checksums``); readers verify them before any
native code (LightGBM, FAISS, numpy) reads a file, so a truncated, swapped or edited component is
one :class:`~apex_rank.errors.ArtifactError` naming it, not a crash (a half ``reranker.txt`` made
LightGBM segfault) or a silently different model.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from apex_rank.errors import ArtifactError

MANIFEST_NAME = "manifest.json"
_VERSIONED = ("apex-rank", "torch", "numpy", "polars", "faiss-cpu", "implicit", "lightgbm")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries whose formats our artifacts depend on."""
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def as_if_created(path: str | Path) -> None:
    """Give a file or folder from ``tempfile.mkstemp``/``mkdtemp`` (0600/0700, private to
    this user) the permissions a plain ``open``/``mkdir`` would (0666/0777 less the umask), so
    an artifact written through a temporary name and a rename stays readable by a service
    running as another user."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
        as_if_created(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_checksum(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex digest}`` of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def write_manifest(folder: str | Path, *, kind: str, schema: int, files: list[str], payload: dict[str, Any]) -> Path:
    """Write ``folder/manifest.json``; ``files`` are the component files a reader will need (their
    sizes and SHA-256 are recorded)."""
    folder = Path(folder)
    data = {
        "kind": kind,
        "schema": schema,
        "files": sorted(files),
        "checksums": {f: file_checksum(folder / f) for f in sorted(files)},
        "versions": library_versions(),
        **payload,
    }
    path = folder / MANIFEST_NAME
    write_json_atomic(path, data)
    return path


def read_manifest(folder: str | Path, *, kind: str, max_schema: int) -> dict[str, Any]:
    """Read and check ``folder/manifest.json``: right kind, known schema, all files present."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{folder} is not an apex-rank {kind} artifact: {MANIFEST_NAME} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or data.get("kind") != kind:
        found = data.get("kind") if isinstance(data, dict) else type(data).__name__
        raise ArtifactError(f"{path}: expected an artifact of kind {kind!r}, found {found!r}")
    schema = data.get("schema")
    if not isinstance(schema, int) or schema < 1:
        raise ArtifactError(f"{path}: schema version {schema!r} is not a positive integer")
    if schema > max_schema:
        raise ArtifactError(
            f"{path}: schema version {schema} is newer than this apex-rank supports ({max_schema}); "
            "upgrade apex-rank to read it"
        )
    missing = [f for f in data.get("files", []) if not (folder / f).exists()]
    if missing:
        raise ArtifactError(f"{folder}: component file(s) {', '.join(missing)} listed in {MANIFEST_NAME} are missing")
    sums = data.get("checksums")
    if sums is not None and not isinstance(sums, dict):
        raise ArtifactError(f"{path}: 'checksums' must be a table of file -> size and sha256")
    for name, want in (sums or {}).items():
        p = folder / name
        if not isinstance(want, dict) or not p.is_file():
            raise ArtifactError(f"{path}: checksum entry {name!r} is malformed or names no file")
        size = p.stat().st_size
        if size != want.get("bytes"):
            raise ArtifactError(f"{p}: {size} bytes, the manifest recorded {want.get('bytes')} (truncated or replaced "
                                "after the artifact was written); restore it or rebuild the artifact")
        if file_checksum(p)["sha256"] != want.get("sha256"):
            raise ArtifactError(f"{p}: SHA-256 differs from the manifest's (changed or taken from another artifact "
                                "after it was written); restore it or rebuild the artifact")
    return data
