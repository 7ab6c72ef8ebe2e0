"""Fuzz suite: the CLI on bad tables, tampered bundles, bad checkpoints and ``--out`` conflicts.

Every case must end the command with exit status 2 and one line on stderr (no traceback) naming
the file, row, column or id at fault, and must leave the folder it works in as it was: no new or
changed file, so nothing that looks like a complete output. An ``--out`` conflict must also be
found before any work starts (nothing on stdout).

Each case runs ``apex-rank`` in its own process, forked from a forkserver that imported the CLI
once (a fresh interpreter spends about 3 s importing torch): the exit status, the stderr and a
crash (a signal) are that process's own; one test checks the runner against
``python -m apex_rank.cli.main``. The two small bundles the cases tamper with are built once per
module through the same runner. The test ids number the cases; the terminal summary counts them.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import pickle
import shutil
import sys
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from apex_rank.synthetic import WorldConfig, make_world

pytestmark = pytest.mark.integration

CONFIG = 'cf_grid = []\n[cf]\nfactors = 8\niterations = 4\n[reranker]\nn_estimators = 20\n[apex]\nepochs = 2\n'
CASE_TIMEOUT_S = 120.0


# ----------------------------------------------------------------------------- the runner


@dataclasses.dataclass(frozen=True)
class Outcome:
    rc: int | None  # None: killed after CASE_TIMEOUT_S; negative: killed by that signal
    stdout: str
    stderr: str
    seconds: float


def _cli_child(argv: list[str], out: str, err: str) -> None:
    """Runs in the forked process: stdout/stderr to files, then the CLI as ``python -m`` would.
    An uncaught exception is printed with its traceback by multiprocessing, exit status 1."""
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    from apex_rank.cli.main import main

    sys.exit(main(argv))


@pytest.fixture(scope="module")
def run_cli(tmp_path_factory: pytest.TempPathFactory) -> Callable[[list[str]], Outcome]:
    """``run(argv)`` runs ``apex-rank --threads 1 *argv`` in a forked process and returns its outcome."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["apex_rank.cli.main", "apex_rank.cli.apex_cmds", "polars", "lightgbm", "faiss",
                                "implicit", "tests.integration.test_fuzz_cli"])
    logs = tmp_path_factory.mktemp("fuzz-logs")
    counter = iter(range(10**6))

    def run(argv: list[str]) -> Outcome:
        i = next(counter)
        out, err = logs / f"{i}.out", logs / f"{i}.err"
        t0 = time.perf_counter()
        p = ctx.Process(target=_cli_child, args=(["--threads", "1", *argv], str(out), str(err)))
        p.start()
        p.join(CASE_TIMEOUT_S)
        if p.is_alive():
            p.kill()
            p.join()
            rc = None
        else:
            rc = p.exitcode
        read = lambda f: f.read_text(errors="replace") if f.exists() else ""  # noqa: E731
        return Outcome(rc, read(out), read(err), time.perf_counter() - t0)

    return run


# ----------------------------------------------------------------------------- the good inputs


@dataclasses.dataclass(frozen=True)
class Base:
    """Good inputs shared by every case (never modified by a case)."""

    dir: Path
    songs: pl.DataFrame
    emb: pl.DataFrame
    inter: pl.DataFrame
    config: Path
    bundle: Path  # built from the tables above
    other_bundle: Path  # built from another world (same shapes)

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def apex(self) -> Path:
        return self.bundle / "apex"


def _write_world(folder: Path, seed: int) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    w = make_world(WorldConfig(n_songs=300, n_users=80, dim=16, interactions_per_user=20, seed=seed))
    inter = w.interactions.filter(pl.col("ts") < w.cutoff)
    folder.mkdir(parents=True, exist_ok=True)
    w.songs.write_parquet(folder / "songs.parquet")
    w.embeddings.write_parquet(folder / "emb.parquet")
    inter.write_parquet(folder / "inter.parquet")
    return w.songs, w.embeddings, inter


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, run_cli: Callable[[list[str]], Outcome]) -> Base:
    d = tmp_path_factory.mktemp("fuzz-base")
    (d / "config.toml").write_text(CONFIG)
    songs, emb, inter = _write_world(d, seed=3)
    _write_world(d / "other", seed=4)
    for folder, bundle in ((d, d / "bundle"), (d / "other", d / "other" / "bundle")):
        res = run_cli(["build", "--songs", str(folder / "songs.parquet"), "--embeddings", str(folder / "emb.parquet"),
                       "--interactions", str(folder / "inter.parquet"), "--config", str(d / "config.toml"),
                       "--out", str(bundle)])
        assert res.rc == 0, res.stderr
    return Base(d, songs, emb, inter, d / "config.toml", d / "bundle", d / "other" / "bundle")


