"""Compiled dependencies that must match each other, checked in one place.

torch and torchaudio are an ABI pair: a torchaudio wheel loads only with the torch it was built
against, whatever its metadata says (torchaudio 2.11.1 declares ``torch>=2.11`` but loads only
with torch 2.14.1). A mismatched pair fails deep inside torchaudio with an undefined-symbol
``OSError``; :func:`torchaudio_functional` turns that into one :class:`MissingDependencyError`
naming both installed versions, the pairs known to work and the command that fixes it.

``python -m apex_rank.compat`` imports every mandated package, runs one resample and prints
the versions: CI runs it first, so a broken install fails in seconds with the versions shown.
"""

from __future__ import annotations

import importlib.metadata as md
import sys
from types import ModuleType

from apex_rank.errors import MissingDependencyError

#: (torch, torchaudio) pairs checked to import and resample in a fresh virtual environment.
#: The first is the one ``constraints.txt`` pins.
KNOWN_GOOD_PAIRS: tuple[tuple[str, str], ...] = (("2.14.1", "2.11.1"), ("2.11.0", "2.11.0"))

#: The packages the project is built on, in the order the check imports them.
MANDATED = ("torch", "torchaudio", "faiss-cpu", "implicit", "lightgbm", "polars", "redis")


def installed_version(dist: str) -> str:
    """The installed version of a distribution, or ``"not installed"``."""
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def _local(version: str) -> str:
    return version.split("+", 1)[0]  # "2.14.1+cu130" -> "2.14.1"


def pair_message(cause: BaseException) -> str:
    """The one-line explanation of a torch/torchaudio load failure (see module doc)."""
    torch_v, audio_v = installed_version("torch"), installed_version("torchaudio")
    pairs = ", ".join(f"torch {t} + torchaudio {a}" for t, a in KNOWN_GOOD_PAIRS)
    t, a = KNOWN_GOOD_PAIRS[0]
    known = (_local(torch_v), _local(audio_v)) in KNOWN_GOOD_PAIRS
    why = "a pair known to work, so the install itself is damaged" if known else "not a pair known to work"
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return (
        f"torchaudio {audio_v} cannot be loaded with torch {torch_v} ({why}): {first[:200]}. "
        f"torch and torchaudio are an ABI pair; pairs known to work: {pairs}. "
        f"Fix: pip install -c constraints.txt 'torch=={t}' 'torchaudio=={a}'"
    )


def torchaudio_functional() -> ModuleType:
    """``torchaudio.functional``, or a :class:`MissingDependencyError` naming the mismatched pair."""
    try:
        import torchaudio.functional as functional
    except (OSError, ImportError, RuntimeError, AttributeError) as err:
        raise MissingDependencyError(pair_message(err)) from err
    return functional


def check_environment() -> list[tuple[str, str]]:
    """Import every mandated package, resample one buffer; returns ``(package, version)`` rows.

    Raises :class:`MissingDependencyError` for a package that does not import (a mismatched
    torch/torchaudio pair with :func:`pair_message`).
    """
    import torch

    functional = torchaudio_functional()
    out = functional.resample(torch.zeros(1, 4800), 48_000, 24_000)
    if tuple(out.shape) != (1, 2400):
        raise MissingDependencyError(f"torchaudio resample returned shape {tuple(out.shape)}, expected (1, 2400)")
    for module, dist in (("faiss", "faiss-cpu"), ("implicit", "implicit"), ("lightgbm", "lightgbm"),
                         ("polars", "polars"), ("redis", "redis")):
        try:
            __import__(module)
        except (OSError, ImportError) as err:
            raise MissingDependencyError(f"{module} ({installed_version(dist)}) does not import: {err}") from err
    rows = [("python", sys.version.split()[0])]
    rows += [(d, installed_version(d)) for d in MANDATED]
    if installed_version("faiss-cpu") == "not installed":
        rows.append(("faiss-gpu-cu12", installed_version("faiss-gpu-cu12")))
    return rows


def main() -> int:
    try:
        rows = check_environment()
    except MissingDependencyError as err:
        print(f"apex-rank: error: {err}", file=sys.stderr)
        return 2
    print("environment ok: " + ", ".join(f"{name} {version}" for name, version in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
