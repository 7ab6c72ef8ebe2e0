"""Audio ingest over HTTP against the real Redis, with real audio files (issue 14, point 4):
an upload or a path under the allow-list root is embedded with the bundle's encoder in a worker
process and becomes rankable; paths outside the root, bad audio and missing keys are refused
with nothing written."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from apex_rank.errors import RequestError
from apex_rank.features.audio import AudioConfig
from apex_rank.ranking.online import OnlineConfig, OnlineRanker, RedisStore, publish
from apex_rank.ranking.online.access import KeyRing
from apex_rank.ranking.online.audio import AudioEmbedder, AudioIngestConfig
from apex_rank.ranking.online.engine import RankingEngine
from apex_rank.ranking.online.keys import decode_vector

from .online_support import bundle_dir

pytestmark = pytest.mark.integration

KEY = "k-" + "0a1b2c3d" * 4
AUTH = {"Authorization": f"Bearer {KEY}"}


RULE = AudioConfig(segment_s=2.0, min_last_s=0.5)  # not the default rule: ingest must read it from the bundle


@lru_cache(maxsize=1)
def spectral_bundle() -> str:
    """A small bundle whose embeddings are declared to come from the ``spectral`` encoder (its
    width, its id in the table's ``encoder`` column, hence in the APEX predictor's manifest),
    cut by :data:`RULE` (the table's ``segmenting`` column, recorded the same way)."""
    import polars as pl

    from apex_rank.features.encoders import SPECTRAL_DIM, get_encoder
    from apex_rank.ranking.cf import CFConfig
    from apex_rank.ranking.recommender import ApexFitConfig, Recommender, RecommenderConfig
    from apex_rank.ranking.reranker import RerankerConfig
    from apex_rank.synthetic import WorldConfig, make_world
    from apex_rank.threads import using_threads

    world = make_world(WorldConfig(n_songs=300, n_users=80, dim=SPECTRAL_DIM, interactions_per_user=20,
                                   seed=5))
    emb = world.embeddings.with_columns(pl.lit(get_encoder("spectral").id).alias("encoder"),
                                        pl.lit(RULE.segmenting()).alias("segmenting"))
    cfg = RecommenderConfig(apex=ApexFitConfig(epochs=2, patience=1, batch_size=512),
                            reranker=RerankerConfig(n_estimators=15, early_stopping_rounds=5),
                            cf=CFConfig(factors=16, iterations=5), seed=5)
    with using_threads(1):
        rec = Recommender.build(world.songs, emb, world.interactions, config=cfg)
    out = Path(tempfile.mkdtemp(prefix="apexrank-audio-bundle-"))
    rec.save(out)
    return str(out)


def _mix(seconds: float, sr: int = 22_050, freqs: tuple[float, ...] = (220.0, 660.0, 1500.0)) -> np.ndarray:
    t = np.arange(round(sr * seconds)) / sr
    x = np.zeros_like(t)
    for i, f in enumerate(freqs):
        x += 0.2 / (i + 1) * np.sin(2 * np.pi * f * t)
    return np.stack([x, 0.7 * x], axis=1).astype(np.float32)


def _write(path: Path, seconds: float = 4.0, sr: int = 22_050, **kw: Any) -> Path:
    sf.write(path, _mix(seconds, sr, **kw), sr)
    return path


def _snapshot(redis_url: str, ns: str) -> dict[bytes, bytes]:
    """Every key of the namespace and its serialised value (metrics snapshots left out)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = [k for k in client.scan_iter(match=f"apexrank:{ns}:*", count=1000) if not k.endswith(b":metrics")]
    return {k: client.dump(k) for k in sorted(keys)}


@pytest.fixture()
def served(redis_url: str, redis_prefix: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A published spectral bundle, an audio root under ``tmp_path`` and a keyed client."""
    from fastapi.testclient import TestClient

    from apex_rank.ranking.online.service import create_app

    root = tmp_path / "root"
    root.mkdir()
    audio = AudioIngestConfig(root=str(root), max_bytes=2_000_000, max_duration_s=30.0)
    cfg = OnlineConfig(namespace=redis_prefix, audio=audio)
    engine = RankingEngine.load(spectral_bundle(), audio=audio)
    publish(engine, RedisStore(redis_url, redis_prefix), config=cfg)
    ranker = OnlineRanker.connect(redis_url, namespace=redis_prefix, config=cfg, engine=engine,
                                  follow=False)
    with TestClient(create_app(ranker, config=cfg, keys=KeyRing.from_keys([KEY])),
                    raise_server_exceptions=False) as client:
        yield {"client": client, "engine": engine, "ranker": ranker, "root": root, "tmp": tmp_path,
               "store": ranker.store, "written": lambda: _snapshot(redis_url, redis_prefix),
               "cfg": cfg}
    ranker.close()


def _offline(path: Path, rule: AudioConfig = RULE) -> np.ndarray:
    from apex_rank.features.embed import EmbedConfig, SongSource, embed_audio

    res = embed_audio([SongSource("x", str(path))], EmbedConfig(encoder="spectral", audio=rule))
    assert not res.skipped, res.skipped
    return np.asarray(res.table["embedding"][0].to_list(), dtype=np.float32)


def _stored(served: dict[str, Any], song_id: str) -> np.ndarray:
    store = served["store"]
    (_, emb), = store.read_songs(store.current_version(), [song_id])
    assert emb is not None
    return decode_vector(emb, song_id)


def _ranked_by_content(served: dict[str, Any], song_id: str) -> list[str]:
    """Users (of the first 80) whose top 50 holds ``song_id`` from a cold-song source, with half
    the slots for new songs: the world's plays end months before the service's clock, so its
    requests get the ALS order with the build's floor of new songs (0.1 here, 5 of the 96 new
    songs per list), and whether an unremarkable tone makes those 5 says nothing about ingest."""
    found = []
    for uid in served["engine"].recommender.user_ids[:80]:
        r = served["client"].get("/recommend", params={"user_id": uid, "k": 50, "cold_share": 0.5})
        assert r.status_code == 200, r.text
        found += [uid for it in r.json()["items"]
                  if it["song_id"] == song_id and it["source"] in ("content", "pseudo_cf", "fresh")]
    return found


def test_upload_makes_the_song_rankable_with_the_offline_embedding(served: dict[str, Any]) -> None:
    path = _write(served["tmp"] / "new.flac", 6.0)
    r = served["client"].post("/songs/up1/audio", content=path.read_bytes(),
                              headers={**AUTH, "Content-Type": "audio/flac"}, params={"popularity": 3})
    assert r.status_code == 200, r.text
    assert r.json()["song_id"] == "up1" and np.isfinite(r.json()["priors"]).all()
    stored = _stored(served, "up1")
    assert stored.shape == (served["engine"].embedding_dim,)
    np.testing.assert_allclose(stored, _offline(path), atol=1e-5, rtol=0)
    assert served["engine"].recommender.apex.segmenting == RULE.segmenting()  # recorded by build, saved, loaded
    assert not np.allclose(stored, _offline(path, AudioConfig()), atol=1e-3)  # the default rule cuts it otherwise
    assert _ranked_by_content(served, "up1"), "the uploaded song reached no user's top 50"
    again = served["client"].post("/songs/up1/audio", content=path.read_bytes(),
                                  headers={**AUTH, "Content-Type": "audio/flac"})
    assert again.status_code == 422 and "already exists" in again.json()["detail"]
    metrics = served["client"].get("/metrics").text  # counted under the route, not per song id
    assert 'apexrank_requests_total{route="/songs/{song_id}/audio",status="200"} 1' in metrics


def test_a_path_under_the_root_is_ingested(served: dict[str, Any]) -> None:
    (served["root"] / "sub").mkdir()
    path = _write(served["root"] / "sub" / "p1.wav", 5.0, freqs=(330.0, 990.0))
    r = served["client"].post("/songs", json={"song_id": "p1", "audio_path": "sub/p1.wav"}, headers=AUTH)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(_stored(served, "p1"), _offline(path), atol=1e-5, rtol=0)
    absolute = served["client"].post("/songs", json={"song_id": "p2", "audio_path": str(path)}, headers=AUTH)
    assert absolute.status_code == 200, absolute.text
    nested = served["client"].post("/songs/calm/p3/audio", content=path.read_bytes(),
                                   headers={**AUTH, "Content-Type": "audio/wav"})
    assert nested.status_code == 200 and nested.json()["song_id"] == "calm/p3", nested.text
    assert served["client"].post("/songs/bad id/audio", content=path.read_bytes(),
                                 headers={**AUTH, "Content-Type": "audio/wav"}).status_code == 422
    assert served["engine"].has_song("p1") and served["engine"].has_song("p2")


def test_paths_outside_the_root_are_403_and_nothing_is_written(served: dict[str, Any]) -> None:
    outside = _write(served["tmp"] / "outside.wav")
    os.symlink(outside, served["root"] / "link.wav")
    (served["root"] / "dir").symlink_to(served["tmp"], target_is_directory=True)
    before = served["written"]()
    for given in ("../outside.wav", str(outside), "link.wav", "dir/outside.wav", "/etc/passwd"):
        r = served["client"].post("/songs", json={"song_id": "o1", "audio_path": given}, headers=AUTH)
        assert r.status_code == 403, (given, r.text)
        assert "outside the audio root" in r.json()["detail"], given
    assert served["written"]() == before and not served["engine"].has_song("o1")
    both = served["client"].post("/songs", json={"song_id": "o1", "audio_path": "a.wav", "embedding": [1.0]},
                                 headers=AUTH)
    assert both.status_code == 422 and "exactly one" in both.text


def test_no_audio_root_refuses_every_path(redis_url: str, redis_prefix: str, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from apex_rank.ranking.online.service import create_app

    cfg = OnlineConfig(namespace=redis_prefix)
    engine = RankingEngine.load(spectral_bundle())
    publish(engine, RedisStore(redis_url, redis_prefix), config=cfg)
    path = _write(tmp_path / "a.wav")
    with OnlineRanker.connect(redis_url, namespace=redis_prefix, config=cfg, engine=engine,
                              follow=False) as ranker, TestClient(create_app(ranker, config=cfg)) as c:
        r = c.post("/songs", json={"song_id": "n1", "audio_path": str(path)})
    assert r.status_code == 403 and "no audio root" in r.json()["detail"]
    assert not engine.has_song("n1")


def _truncated_flac(tmp: Path) -> bytes:
    data = _write(tmp / "whole.flac", 8.0).read_bytes()
    return data[: len(data) // 2]


def _nan_wav(tmp: Path) -> bytes:
    x = _mix(3.0)
    x[1000] = np.nan
    sf.write(tmp / "nan.wav", x, 22_050, subtype="FLOAT")
    return (tmp / "nan.wav").read_bytes()


def _write_bytes(tmp: Path, name: str, **kw: Any) -> bytes:
    return _write(tmp / name, **kw).read_bytes()


# (case, body maker, content type, status, words the reason holds): fuzz-style bad uploads
BAD_UPLOADS: list[tuple[str, Any, str, int, str]] = [
    ("garbage bytes", lambda t: b"RIFF\x10\x00\x00\x00WAVEjunkjunk" * 3, "audio/wav", 422, "cannot be decoded"),
    ("empty body", lambda t: b"", "audio/wav", 422, "empty"),
    ("text as flac", lambda t: b"hello, I am not a song\n" * 40, "audio/flac", 422, "cannot be decoded"),
    ("truncated flac", _truncated_flac, "audio/flac", 422, "decoding failed"),
    ("nan samples", _nan_wav, "audio/wav", 422, "NaN"),
    ("silence", lambda t: _write_bytes(t, "quiet.wav", freqs=()), "audio/wav", 422, "silent"),
    ("too short", lambda t: _write_bytes(t, "short.wav", seconds=0.3), "audio/wav", 422, "too short"),
    ("too long", lambda t: _write_bytes(t, "long.wav", seconds=31.0, sr=8000), "audio/wav", 422, "the limit is 30"),
    ("not an audio type", lambda t: _write_bytes(t, "t.wav"), "application/octet-stream", 415, "not an audio type"),
    ("no content type", lambda t: _write_bytes(t, "n.wav"), "", 415, "not an audio type"),
    ("over max_bytes", lambda t: b"\0" * 2_000_001, "audio/wav", 413, "exceeds the limit"),
]


def test_bad_uploads_are_refused_with_the_reason_and_nothing_is_written(served: dict[str, Any]) -> None:
    client, tmp = served["client"], served["tmp"]
    before = served["written"]()
    for case, make, kind, status, words in BAD_UPLOADS:
        headers = {**AUTH, **({"Content-Type": kind} if kind else {})}
        r = client.post("/songs/bad1/audio", content=make(tmp), headers=headers)
        assert r.status_code == status, (case, r.text)
        detail = r.json()["detail"]
        assert words.lower() in detail.lower(), (case, detail)
        assert "Traceback" not in detail and "apexrank-upload-" not in detail, (case, detail)
        if status == 422:
            assert "uploaded audio of song 'bad1'" in detail, (case, detail)
    assert served["written"]() == before and not served["engine"].has_song("bad1")
    good = client.post("/songs/bad1/audio", content=_write_bytes(tmp, "ok.wav"),
                       headers={**AUTH, "Content-Type": "audio/wav"})
    assert good.status_code == 200, good.text  # the worker survived every bad file


def test_bad_files_under_the_root_are_refused(served: dict[str, Any]) -> None:
    root = served["root"]
    (root / "bad.wav").write_bytes(b"not audio at all")
    (root / "folder.wav").mkdir()
    (root / "big.wav").write_bytes(b"\0" * 2_000_001)
    before = served["written"]()
    for given, words in (("bad.wav", "cannot be decoded"), ("missing.wav", "does not exist"),
                         ("folder.wav", "does not exist"), ("big.wav", "the limit is 2000000")):
        r = served["client"].post("/songs", json={"song_id": "b1", "audio_path": given}, headers=AUTH)
        assert r.status_code == 422 and words in r.json()["detail"], (given, r.text)
    assert served["written"]() == before


def test_audio_writes_need_the_key(served: dict[str, Any]) -> None:
    client = served["client"]
    _write(served["root"] / "k.wav")
    before = served["written"]()
    for headers in ({}, {"Authorization": "Bearer " + "x" * 32}):
        up = client.post("/songs/k1/audio", content=(served["root"] / "k.wav").read_bytes(),
                         headers={**headers, "Content-Type": "audio/wav"})
        assert up.status_code == 401, up.text
        by_path = client.post("/songs", json={"song_id": "k1", "audio_path": "k.wav"}, headers=headers)
        assert by_path.status_code == 401, by_path.text
    assert served["written"]() == before


def test_a_bundle_without_an_audio_encoder_is_refused_naming_bundle_and_encoder(tmp_path: Path) -> None:
    engine = RankingEngine.load(bundle_dir(7))  # synthetic embeddings: encoder "synthetic"
    path = _write(tmp_path / "a.wav")
    with pytest.raises(RequestError, match=r"bundle .*apexrank-online-bundle7.* encoder 'synthetic'.* cannot rebuild"):
        engine.embed_audio(path)
    engine.close()


def test_a_slow_file_is_stopped_and_the_next_one_gets_a_fresh_worker(tmp_path: Path) -> None:
    from apex_rank.features.encoders import get_encoder

    path = _write(tmp_path / "a.wav", 20.0)
    emb = AudioEmbedder("b/", get_encoder("spectral").id, 238, AudioIngestConfig(timeout_s=1e-3))
    try:
        with pytest.raises(RequestError, match=r"a\.wav: not embedded within 0\.001 s; its worker was stopped"):
            emb.embed(path)
        emb.config = replace(emb.config, timeout_s=60.0)  # a bare embedder: the default rule
        np.testing.assert_allclose(emb.embed(path), _offline(path, AudioConfig()), atol=1e-5, rtol=0)
    finally:
        emb.close()


def test_serve_audio_root_flag_and_toml(tmp_path: Path) -> None:
    import json

    from apex_rank.cli.main import build_parser
    from apex_rank.cli.serve_cmds import serve_config
    from apex_rank.config import from_dict, to_dict
    from apex_rank.errors import ConfigError

    toml = tmp_path / "serve.toml"
    toml.write_text("[online.audio]\nmax_bytes = 1000000\ntimeout_s = 30.0\n")
    (tmp_path / "songs").mkdir()
    cfg = serve_config(build_parser().parse_args(["serve", "--config", str(toml), "--audio-root",
                                                  str(tmp_path / "songs" / ".." / "songs")]))
    assert cfg.audio == AudioIngestConfig(root=str((tmp_path / "songs").resolve()), max_bytes=1_000_000,
                                          timeout_s=30.0)
    assert from_dict(OnlineConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg  # what workers read
    assert serve_config(build_parser().parse_args(["serve"])).audio.root is None
    with pytest.raises(ConfigError, match=r"--audio-root .*nowhere: not a folder"):
        serve_config(build_parser().parse_args(["serve", "--audio-root", str(tmp_path / "nowhere")]))
    toml.write_text("[online.audio]\nmax_mb = 5\n")
    with pytest.raises(ConfigError, match="max_mb"):
        serve_config(build_parser().parse_args(["serve", "--config", str(toml)]))
    with pytest.raises(ConfigError, match=r"online\.audio\.timeout_s must be > 0"):
        AudioIngestConfig(timeout_s=0)


def _worker_pids(emb: AudioEmbedder) -> list[int]:
    pool = emb._pool  # noqa: SLF001 - the test kills a worker as a crashing decoder would
    assert pool is not None
    return [p.pid for p in pool._processes.values()]  # noqa: SLF001


def test_a_crashed_worker_fails_its_file_only_and_the_serving_process_goes_on(tmp_path: Path) -> None:
    import signal
    import threading
    import time

    from apex_rank.features.encoders import get_encoder

    short = _write(tmp_path / "short.wav", 3.0)
    emb = AudioEmbedder("b/", get_encoder("spectral").id, 238, AudioIngestConfig())
    try:
        expected = emb.embed(short)
        # a worker that died between files: the next file gets a fresh worker, no error
        for pid in _worker_pids(emb):
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        np.testing.assert_array_equal(emb.embed(short), expected)
        # a worker that dies during a file: that file is refused, saying so
        long = tmp_path / "long.wav"
        sf.write(long, _mix(900.0, 16_000)[:, 0], 16_000)
        errors: list[str] = []
        for _ in range(3):  # the kill must land while the file is being embedded (~0.7 s)
            got: list[Any] = []
            th = threading.Thread(target=lambda out=got: out.append(_try(emb, long)))
            th.start()
            time.sleep(0.15)
            for pid in _worker_pids(emb):
                os.kill(pid, signal.SIGKILL)
            th.join(60)
            if isinstance(got[0], str):
                errors.append(got[0])
                break
        assert errors and "long.wav: the decoder's worker process died" in errors[0], errors
        np.testing.assert_array_equal(emb.embed(short), expected)
    finally:
        emb.close()


def _try(emb: AudioEmbedder, path: Path) -> np.ndarray | str:
    try:
        return emb.embed(path)
    except RequestError as err:
        return str(err)
