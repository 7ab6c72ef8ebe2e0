"""The torch/torchaudio pair check (apex_rank.compat) and the environment smoke check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from apex_rank.compat import KNOWN_GOOD_PAIRS, check_environment, installed_version

UNDEFINED_SYMBOL = (
    "Could not load this library: /venv/lib/torchaudio/lib/libtorchaudio.so: "
    "undefined symbol: torch_exception_get_what_without_backtrace"
)


def test_environment_check_imports_every_mandated_package() -> None:
    rows = dict(check_environment())
    for dist in ("torch", "torchaudio", "implicit", "lightgbm", "polars", "redis"):
        assert rows[dist] == installed_version(dist) != "not installed"


def test_installed_pair_is_a_known_good_pair() -> None:
    pair = (installed_version("torch").split("+")[0], installed_version("torchaudio").split("+")[0])
    assert pair in KNOWN_GOOD_PAIRS


def test_mismatched_pair_fails_at_import_with_one_clear_line(tmp_path: Path) -> None:
    # A torchaudio whose native library does not load, as a mismatched wheel fails (the real
    # case, torch 2.13.0 + torchaudio 2.11.1, gives the same OSError; checked by hand).
    fake = tmp_path / "torchaudio"
    fake.mkdir()
    (fake / "__init__.py").write_text(f"raise OSError({UNDEFINED_SYMBOL!r})\n")
    code = "import apex_rank.features.audio"
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("apex_rank.errors.MissingDependencyError: torchaudio ")
    assert f"with torch {installed_version('torch')}" in last
    assert "undefined symbol" in last
    assert "torch 2.14.1 + torchaudio 2.11.1" in last
    assert "pip install -c constraints.txt 'torch==2.14.1' 'torchaudio==2.11.1'" in last

    # the smoke check CI runs first says the same in one line and exits 2
    p = subprocess.run([sys.executable, "-m", "apex_rank.compat"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("apex-rank: error: torchaudio ")
