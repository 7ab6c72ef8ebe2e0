"""Which local bundle folder serves a published version: content fingerprints and lookup.

A bundle's fingerprint is the SHA-256 (first 16 hex) of its ``manifest.json``. The manifest
lists every component file with its SHA-256 (:func:`apex_rank.manifest.file_checksum`) and
loading verifies them, so the fingerprint names the bundle's content, not its location: a
copy at another path (or on another host) has the same fingerprint, and a changed file either
changes the manifest or fails to load.

A serving host finds the folder of the version it serves by one rule
(:func:`locate_bundle`):

- ``bundle`` given (``serve --bundle PATH``): that folder, and only it; its fingerprint must
  equal the published one.
- ``bundle_root`` given (``serve --bundle-root DIR``): the sub-folder of ``DIR`` (one level
  down, any name) whose fingerprint equals the published one.
- neither: the folder the publisher loaded (``bundle_dir`` in the version's manifest, a path
  on the publishing host), fingerprint checked too.

A folder whose fingerprint differs is refused with :class:`BundleMismatchError`, which names
both fingerprints; it is never loaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from apex_rank.errors import ArtifactError, StoreError

from .store import OnlineStore

MANIFEST = "manifest.json"


class BundleMismatchError(ArtifactError):
    """No local bundle folder has the fingerprint of the published version."""


def bundle_fingerprint(folder: str | Path) -> str:
    """sha256 (16 hex) of a bundle's ``manifest.json``: its content fingerprint (see the module doc)."""
    path = Path(folder) / MANIFEST
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError as err:
        raise ArtifactError(f"bundle manifest {path} cannot be read: {err}") from err


def locate_bundle(fingerprint: str, *, bundle: str | Path | None = None,
                  bundle_root: str | Path | None = None, published_dir: str | None = None,
                  version: int | None = None) -> str:
    """The local folder holding the bundle with ``fingerprint`` (see the module doc for the rule).

    Parameters
    ----------
    fingerprint:
        The published version's fingerprint (its manifest's ``fingerprint``).
    bundle:
        The one folder this host serves (checked, never searched around).
    bundle_root:
        A folder whose sub-folders are bundles (any names).
    published_dir:
        The publisher's ``bundle_dir``, used when neither of the above is given.
    version:
        The published version, for the messages.

    Raises
    ------
    BundleMismatchError
        The folder's fingerprint differs, or no sub-folder of ``bundle_root`` matches.
    ArtifactError
        ``bundle``'s manifest cannot be read, or ``bundle_root`` is not a folder.
    """
    what = "the published bundle" if version is None else f"version {version}"
    if bundle is None and bundle_root is not None:
        root = Path(bundle_root)
        if not root.is_dir():
            raise ArtifactError(f"bundle root {root} is not a folder")
        for sub in sorted(p for p in root.iterdir() if (p / MANIFEST).is_file()):
            try:
                if bundle_fingerprint(sub) == fingerprint:
                    return str(sub.resolve())
            except ArtifactError:
                continue  # an unreadable folder is not the one asked for
        raise BundleMismatchError(f"no bundle under {root} has fingerprint {fingerprint} of {what} "
                                  f"(one sub-folder per bundle, its manifest.json hashed)")
    folder = bundle if bundle is not None else published_dir
    if folder is None:
        raise BundleMismatchError(f"{what} names no bundle folder and none was given")
    found = bundle_fingerprint(folder)
    if found != fingerprint:
        raise BundleMismatchError(f"bundle {folder} has fingerprint {found}, {what} serves "
                                  f"fingerprint {fingerprint}")
    return str(Path(folder).resolve())


def check_published(store: OnlineStore, *, bundle: str | Path | None = None,
                    bundle_root: str | Path | None = None) -> tuple[int, str] | None:
    """The current version of ``store`` and the local folder that serves it (``serve`` checks
    this before starting workers); ``None`` when nothing is published.

    Raises
    ------
    BundleMismatchError
        This host holds no bundle with the version's fingerprint (see :func:`locate_bundle`).
    StoreError
        The store did not answer, or the current version has no manifest.
    """
    version = store.current_version()
    if version is None:
        return None
    meta = store.read_meta(version)
    if meta is None:
        raise StoreError(f"version {version} has no manifest {store.keys.meta(version)}")
    published = meta.get("bundle_dir")
    folder = locate_bundle(str(meta.get("fingerprint")), bundle=bundle, bundle_root=bundle_root,
                           published_dir=None if published is None else str(published),
                           version=version)
    return version, folder
