"""The Recommender end to end on the planted world: columns, batch = single, parity after
save/load, add_songs, similar_songs, fallback, state-path parity, and bad input."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from apex_rank.errors import ArtifactError, ConfigError, SchemaError, UnknownIdError
from apex_rank.ranking.candidates import generate_candidates
from apex_rank.ranking.pipeline import MAX_K, RESULT_SCHEMA, rank_arrays, ranked_frame
from apex_rank.ranking.recommender import Recommender, load_recommender
from apex_rank.ranking.rerank_features import FEATURES, build_feature_frame
from apex_rank.schemas import embeddings_frame
from apex_rank.tasks import APEX_TASKS
from tests.integration.test_recommender_fixtures import build, recommender, train_interactions, world


def _users(n: int = 12) -> list[str]:
    return recommender().user_ids[:n]


def test_recommend_columns_and_order() -> None:
    rec = recommender()
    out = rec.recommend(_users(1)[0], k=15)
    assert out.columns == list(RESULT_SCHEMA)
    assert dict(out.schema) == RESULT_SCHEMA
    assert out.height == 15
    assert out["rank"].to_list() == list(range(1, 16))
    assert out["score"].is_sorted(descending=True)
    assert set(out["source"].unique()) <= {"als", "content", "pseudo_cf", "fresh"}
    assert not set(out["song_id"]) & set(rec.user_state(_users(1)[0]).history)


def test_batch_equals_single() -> None:
    rec = recommender()
    users = _users(12) + ["nobody-1"]
    batch = rec.recommend_batch(users, k=10)
    assert batch["user_id"].unique(maintain_order=True).to_list() == users
    for u in users:
        single = rec.recommend(u, k=10)
        part = batch.filter(pl.col("user_id") == u).drop("user_id")
        assert part.equals(single), u


def test_batch_in_chunks_equals_single_whatever_the_batch() -> None:
    """recommend_batch ranks ``batch_users`` users at a time: across several chunks each user's
    rows equal recommend() for that user, and the same in another batch (rows depend on their
    own user only)."""
    base = recommender()
    rec = Recommender(dataclasses.replace(base.parts, config=dataclasses.replace(base.config, batch_users=7)))
    users = _users(30) + ["nobody-1"]
    batch = rec.recommend_batch(users, k=10)
    other = rec.recommend_batch(users[20:5:-1], k=10)
    assert batch["user_id"].unique(maintain_order=True).to_list() == users
    for u in users:
        single = base.recommend(u, k=10)
        assert batch.filter(pl.col("user_id") == u).drop("user_id").equals(single), u
        if u in users[6:21]:
            assert other.filter(pl.col("user_id") == u).drop("user_id").equals(single), u


def test_duplicate_ids_in_batch_are_answered_once() -> None:
    rec = recommender()
    u = _users(2)
    out = rec.recommend_batch([u[0], u[1], u[0]], k=5)
    assert out["user_id"].to_list() == [u[0]] * 5 + [u[1]] * 5


def test_state_path_matches_recommend() -> None:
    """What an online ranker does with a UserState equals Recommender.recommend."""
    rec = recommender()
    u = _users(1)[0]
    state = rec.user_state(u)
    out = ranked_frame(rank_arrays([state], 10, rec.sources, rec.songs, rec.reranker, rec.config.candidates,
                                   min_cold_share=rec.min_cold_share), [state], rec.songs)
    assert out.drop("user_id").equals(rec.recommend(u, k=10))
    cands = generate_candidates([state], rec.sources, rec.config.candidates)
    feats = build_feature_frame([state], cands, rec.songs)
    assert all(c in feats.columns for c in FEATURES)


def test_song_ages_are_taken_at_each_users_latest_interaction() -> None:
    """``age_days`` is measured from the user's own latest interaction (``last_seen_s``), the
    time their next plays come from, not the table's end: the reranker learns on each user's
    latest interactions, most of which end long before the table's end, so ages taken there
    made every song look older when serving than in training. Unknown: the table's end."""
    rec = recommender()
    last = train_interactions().group_by("user_id").agg(pl.col("ts").dt.epoch("s").max().alias("t")).sort("t")
    u, t = last.row(0)  # the user whose plays stop first
    state = rec.user_state(u)
    assert state.last_seen_s == pytest.approx(t, abs=1.0) and t < rec.songs.now_s - 86400
    cands = generate_candidates([state], rec.sources, rec.config.candidates)
    known = rec.songs.index_of(cands["song_id"].to_list())
    created = rec.songs.created_s[known]
    ages = build_feature_frame([state], cands, rec.songs)["age_days"].to_numpy()
    ok = np.isfinite(created)
    assert ok.any()
    np.testing.assert_allclose(ages[ok], np.maximum(0.0, state.last_seen_s - created[ok]) / 86400.0, rtol=1e-5)
    unknown_time = dataclasses.replace(state, last_seen_s=float("nan"))
    ages_end = build_feature_frame([unknown_time], cands, rec.songs)["age_days"].to_numpy()
    np.testing.assert_allclose(ages_end[ok], np.maximum(0.0, rec.songs.now_s - created[ok]) / 86400.0, rtol=1e-5)