# ----------------------------------------------------------------------------- the cases

Maker = Callable[[Path, Base], list[str]]  # writes the bad input into the case folder, returns argv
Table = Callable[[Base], pl.DataFrame]  # a bad table made from the good ones


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    make: Maker
    names: tuple[str, ...]  # what the error line must name ("{tmp}" is the case folder)
    quiet: bool = False  # refused before any work: nothing on stdout


CASES: list[Case] = []


def add(name: str, make: Maker, *names: str, quiet: bool = False) -> None:
    CASES.append(Case(name, make, names, quiet))


def case(name: str, *names: str, quiet: bool = False) -> Callable[[Maker], None]:
    """Decorator form of :func:`add`."""
    return lambda make: add(name, make, *names, quiet=quiet)


def set_value(df: pl.DataFrame, column: str, row: int, value: object, dtype: pl.DataType | None = None) -> pl.DataFrame:
    """``df`` with ``column[row] = value`` (the column cast to ``dtype`` first)."""
    values = (df[column].cast(dtype) if dtype is not None else df[column]).to_list()
    values[row] = value
    return df.with_columns(pl.Series(column, values, dtype=dtype or df.schema[column]))


def tables(tmp: Path, b: Base, bad: dict[str, Table]) -> dict[str, str]:
    """Paths of the songs, emb and inter tables: the good ones, or ``bad[name](b)`` written to ``tmp``."""
    paths = {name: str(b.path(f"{name}.parquet")) for name in ("songs", "emb", "inter")}
    for name, make in bad.items():
        make(b).write_parquet(tmp / f"{name}.parquet")
        paths[name] = str(tmp / f"{name}.parquet")
    return paths


def build_argv(tmp: Path, b: Base, out: Path | None = None, **bad: Table) -> list[str]:
    t = tables(tmp, b, bad)
    return ["build", "--songs", t["songs"], "--embeddings", t["emb"], "--interactions", t["inter"],
            "--config", str(b.config), "--apex-model", str(b.apex), "--out", str(out or tmp / "out")]


def train_apex_argv(tmp: Path, b: Base, out: Path | None = None, **bad: Table) -> list[str]:
    t = tables(tmp, b, bad)
    return ["train-apex", "--songs", t["songs"], "--embeddings", t["emb"], "--out", str(out or tmp / "out"),
            "--epochs", "1", "--device", "cpu"]


def predict_argv(tmp: Path, b: Base, out: Path | None = None, **bad: Table) -> list[str]:
    t = tables(tmp, b, bad)
    return ["predict", "--model", str(b.apex), "--embeddings", t["emb"], "--out", str(out or tmp / "out.parquet"),
            "--device", "cpu"]


def evaluate_argv(tmp: Path, b: Base, out: Path | None = None, **bad: Table) -> list[str]:
    t = tables(tmp, b, bad)
    return ["evaluate", "--interactions", t["inter"], "--songs", t["songs"], "--embeddings", t["emb"],
            "--models", "popularity", "--seeds", "1", "--no-tune", "--k", "5", "--out", str(out or tmp / "out")]


def with_bad(argv: Callable[..., list[str]], **bad: Table) -> Maker:
    return lambda tmp, b: argv(tmp, b, **bad)


# --- embeddings that are not one fixed-width list of finite numbers per song, in every command

def _emb_strings(b: Base) -> pl.DataFrame:
    strings = b.emb.with_columns(pl.col("embedding").list.eval(pl.element().cast(pl.String)))
    return set_value(strings, "embedding", 3, ["loud"] * 16)


def _emb_nested(b: Base) -> pl.DataFrame:
    return b.emb.with_columns(pl.col("embedding").list.eval(pl.concat_list(pl.element(), pl.element())))


