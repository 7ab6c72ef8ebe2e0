"""Serving on more than one host (issue 14, point 5): the published version names its bundle's
content fingerprint; a host loads the bundle from any local path (``--bundle``) or a folder of
bundles (``--bundle-root``) and refuses one with another fingerprint, at start (exit 2) and
when the follower sees a new version (it keeps serving the old one, degraded)."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apex_rank.ranking.online import OnlineConfig, OnlineRanker, RedisStore, publish
from apex_rank.ranking.online.bundles import BundleMismatchError, bundle_fingerprint, locate_bundle
from apex_rank.ranking.online.engine import RankingEngine

from .online_support import bundle_dir

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engines() -> tuple[RankingEngine, RankingEngine]:
    return RankingEngine.load(bundle_dir(7)), RankingEngine.load(bundle_dir(8))


@pytest.fixture()
def published(redis_url: str, redis_prefix: str,
              engines: tuple[RankingEngine, RankingEngine]) -> Iterator[dict[str, Any]]:
    """Bundle 7 published under the test's namespace."""
    cfg = OnlineConfig(namespace=redis_prefix, follow_interval_s=0.1, retry_s=0.2)
    store = RedisStore(redis_url, redis_prefix)
    publish(engines[0], store, config=cfg)
    try:
        yield {"store": store, "cfg": cfg, "url": redis_url, "ns": redis_prefix}
    finally:
        store.close()


def _copy(seed: int, to: Path) -> str:
    shutil.copytree(bundle_dir(seed), to)
    return str(to)


def test_the_fingerprint_is_the_content_not_the_path(tmp_path: Path) -> None:
    copy = _copy(7, tmp_path / "elsewhere")
    assert bundle_fingerprint(copy) == bundle_fingerprint(bundle_dir(7))
    assert bundle_fingerprint(bundle_dir(8)) != bundle_fingerprint(bundle_dir(7))
    man = Path(copy) / "manifest.json"
    man.write_bytes(man.read_bytes().replace(b"}", b" }", 1))  # any changed byte
    assert bundle_fingerprint(copy) != bundle_fingerprint(bundle_dir(7))


def test_a_copy_at_another_path_serves(published: dict[str, Any], tmp_path: Path) -> None:
    copy = _copy(7, tmp_path / "host-b" / "bundle")
    with OnlineRanker.connect(published["url"], namespace=published["ns"], config=published["cfg"],
                              bundle_dir=copy, follow=False) as ranker:
        assert ranker.version == published["store"].current_version()
        assert ranker.engine.bundle_dir == str(Path(copy).resolve())
        user = ranker.engine.recommender.user_ids[0]  # type: ignore[attr-defined]
        r = ranker.rank(user, k=5)
        assert r.degraded is False and len(r.items) == 5


def test_another_bundle_is_refused_at_start(published: dict[str, Any]) -> None:
    want, other = bundle_fingerprint(bundle_dir(7)), bundle_fingerprint(bundle_dir(8))
    with pytest.raises(BundleMismatchError, match=f"fingerprint {other}.*fingerprint {want}"):
        OnlineRanker.connect(published["url"], namespace=published["ns"], config=published["cfg"],
                             bundle_dir=bundle_dir(8), follow=False)


def test_serve_checks_the_bundle_before_starting(published: dict[str, Any], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from apex_rank.cli.main import main

    for name in ("APEX_RANK_REDIS_URL", "APEX_RANK_ONLINE_CONFIG", "APEX_RANK_HEADER_TIMEOUT_S",
                 "APEX_RANK_BUNDLE", "APEX_RANK_BUNDLE_ROOT"):
        monkeypatch.setenv(name, "")  # restored after the test (cmd_serve sets them)
    started: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: started.append(kw))
    base = ["serve", "--redis", published["url"], "--namespace", published["ns"]]
    want, other = bundle_fingerprint(bundle_dir(7)), bundle_fingerprint(bundle_dir(8))

    assert main([*base, "--bundle", bundle_dir(8)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("apex-rank serve: error: bundle ")
    assert other in err and want in err
    assert main([*base, "--bundle-root", str(tmp_path)]) == 2  # empty root
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and want in err
    assert not started

    root = tmp_path / "bundles"
    _copy(8, root / "b8")
    _copy(7, root / "whatever-name")
    assert main([*base, "--bundle-root", str(root)]) == 0
    assert len(started) == 1
    import os

    assert os.environ["APEX_RANK_BUNDLE_ROOT"] == str(root)
    assert main([*base, "--bundle", _copy(7, tmp_path / "copy")]) == 0


def test_bundle_root_picks_the_matching_bundle(published: dict[str, Any], tmp_path: Path,
                                               engines: tuple[RankingEngine, RankingEngine]) -> None:
    root = tmp_path / "bundles"
    b7, b8 = _copy(7, root / "a"), _copy(8, root / "b")
    assert locate_bundle(bundle_fingerprint(bundle_dir(8)), bundle_root=root) == str(Path(b8).resolve())
    with OnlineRanker.connect(published["url"], namespace=published["ns"], config=published["cfg"],
                              bundle_root=str(root), follow=False) as ranker:
        assert ranker.engine.bundle_dir == str(Path(b7).resolve())
        publish(engines[1], published["store"], config=published["cfg"])
        assert ranker.refresh() == published["store"].current_version()
        assert ranker.engine.bundle_dir == str(Path(b8).resolve())
        assert ranker.bundle_refused is None


def test_the_follower_refuses_a_version_it_lacks_and_keeps_serving(
        published: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture,
        engines: tuple[RankingEngine, RankingEngine]) -> None:
    copy = _copy(7, tmp_path / "only7")
    store = published["store"]
    with OnlineRanker.connect(published["url"], namespace=published["ns"], config=published["cfg"],
                              bundle_dir=copy) as ranker, caplog.at_level(logging.ERROR):
        old = ranker.version
        user = ranker.engine.recommender.user_ids[0]  # type: ignore[attr-defined]
        publish(engines[1], store, config=published["cfg"])  # from bundle 8, which this host lacks
        deadline = time.monotonic() + 10
        while ranker.bundle_refused is None and time.monotonic() < deadline:
            time.sleep(0.05)
        why = ranker.bundle_refused
        assert why is not None and bundle_fingerprint(bundle_dir(8)) in why
        assert bundle_fingerprint(bundle_dir(7)) in why
        assert ranker.version == old  # still the old version, its own items, marked degraded
        r = ranker.rank(user, k=5)
        assert r.degraded is True and r.model_version == str(old) and r.reason == why
        assert {i.source for i in r.items} != {"fallback"}
        assert "not switching to version" in caplog.text

        publish(engines[0], store, config=published["cfg"])  # bundle 7 again: switches
        deadline = time.monotonic() + 10
        while ranker.version != store.current_version() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ranker.version == store.current_version() and ranker.bundle_refused is None
        assert ranker.rank(user, k=5).degraded is False
