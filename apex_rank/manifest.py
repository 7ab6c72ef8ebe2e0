"""JSON manifests for saved artifacts: a kind, a schema version, library versions, payload.

Every artifact folder apex-rank writes (APEX predictor, recommender bundle, embedding cache)
holds a ``manifest.json``. Readers refuse a newer schema version than they know and name the
folder and the file that is missing, so a half-copied artifact fails loudly.
"""

from __future__ import annotations

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


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(folder: str | Path, *, kind: str, schema: int, files: list[str], payload: dict[str, Any]) -> Path:
    """Write ``folder/manifest.json``; ``files`` are the component files a reader will need."""
    folder = Path(folder)
    data = {
        "kind": kind,
        "schema": schema,
        "files": sorted(files),
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
    return data