def test_a_request_long_after_the_latest_play_gets_the_als_order() -> None:
    """``at``: within the reranker's ``max_gap_s`` of the user's latest play (or not given)
    the trees rank; later, the ALS order with the trees breaking ties only and the new-song
    floor's songs where their scores put them. The planted world
    has no sessions, and its validation shows the trees helping users who come back after more
    than a day, so its build trusts them at every gap (``max_gap_s`` None in the report)."""
    rec = recommender()
    back = rec.report["returning_users"]
    assert back["n_validation_users"] >= 30 and back["ndcg_trees"] >= 1.05 * back["ndcg_als_order"]
    assert rec.report["max_gap_s"] is None and rec.reranker.max_gap_s == float("inf")
    u = _users(1)[0]
    seen = rec.user_state(u).last_seen_s
    now = rec.recommend(u, k=10)
    assert now.equals(rec.recommend(u, k=10, at=seen + 1e9))
    weight = rec.reranker.tree_weight
    try:
        rec.reranker.max_gap_s = gap = 86400.0
        assert now.equals(rec.recommend(u, k=10, at=seen + gap))
        later = rec.recommend(u, k=10, at=seen + gap + 1.0)
        assert rec.recommend_batch([u], k=10, at=seen + gap + 1.0).drop("user_id").equals(later)
        # what a reranker that never earned its place serves, the new-song floor placed by
        # score (its spread was chosen on requests that continue a history)
        rec.reranker.tree_weight = 1e-4
        spread = rec.recommend(u, k=10)
        by_score = spread.sort(["score", "song_id"], descending=[True, False])
        assert later["song_id"].to_list() == by_score["song_id"].to_list()
    finally:
        rec.reranker.tree_weight, rec.reranker.max_gap_s = weight, float("inf")


def test_unknown_user_gets_fallback() -> None:
    rec = recommender()
    out = rec.recommend("never-seen", k=7)
    assert out.height == 7 and set(out["source"]) == {"fallback"}
    assert out["score"].is_sorted(descending=True)
    assert rec.recommend("never-seen", k=7, exclude=out["song_id"][:3].to_list())["song_id"][0] == out["song_id"][3]


def test_new_user_state_from_history() -> None:
    rec = recommender()
    u = _users(1)[0]
    st = rec.user_state(u)
    fresh = rec.state_from_history("new-user", list(st.history))
    assert fresh.cf_factor is not None and fresh.profile is not None
    # the ALS user step from the same history lands close to the fitted factor
    cos = float(fresh.cf_factor @ st.cf_factor / np.linalg.norm(fresh.cf_factor) / np.linalg.norm(st.cf_factor))
    assert cos > 0.9


def test_exclude_and_k_larger_than_catalogue() -> None:
    rec = recommender()
    u = _users(1)[0]
    first = rec.recommend(u, k=5)
    again = rec.recommend(u, k=5, exclude=first["song_id"].to_list())
    assert not set(again["song_id"]) & set(first["song_id"])
    n_hist = len(rec.user_state(u).history)
    assert MAX_K > len(rec.songs)
    everything = rec.recommend(u, k=MAX_K)
    assert everything.height == len(rec.songs) - n_hist  # every rankable song, no more
    assert everything["song_id"].n_unique() == everything.height
    for bad in (0, MAX_K + 1, 10**9, True, 2.0):
        with pytest.raises(ConfigError, match=rf"k must be an integer in \[1, {MAX_K}\]"):
            rec.recommend(u, k=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="k must be an integer"):
        rec.recommend_batch([u], k=10**9)
    with pytest.raises(ConfigError, match="k must be an integer"):
        rec.similar_songs(rec.songs.song_ids[0], k=MAX_K + 1)