BAD_EMBEDDINGS: dict[str, tuple[Table, tuple[str, ...]]] = {
    "strings": (_emb_strings, ("'embedding'", "List(String)")),
    "nested": (_emb_nested, ("'embedding'", "List(List(Float32))")),
    "nan": (lambda b: set_value(b.emb, "embedding", 5, [float("nan")] * 16), ("'s000005'", "NaN")),
    "ragged": (lambda b: set_value(b.emb, "embedding", 7, [0.5] * 15), ("'s000007'", "15")),
    "width-0": (lambda b: b.emb.with_columns(pl.lit([], dtype=pl.List(pl.Float32)).alias("embedding")),
                ("width 0",)),
}
for _kind, (_bad, _names) in BAD_EMBEDDINGS.items():
    add(f"build-emb-{_kind}", with_bad(build_argv, emb=_bad), *_names)
    if _kind in ("strings", "nested"):
        add(f"train-apex-emb-{_kind}", with_bad(train_apex_argv, emb=_bad), *_names)
        add(f"predict-emb-{_kind}", with_bad(predict_argv, emb=_bad), *_names)
        add(f"evaluate-emb-{_kind}", with_bad(evaluate_argv, emb=_bad), *_names)
add("predict-emb-empty", with_bad(predict_argv, emb=lambda b: b.emb.head(0)), "embeddings table is empty")


# --- ids the online API would refuse, at every table boundary

BAD_IDS: dict[str, tuple[str, str, str]] = {  # name: (table, column, bad id)
    "user-space": ("inter", "user_id", "user 7"),
    "user-newline": ("inter", "user_id", "u00001\n"),
    "user-star": ("inter", "user_id", "u*"),
    "song-200-chars": ("inter", "song_id", "s" * 200),
    "songs-table-space": ("songs", "song_id", "my song"),
    "emb-table-star": ("emb", "song_id", "s*"),
}
for _name, (_table, _col, _id) in BAD_IDS.items():
    _bad_ids: Table = lambda b, table=_table, col=_col, bad_id=_id: set_value(getattr(b, table), col, 4, bad_id)  # noqa: E731
    add(f"build-id-{_name}", with_bad(build_argv, **{_table: _bad_ids}), _col, repr(_id), "row 4")
add("evaluate-id-user-space", with_bad(evaluate_argv, inter=lambda b: set_value(b.inter, "user_id", 4, "user 7")),
    "user_id", "'user 7'", "row 4")


# --- timestamps in the wrong unit or out of any plausible range

def _ts_seconds(b: Base) -> pl.DataFrame:
    return b.inter.with_columns(pl.col("ts").dt.epoch("s"))


def _ts_ms_datetime(b: Base, row: int, ms: int) -> pl.DataFrame:
    """``ts`` as a millisecond datetime column (it reaches past the year 292,000) with ``ts[row] = ms``."""
    inter = set_value(b.inter.with_columns(pl.col("ts").cast(pl.Datetime("ms"))), "ts", row, ms, pl.Int64)
    return inter.with_columns(pl.col("ts").cast(pl.Datetime("ms")))


YEAR_8E6_S = (8_000_000 - 1970) * 31_556_952  # seconds since the epoch of the year 8,000,000
BAD_TIMES: dict[str, tuple[Table, tuple[str, ...]]] = {
    "ms": (lambda b: b.inter.with_columns(pl.col("ts").dt.epoch("ms")), ("'ts'", "row 0", "milliseconds")),
    "us": (lambda b: b.inter.with_columns(pl.col("ts").dt.epoch("us")), ("'ts'", "row 0", "microseconds")),
    "one-row-ms": (lambda b: set_value(_ts_seconds(b), "ts", 9, 1_767_225_600_000), ("'ts'", "row 9", "milliseconds")),
    "year-8e6-seconds": (lambda b: set_value(_ts_seconds(b), "ts", 9, YEAR_8E6_S), ("'ts'", "row 9", str(YEAR_8E6_S))),
    "year-8e6-datetime": (lambda b: _ts_ms_datetime(b, 9, YEAR_8E6_S * 1000), ("'ts'", "row 9", "year 8000000")),
    "negative": (lambda b: set_value(_ts_seconds(b), "ts", 2, -86_400 * 365 * 100), ("'ts'", "row 2", "1970")),
}
for _name, (_bad, _names) in BAD_TIMES.items():
    add(f"build-ts-{_name}", with_bad(build_argv, inter=_bad), *_names)
_created_ms: Table = lambda b: b.songs.with_columns(pl.col("created_at").dt.epoch("ms"))  # noqa: E731
add("build-created-at-ms", with_bad(build_argv, songs=_created_ms), "'created_at'", "row 0", "milliseconds")
add("evaluate-ts-ms", with_bad(evaluate_argv, inter=BAD_TIMES["ms"][0]), *BAD_TIMES["ms"][1])


# --- weights

