"""Checks of ``--out`` paths, run by each command before it starts any work.

A build or a training run that fails at its last step because ``--out`` names an existing file
or a folder it may not replace wastes the whole run; these checks raise a
:class:`~apex_rank.errors.ConfigError` (one line, exit status 2) first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from apex_rank.errors import ConfigError


def check_out_folder(path: str | Path, *, replace_kind: str | None = None) -> Path:
    """Check that ``path`` can be written as an output folder; returns it.

    It must not be an existing file, and the folder (or its nearest existing parent) must be
    writable. With ``replace_kind``, an existing non-empty folder must be an artifact of that
    kind (its ``manifest.json`` says so): the writer replaces the whole folder.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"--out {path} exists and is a file, not a folder")
        if replace_kind and any(path.iterdir()) and _artifact_kind(path) != replace_kind:
            raise ConfigError(f"--out {path} holds files and is not an apex-rank {replace_kind!r} artifact: "
                              "refusing to replace it (give a new or empty folder)")
        _check_writable(path, path)
    _check_parent(path)
    return path


def check_out_file(path: str | Path) -> Path:
    """Check that ``path`` can be written as an output file (not a folder, in a writable folder)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--out {path} is a folder; give a file name")
    _check_parent(path)
    return path


def _check_parent(path: Path) -> None:
    """The nearest existing ancestor of ``path`` must be a folder we may create entries in."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {path}: {parent} is a file, not a folder")
    _check_writable(path, parent)


def _check_writable(path: Path, folder: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {path}: no permission to write in {folder}")


def _artifact_kind(folder: Path) -> str | None:
    try:
        kind = json.loads((folder / "manifest.json").read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None