def test_similar_songs() -> None:
    rec = recommender()
    s = rec.songs.song_ids[3]
    out = rec.similar_songs(s, k=5)
    assert out.height == 5 and s not in out["song_id"].to_list()
    assert {"song_id", "score", "rank", "is_cold", *APEX_TASKS} <= set(out.columns)
    with pytest.raises(UnknownIdError, match="'nope' is not in the catalogue"):
        rec.similar_songs("nope")


def test_save_load_parity(tmp_path: Path) -> None:
    rec = recommender()
    rec.save(tmp_path / "b")
    assert not list((tmp_path / "b").rglob("*.pkl"))
    back = load_recommender(tmp_path / "b", device="cpu")
    users = _users(20) + ["nobody"]
    assert back.recommend_batch(users, k=10).equals(rec.recommend_batch(users, k=10))
    assert back.reranker.tree_weight == rec.reranker.tree_weight == rec.report["reranker_tree_weight"]
    # a build whose trees did not beat the ALS order on validation: the weight travels with the bundle
    rec.reranker.tree_weight = rec.report["reranker_tree_weight"] = 1e-4
    rec.save(tmp_path / "b2")
    back2 = load_recommender(tmp_path / "b2", device="cpu")
    assert back2.reranker.tree_weight == 1e-4
    assert back2.recommend_batch(users, k=10).equals(rec.recommend_batch(users, k=10))
    rec.reranker.tree_weight = rec.report["reranker_tree_weight"] = back.reranker.tree_weight
    gap = rec.report["max_gap_s"]
    assert back.reranker.max_gap_s == rec.reranker.max_gap_s == (float("inf") if gap is None else gap)
    assert back.similar_songs(rec.songs.song_ids[0], 5).equals(rec.similar_songs(rec.songs.song_ids[0], 5))
    man = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert man["kind"] == "apex-recommender" and man["schema"] == 5 and "lightgbm" in man["versions"]
    # issue 15: the large arrays are memory-mapped from their .npy files, the ALS matrix held once
    for arr in (back.songs.embeddings, back.songs.cf_factors, back.songs.pseudo_factors, back.cf.item_factors,
                back.cf.user_factors, back._users.profiles, back._users.hist_indices):
        assert isinstance(arr.base, np.memmap), type(arr.base)
    assert back.sources[0].factors is back.cf.item_factors and rec.sources[0].factors is rec.cf.item_factors
    assert "config" in man and "reranker.txt" in man["files"]
    assert {d["feature"] for d in man["feature_importance"]} == set(FEATURES)


def test_bundle_from_another_schema_or_missing_file(tmp_path: Path) -> None:
    rec = recommender()
    b = rec.save(tmp_path / "b")
    newer = tmp_path / "newer"
    shutil.copytree(b, newer)
    man = json.loads((newer / "manifest.json").read_text())
    man["schema"] = 99
    (newer / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="schema version 99 is newer"):
        load_recommender(newer)
    man["schema"] = 2  # a bundle of the previous feature set (ages at the table end): refused, rebuild
    (newer / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="bundle schema 2 was built by an older apex-rank.*rebuild"):
        load_recommender(newer)
    man["schema"] = 3  # arrays inside .npz files (issue 15 moved the large ones to memory-mapped .npy)
    (newer / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match=r"bundle schema 3 was built by an older apex-rank \(its large arrays.*"
                                            r"\.npy.*rebuild"):
        load_recommender(newer)
    man["schema"] = 4  # users without the history weights and profile mass of the online update (issue 12)
    (newer / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match=r"bundle schema 4 was built by an older apex-rank \(its users lack the "
                                            r"history weights.*rebuild"):
        load_recommender(newer)
    (b / "reranker.txt").unlink()
    with pytest.raises(ArtifactError, match="reranker.txt"):
        load_recommender(b)