for _name, _w in {"1e308": 1e308, "negative": -1.0, "nan": float("nan"), "inf": float("inf")}.items():
    add(f"build-weight-{_name}", with_bad(build_argv, inter=lambda b, w=_w: set_value(b.inter, "weight", 6, w)),
        "weight", "row 6")


# --- files that are not the table they should be

@case("build-empty-file", "{tmp}/songs.parquet")
def _(tmp: Path, b: Base) -> list[str]:
    argv = build_argv(tmp, b, songs=lambda b: b.songs)
    (tmp / "songs.parquet").write_bytes(b"")
    return argv


@case("build-csv-named-parquet", "{tmp}/inter.parquet")
def _(tmp: Path, b: Base) -> list[str]:
    argv = build_argv(tmp, b, inter=lambda b: b.inter)
    b.inter.write_csv(tmp / "inter.parquet")
    return argv


add("build-empty-table", with_bad(build_argv, inter=lambda b: b.inter.head(0)), "interactions table is empty")
add("build-wrong-columns", with_bad(build_argv, inter=lambda b: b.inter.rename({"user_id": "user", "song_id": "item"})),
    "'user_id'", "missing")


# --- tampered bundles

def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def edit_manifest(bundle: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    man = json.loads((bundle / "manifest.json").read_text())
    edit(man)
    (bundle / "manifest.json").write_text(json.dumps(man))


def reseal(bundle: Path) -> None:
    """Recompute the manifest's checksums, as someone editing a bundle on purpose would."""
    from apex_rank.manifest import file_checksum

    edit_manifest(bundle, lambda man: man.update(checksums={f: file_checksum(bundle / f) for f in man["checksums"]}))


def tampered(tamper: Callable[[Path, Base], None], *, resealed: bool = False, command: str = "recommend") -> Maker:
    """A copy of the good bundle at ``tmp/bundle``, tampered with, then loaded by ``command``."""
    def make(tmp: Path, b: Base) -> list[str]:
        bundle = Path(shutil.copytree(b.bundle, tmp / "bundle"))
        tamper(bundle, b)
        if resealed:
            reseal(bundle)
        if command == "publish":
            return ["publish", "--bundle", str(bundle), "--redis", "redis://127.0.0.1:1/0", "--no-progress"]
        return ["recommend", "--bundle", str(bundle), "--user", "u00001", "-k", "5", "--device", "cpu"]

    return make


def _history_out_of_range(bundle: Path, b: Base) -> None:
    hist = np.load(bundle / "users.hist_indices.npy")  # kept apart from users.npz (bundle schema 4)
    hist[0] = 10**6
    np.save(bundle / "users.hist_indices.npy", hist)


def _swap_songs(bundle: Path, b: Base) -> None:
    shutil.copy(b.other_bundle / "songs.npz", bundle / "songs.npz")


def _no_checksums_truncated_reranker(bundle: Path, b: Base) -> None:
    """A manifest without checksums (as written before they existed) cannot protect LightGBM."""
    edit_manifest(bundle, lambda man: man.pop("checksums"))
    truncate(bundle / "reranker.txt")


def _bad_config(bundle: Path, b: Base) -> None:
    edit_manifest(bundle, lambda man: man["config"]["reranker"].update(n_estimators="many"))


for _file in ("reranker.txt", "songs.npz", "users.npz", "cf.npz", "content.faiss", "apex/head.safetensors"):
    add(f"recommend-truncated-{_file.replace('/', '-')}", tampered(lambda bundle, b, f=_file: truncate(bundle / f)),
        f"{{tmp}}/bundle/{_file}")
for _file in ("reranker.txt", "songs.npz", "users.npz", "cf.npz", "content_map.npz", "content.faiss"):
    add(f"recommend-truncated-resealed-{_file}",
        tampered(lambda bundle, b, f=_file: truncate(bundle / f), resealed=True), f"{{tmp}}/bundle/{_file}")
add("recommend-swapped-songs-npz", tampered(_swap_songs), "{tmp}/bundle/songs.npz")
add("recommend-swapped-songs-npz-resealed", tampered(_swap_songs, resealed=True), "{tmp}/bundle")
add("recommend-history-out-of-range-resealed", tampered(_history_out_of_range, resealed=True), "users.npz")
add("recommend-manifest-not-json", tampered(lambda bundle, b: truncate(bundle / "manifest.json")),
    "{tmp}/bundle/manifest.json")
add("recommend-manifest-no-checksums-truncated-reranker", tampered(_no_checksums_truncated_reranker),
    "{tmp}/bundle/reranker.txt")
add("recommend-manifest-bad-config", tampered(_bad_config), "{tmp}/bundle/manifest.json", "n_estimators")
add("publish-truncated-reranker", tampered(lambda bundle, b: truncate(bundle / "reranker.txt"), command="publish"),
    "{tmp}/bundle/reranker.txt")


# --- checkpoints for import-official

class _Payload:
    """Unpickling this would create a folder: the test fails if it ever does."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (os.mkdir, (str(self.target),))


def _official(tmp: Path, fill: float | None = None) -> Path:
    import torch

    from apex_rank.model import ApexHead

    state = ApexHead(32).state_dict()
    if fill is not None:
        state = {k: torch.full_like(v, fill) if v.is_floating_point() else v for k, v in state.items()}
    torch.save({"model_state": state, "task": "full", "shared": 2}, tmp / "best_model.pt")
    return tmp / "best_model.pt"


def import_argv(tmp: Path, checkpoint: Path, out: Path | None = None) -> list[str]:
    return ["import-official", "--checkpoint", str(checkpoint), "--out", str(out or tmp / "out")]


@case("import-pickle-payload", "{tmp}/best_model.pt", "weights-only")
def _(tmp: Path, b: Base) -> list[str]:
    import torch

    torch.save({"model_state": _Payload(tmp / "pwned")}, tmp / "best_model.pt")
    return import_argv(tmp, tmp / "best_model.pt")


@case("import-plain-pickle", "{tmp}/best_model.pt", "weights-only")
def _(tmp: Path, b: Base) -> list[str]:
    (tmp / "best_model.pt").write_bytes(pickle.dumps(_Payload(tmp / "pwned")))
    return import_argv(tmp, tmp / "best_model.pt")


@case("import-truncated", "{tmp}/best_model.pt")
def _(tmp: Path, b: Base) -> list[str]:
    truncate(_official(tmp))
    return import_argv(tmp, tmp / "best_model.pt")


@case("import-text-file", "{tmp}/best_model.pt")
def _(tmp: Path, b: Base) -> list[str]:
    (tmp / "best_model.pt").write_text("not a checkpoint\n")
    return import_argv(tmp, tmp / "best_model.pt")


@case("import-all-nan", "{tmp}/best_model.pt", "NaN")
def _(tmp: Path, b: Base) -> list[str]:
    return import_argv(tmp, _official(tmp, fill=float("nan")))


# --- --out conflicts, refused before any work

def _a_file(tmp: Path, name: str = "taken") -> Path:
    (tmp / name).write_text("keep me\n")
    return tmp / name


def _a_folder(tmp: Path, name: str = "taken") -> Path:
    (tmp / name).mkdir()
    (tmp / name / "notes.txt").write_text("keep me\n")
    return tmp / name


@case("build-out-is-a-file", "{tmp}/taken", quiet=True)
def _(tmp: Path, b: Base) -> list[str]:
    return build_argv(tmp, b, out=_a_file(tmp))


@case("build-out-non-bundle-folder", "{tmp}/taken", quiet=True)
def _(tmp: Path, b: Base) -> list[str]:
    return build_argv(tmp, b, out=_a_folder(tmp))


@case("build-out-under-a-file", "{tmp}/taken", quiet=True)
def _(tmp: Path, b: Base) -> list[str]:
    return build_argv(tmp, b, out=_a_file(tmp) / "bundle")


@case("build-out-in-a-read-only-folder", "{tmp}/locked", quiet=True)
def _(tmp: Path, b: Base) -> list[str]:
    if os.geteuid() == 0:
        pytest.skip("root may write into any folder")
    (tmp / "locked").mkdir(mode=0o500)
    return build_argv(tmp, b, out=tmp / "locked" / "bundle")


add("train-apex-out-is-a-file", lambda tmp, b: train_apex_argv(tmp, b, out=_a_file(tmp)), "{tmp}/taken", quiet=True)
add("predict-out-is-a-folder", lambda tmp, b: predict_argv(tmp, b, out=_a_folder(tmp)), "{tmp}/taken", quiet=True)


@case("import-out-is-a-file", "{tmp}/taken", quiet=True)
def _(tmp: Path, b: Base) -> list[str]:
    return import_argv(tmp, _official(tmp), out=_a_file(tmp))


add("evaluate-out-is-a-file", lambda tmp, b: evaluate_argv(tmp, b, out=_a_file(tmp)), "{tmp}/taken", quiet=True)


@case("evaluate-apex-out-is-a-file", "{tmp}/taken", quiet=True)
def _(tmp: Path, b: Base) -> list[str]:
    return ["evaluate-apex", "--model", str(b.apex), "--songs", str(b.path("songs.parquet")),
            "--embeddings", str(b.path("emb.parquet")), "--out", str(_a_file(tmp))]


@case("embed-out-is-a-folder", "{tmp}/taken", quiet=True)
def _(tmp: Path, b: Base) -> list[str]:
    (tmp / "audio").mkdir()
    with wave.open(str(tmp / "audio" / "tone.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.sin(np.arange(32000) * 0.05) * 8000).astype("<i2").tobytes())
    return ["embed", str(tmp / "audio"), "--out", str(_a_folder(tmp)), "--no-progress"]


@case("export-events-out-is-a-folder", "{tmp}/taken", quiet=True)
def _(tmp: Path, b: Base) -> list[str]:
    return ["export-events", "--redis", "redis://127.0.0.1:1/0", "--out", str(_a_folder(tmp))]


# ----------------------------------------------------------------------------- the test


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and mtime (folders: 0, 0)."""
    out = {}
    for p in folder.rglob("*"):
        st = p.lstat()
        out[str(p.relative_to(folder))] = (0, 0) if p.is_dir() else (st.st_size, st.st_mtime_ns)
    return out


def classify(res: Outcome) -> str:
    """How the command ended: clean (exit 2, one line), traceback, crash, silently wrong (exit 0)
    or other (another status, several lines without a traceback)."""
    if res.rc is None or res.rc < 0 or res.rc > 128:
        return "crash"
    if "Traceback" in res.stderr:
        return "traceback"
    if res.rc == 0:
        return "silently wrong"
    return "clean" if res.rc == 2 and len(res.stderr.strip().splitlines()) == 1 else "other"


KINDS = ("clean", "traceback", "crash", "silently wrong", "other", "vague or wrote output")
RESULTS: dict[str, tuple[str, int | None]] = {}


@pytest.fixture(scope="module", autouse=True)
def _summary(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if not RESULTS:
        return
    counts = {k: sum(how == k for how, _ in RESULTS.values()) for k in KINDS}
    lines = [f"fuzz: {len(RESULTS)} of {len(CASES)} cases run: " + ", ".join(f"{v} {k}" for k, v in counts.items())]
    lines += [f"  {name}: {how} (exit {rc})" for name, (how, rc) in RESULTS.items() if how != "clean"]
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + "\n".join(lines))


@pytest.mark.parametrize("case", CASES, ids=[f"{i + 1:02d}of{len(CASES)}-{c.name}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_exit_2(case: Case, base: Base, run_cli: Callable[[list[str]], Outcome],
                                      tmp_path: Path) -> None:
    argv = case.make(tmp_path, base)
    before = snapshot(tmp_path)
    res = run_cli(argv)
    how = classify(res)
    err = res.stderr.strip()
    problems = [f"the error does not name {n.format(tmp=tmp_path)!r}" for n in case.names
                if n.format(tmp=tmp_path) not in err]
    if snapshot(tmp_path) != before:
        problems.append("the failed command wrote or changed files")
    if case.quiet and res.stdout:
        problems.append(f"work started before the --out conflict was found: {res.stdout[:300]!r}")
    if how == "clean" and problems:
        how = "vague or wrote output"
    RESULTS[case.name] = (how, res.rc)
    assert how == "clean", f"{how}: exit {res.rc}; {'; '.join(problems)}\n{err[-3000:]}"


def test_the_runner_matches_the_real_entry_point(base: Base, run_cli: Callable[[list[str]], Outcome],
                                                 tmp_path: Path) -> None:
    """The forked runner ends as ``python -m apex_rank.cli.main`` does: same status and output,
    for an error and for a success."""
    import subprocess

    for argv in (build_argv(tmp_path, base, inter=BAD_TIMES["ms"][0]),
                 ["recommend", "--bundle", str(base.bundle), "--user", "u00001", "-k", "3", "--device", "cpu"]):
        real = subprocess.run([sys.executable, "-m", "apex_rank.cli.main", "--threads", "1", *argv],
                              capture_output=True, text=True, timeout=CASE_TIMEOUT_S)
        forked = run_cli(argv)
        assert (forked.rc, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr)
    assert forked.rc == 0 and "song_id" in forked.stdout
