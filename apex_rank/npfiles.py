"""Array files of saved artifacts: one ``.npz`` (``allow_pickle=False``) with its large arrays
apart, each in a plain ``.npy`` beside it (``songs.npz`` → ``songs.embeddings.npy``).

A ``.npy`` can be memory-mapped, an ``.npz`` member cannot: readers map the arrays kept apart
copy-on-write (``mmap_mode="c"``), so every process that loads the artifact shares their pages
until one writes a page of its own (that change stays in the process). Check a file's checksum
(:func:`~apex_rank.manifest.read_manifest`) before mapping it.

Example
-------
>>> # files = save_arrays(Path("b/songs.npz"), {"ids": ids, "embeddings": E}, apart=("embeddings",))
>>> # read_arrays(Path("b/songs.npz"), apart=("embeddings",))["embeddings"]  # memory-mapped
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from apex_rank.errors import ArtifactError


def apart_file(path: str | Path, name: str) -> Path:
    """Where the array ``name`` of the ``.npz`` at ``path`` is kept apart: ``<stem>.<name>.npy``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.{name}.npy")


def save_arrays(path: str | Path, arrays: dict[str, np.ndarray], *, apart: Sequence[str] = ()) -> list[Path]:
    """Write ``arrays`` to the ``.npz`` at ``path``, those named in ``apart`` to their own ``.npy``
    (C-contiguous) instead; returns every file written, the ``.npz`` first."""
    path = Path(path)
    rest = dict(arrays)
    files = [path]
    for name in apart:
        files.append(apart_file(path, name))
        np.save(files[-1], np.ascontiguousarray(rest.pop(name)), allow_pickle=False)
    np.savez(path, **rest)  # type: ignore[arg-type]  # numpy's stub matches the names to allow_pickle too
    return files


def read_arrays(path: str | Path, *, apart: Sequence[str] = (), mmap: bool = True) -> dict[str, np.ndarray]:
    """The arrays :func:`save_arrays` wrote: the ``.npz`` members, plus each name in ``apart``
    from its ``.npy`` (memory-mapped copy-on-write when ``mmap``) unless the ``.npz`` holds it.
    An unreadable file is an :class:`ArtifactError` naming it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ArtifactError(f"bundle file {path} cannot be read: {err}") from err
    for name in apart:
        if name in out:
            continue
        p = apart_file(path, name)
        try:
            out[name] = np.asarray(np.load(p, mmap_mode="c" if mmap else None, allow_pickle=False))
        except (OSError, ValueError, EOFError) as err:
            raise ArtifactError(f"bundle file {p} cannot be read: {err}") from err
    return out