def test_tampered_bundle_files_are_one_error_naming_the_file(tmp_path: Path) -> None:
    """Checked against the manifest's sizes and SHA-256 before LightGBM/FAISS/numpy read them: a
    truncated reranker.txt once made LightGBM segfault; a songs.npz from another bundle served."""
    rec = recommender()
    good = rec.save(tmp_path / "good")
    man = json.loads((good / "manifest.json").read_text())
    assert set(man["checksums"]) == set(man["files"]) and all(len(c["sha256"]) == 64 for c in man["checksums"].values())
    cases = {
        "reranker.txt": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),  # truncated
        "songs.npz": lambda p: p.write_bytes(p.read_bytes()[:-1] + bytes([p.read_bytes()[-1] ^ 1])),  # one bit
        "content.faiss": lambda p: p.write_bytes(b"\0" * p.stat().st_size),  # same size, other bytes
        "apex/head.safetensors": lambda p: p.write_bytes(p.read_bytes() + b"x"),
    }
    for name, tamper in cases.items():
        b = tmp_path / name.replace("/", "_")
        shutil.copytree(good, b)
        tamper(b / name)
        with pytest.raises(ArtifactError, match=re.escape(str(b / name))):
            load_recommender(b)
    # the CLI: exit 2 with one line, nothing ranked
    b = tmp_path / "cli"
    shutil.copytree(good, b)
    cases["reranker.txt"](b / "reranker.txt")
    proc = subprocess.run([sys.executable, "-m", "apex_rank.cli.main", "recommend", "--bundle", str(b), "--user",
                           rec.user_ids[0]], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "reranker.txt" in proc.stderr and "Traceback" not in proc.stderr and proc.stdout == ""


def _rewrite_npz(bundle: Path, name: str, **changes: np.ndarray) -> None:
    """Change arrays of a bundle file and re-record its checksum: a bundle that is consistent on
    disk but wrong inside (a buggy build, or parts of two bundles with a regenerated manifest).
    An array kept apart in ``<stem>.<key>.npy`` is rewritten there."""
    from apex_rank.manifest import file_checksum

    stem = name.removesuffix(".npz")
    for key in [k for k in changes if (bundle / f"{stem}.{k}.npy").is_file()]:
        np.save(bundle / f"{stem}.{key}.npy", changes.pop(key), allow_pickle=False)
        _rewrite_npz(bundle, f"{stem}.{key}.npy")
    if name.endswith(".npz"):
        with np.load(bundle / name, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        arrays.update(changes)
        np.savez(bundle / name, **arrays)
    man = json.loads((bundle / "manifest.json").read_text())
    man["checksums"][name] = file_checksum(bundle / name)
    (bundle / "manifest.json").write_text(json.dumps(man))


def test_bundle_parts_that_do_not_belong_together_are_refused(tmp_path: Path) -> None:
    rec = recommender()
    good = rec.save(tmp_path / "good")
    with np.load(good / "songs.npz", allow_pickle=False) as z:
        songs = {k: z[k] for k in z.files}
    hist = np.load(good / "users.hist_indices.npy", allow_pickle=False)  # kept apart from users.npz
    trained = int(np.flatnonzero(np.isfinite(songs["priors"]).all(axis=0))[0])
    nan_priors = songs["priors"].copy()
    nan_priors[3, trained] = np.nan
    cases = {
        "songs.npz": [
            ("priors", nan_priors, "priors hold NaN"),
            ("embeddings", rec.songs.embeddings[:, :8], "embeddings has shape"),
            ("song_ids", np.asarray([f"x{i}" for i in range(len(songs["song_ids"]))]), "content index"),
        ],
        "users.npz": [("hist_indices", np.where(np.arange(len(hist)) == 0, 10**6, hist), "outside the catalogue")],
    }
    for name, changes in cases.items():
        for key, value, message in changes:
            b = tmp_path / f"{name}-{key}"
            shutil.copytree(good, b)
            _rewrite_npz(b, name, **{key: value})
            # the index no longer matches the songs; a large array is named by its own file
            where = {"song_ids": "content.faiss", "embeddings": "songs.embeddings.npy"}.get(key, name)
            with pytest.raises(ArtifactError, match=re.escape(str(b / where)) + ".*" + message):
                load_recommender(b)


def test_save_is_atomic_and_never_replaces_a_foreign_folder(tmp_path: Path) -> None:
    rec = recommender()
    b = rec.save(tmp_path / "b")
    before = {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()}

    class Killed(Exception):
        pass

    def dies(path: object) -> None:  # the process "dies" after half the files are written
        raise Killed("killed halfway")

    original = rec.reranker.save
    rec.reranker.save = dies  # type: ignore[method-assign]
    try:
        with pytest.raises(Killed):
            rec.save(b)
    finally:
        rec.reranker.save = original  # type: ignore[method-assign]
    assert {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()} == before  # the old bundle, whole
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary folder left behind
    load_recommender(b)
    rec.save(b)  # a completed save replaces it
    assert load_recommender(b).recommend(rec.user_ids[0], k=5).equals(rec.recommend(rec.user_ids[0], k=5))
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an apex-rank bundle: refusing to replace it"):
        rec.save(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="is not a folder"):
        rec.save(foreign / "notes.txt")


def test_regression_a_saved_bundle_is_readable_by_other_users(tmp_path: Path) -> None:
    """The atomic save writes through mkdtemp/mkstemp (0700/0600): a bundle folder and manifest
    only its writer could read, so a service running as another user could not load it."""
    old = os.umask(0o022)
    try:
        b = recommender().save(tmp_path / "b")
    finally:
        os.umask(old)
    assert stat.S_IMODE(b.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in b.iterdir() if p.is_file()} == {
        p.name: 0o644 for p in b.iterdir() if p.is_file()}


def test_add_songs_rankable_immediately(tmp_path: Path) -> None:
    rec = load_recommender(recommender().save(tmp_path / "b"), device="cpu")  # a private copy
    u = _users(1)[0]
    st = rec.user_state(u)
    # new songs whose embeddings sit right at the user's taste (copies of history songs + noise)
    idx = rec.songs.index_of(st.history[:3])
    w = world()
    E_all = np.asarray(w.embeddings["embedding"].to_list(), dtype=np.float32)
    E = E_all[idx] + 0.01
    ids = ["new-a", "new-b", "new-c"]
    assert rec.add_songs(embeddings_frame(ids, E, encoder="synthetic")) == 3
    assert rec.priors.filter(pl.col("song_id").is_in(ids)).drop_nulls().height == 3
    out = rec.recommend(u, k=len(rec.songs))
    got = out.filter(pl.col("song_id").is_in(ids))
    assert got.height == 3 and got["is_cold"].all()
    assert rec.similar_songs("new-a", 3)["song_id"].to_list()  # searchable
    with pytest.raises(SchemaError, match="'new-a' is already in the catalogue"):
        rec.add_songs(embeddings_frame(["new-a"], E[:1], encoder="synthetic"))
    # the addition survives a save/load round trip
    back = load_recommender(rec.save(tmp_path / "b2"), device="cpu")
    assert back.recommend(u, k=len(rec.songs)).equals(out)


def test_add_songs_with_given_priors_skips_the_predictor(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    rec = load_recommender(recommender().save(tmp_path / "b"), device="cpu")
    E = np.asarray(world().embeddings["embedding"].to_list()[:2], dtype=np.float32) + 0.01
    P = rec.apex.predict(E)
    real, calls = rec.apex.predict, []

    def counting(*args: object, **kwargs: object) -> np.ndarray:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rec.apex, "predict", counting)
    frame = embeddings_frame(["new-a", "new-b"], E, encoder="synthetic")
    for bad, match in [(P[:1], r"priors must be \(2, 7\) for 2 songs; got shape \(1, 7\)"),
                       (np.where(np.arange(7) == 0, np.inf, P), r"priors of song 'new-a' are \[inf"),
                       (np.full_like(P, np.nan), r"priors of song 'new-a' .* must be finite")]:
        with pytest.raises(SchemaError, match=match):
            rec.add_songs(frame, priors=bad)
    assert not rec.songs.index_of(["new-a"])[0] >= 0  # a refused call adds nothing
    assert rec.add_songs(frame, priors=P) == 2 and calls == []
    np.testing.assert_array_equal(rec.songs.priors[rec.songs.index_of(["new-a", "new-b"])], P)


def test_user_with_every_song_consumed() -> None:
    w = world()
    songs = w.songs.head(60)
    emb = w.embeddings.head(60)
    inter = train_interactions().filter(pl.col("song_id").is_in(songs["song_id"].to_list()))
    glutton = pl.DataFrame(
        {"user_id": ["glutton"] * 60, "song_id": songs["song_id"], "ts": [w.cutoff] * 60, "weight": [1.0] * 60}
    ).cast(inter.schema)
    rec = build(songs, emb, pl.concat([inter, glutton]))
    out = rec.recommend("glutton", k=10)
    assert out.height == 0 and out.columns == list(RESULT_SCHEMA)


def test_unknown_songs_in_interactions_are_counted(caplog: pytest.LogCaptureFixture) -> None:
    w = world()
    inter = train_interactions()
    bad = inter.head(5).with_columns(pl.lit("ghost-song").alias("song_id"))
    with caplog.at_level(logging.WARNING, logger="apex_rank.ranking.build"):
        rec = build(w.songs, w.embeddings, pl.concat([inter, bad]))
    assert rec.report["unknown_song_rows"] == 5
    assert rec.report["unknown_song_examples"] == ["ghost-song"]
    assert "5 interaction rows name 1 song ids outside the catalogue" in caplog.text


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_bad_weights_are_rejected(value: float) -> None:
    w = world()
    inter = train_interactions()
    bad = inter.with_columns(
        pl.when(pl.int_range(pl.len()) == 3).then(value).otherwise(pl.col("weight")).alias("weight")
    )
    with pytest.raises(SchemaError, match=r"weight .* at row 3 .* is not a number in \[0, 1e\+12\]"):
        build(w.songs, w.embeddings, bad)


def test_empty_history_and_empty_table() -> None:
    rec = recommender()
    st = rec.state_from_history("empty", [])
    assert st.is_unknown
    out = rec.recommend_states([st], 5)
    assert set(out["source"]) == {"fallback"}
    w = world()
    with pytest.raises(SchemaError, match="interactions table is empty"):
        build(w.songs, w.embeddings, train_interactions().head(0))


def test_history_with_unknown_songs_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    rec = recommender()
    with caplog.at_level(logging.WARNING, logger="apex_rank.ranking.recommender"):
        st = rec.state_from_history("x", ["ghost-1", rec.songs.song_ids[0]])
    assert "names 1 song ids outside the catalogue" in caplog.text
    assert st.history == ("ghost-1", rec.songs.song_ids[0]) and st.profile is not None


def test_bpr_recommender_builds_and_ranks() -> None:
    from dataclasses import replace

    from apex_rank.ranking.cf import CFConfig
    from tests.integration.test_recommender_fixtures import TEST_CONFIG

    w = world()
    cfg = replace(TEST_CONFIG, cf=CFConfig(model="bpr", factors=16, iterations=30, learning_rate=0.05))
    rec = build(w.songs, w.embeddings, train_interactions(), cfg)
    u = rec.user_ids[0]
    out = rec.recommend(u, k=10)
    assert out.height == 10 and rec.cf.config.model == "bpr"
    assert rec.recommend_batch([u], k=10).drop("user_id").equals(out)


def test_build_without_ts_or_popularity_trains_apex_on_the_way() -> None:
    """No ``ts`` (random reranker slice), no streams/likes (APEX popularity from interaction counts)."""
    from dataclasses import replace

    from apex_rank.ranking.recommender import ApexFitConfig, Recommender
    from apex_rank.threads import using_threads
    from tests.integration.test_recommender_fixtures import TEST_CONFIG

    w = world()
    songs = w.songs.drop("streams", "likes")
    cfg = replace(TEST_CONFIG, apex=ApexFitConfig(epochs=3, patience=2))
    with using_threads(1):
        rec = Recommender.build(songs, w.embeddings, train_interactions().drop("ts"), cfg)
    assert rec.apex is not None and rec.priors.height == len(rec.songs)
    assert rec.priors["score_streams"].null_count() == 0
    assert rec.recommend(rec.user_ids[0], k=5).height == 5
