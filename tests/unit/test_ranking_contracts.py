"""One contract, every implementation: candidate sources and CF models (shapes, padding,
filters, batch equals single), in the style of implicit's shared recommender test mixin."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from apex_rank.errors import UnknownIdError
from apex_rank.ranking.candidates import (
    CandidateSource,
    Exclusions,
    FactorIndexConfig,
    FactorIndexSource,
    FactorSource,
    IndexSource,
    RankedListSource,
)
from apex_rank.ranking.cf import CFConfig, CFModel
from apex_rank.ranking.index import CandidateIndex
from apex_rank.ranking.state import SongTable, UserState

N_SONGS, DIM, F = 60, 8, 4
RNG = np.random.default_rng(3)
SONGS = [f"s{i:03d}" for i in range(N_SONGS)]
E = RNG.normal(size=(N_SONGS, DIM)).astype(np.float32)
V = RNG.normal(size=(N_SONGS, F)).astype(np.float32)


def _catalogue() -> SongTable:
    """A song table holding SONGS in another order, and two songs no source holds."""
    ids = [SONGS[i] for i in np.random.default_rng(7).permutation(N_SONGS)] + ["zz-a", "aa-b"]
    n = len(ids)
    z = np.zeros(n, np.float32)
    return SongTable(ids, np.zeros((n, DIM), np.float32), np.zeros((n, F), np.float32), np.ones(n, bool),
                     np.zeros((n, F), np.float32), np.zeros((n, 7), np.float32), z, np.zeros(n), z, 0.0,
                     np.zeros(7, np.float32), np.ones(7, np.float32))


class _ById(CandidateSource):
    """A source implementing only the by-id form of the contract."""

    def __init__(self, base: CandidateSource) -> None:
        self.base, self.name = base, base.name

    def retrieve_batch(self, states, n, excludes):  # type: ignore[no-untyped-def]
        return self.base.retrieve_batch(states, n, excludes)


def _states() -> list[UserState]:
    rng = np.random.default_rng(5)
    out = []
    for i in range(6):
        hist = tuple(SONGS[j] for j in rng.choice(N_SONGS, size=5 + i, replace=False))
        out.append(
            UserState(
                f"u{i}",
                rng.normal(size=F).astype(np.float32),
                (lambda v: v / np.linalg.norm(v))(rng.normal(size=DIM).astype(np.float32)),
                hist,
                len(hist),
            )
        )
    return out


class SourceContract:
    """Every CandidateSource must pass these."""

    n_available = N_SONGS

    def make(self) -> CandidateSource:
        raise NotImplementedError

    def test_shapes_padding_and_order(self) -> None:
        src, states = self.make(), _states()
        n = self.n_available + 10  # more than can exist
        ids, scores = src.retrieve_batch(states, n, [set(s.history) for s in states])
        assert ids.shape == (len(states), n) and scores.shape == (len(states), n)
        assert ids.dtype == object and scores.dtype == np.float32
        for r, s in enumerate(states):
            valid = ids[r] != ""
            k = int(valid.sum())
            assert valid[:k].all() and not valid[k:].any()  # padding only at the end
            assert np.isneginf(scores[r, k:]).all()
            assert np.all(np.diff(scores[r, :k]) <= 1e-6)  # best first
            assert k <= self.n_available - len(set(s.history) & set(self.pool()))
            assert len(set(ids[r, :k])) == k

    def pool(self) -> list[str]:
        return SONGS

    def test_history_and_exclude_filtered(self) -> None:
        src, states = self.make(), _states()
        extra = {SONGS[0], SONGS[1], SONGS[2]}
        ids, _ = src.retrieve_batch(states, 20, [set(s.history) | extra for s in states])
        for r, s in enumerate(states):
            got = set(ids[r][ids[r] != ""])
            assert not got & set(s.history) and not got & extra

    def test_batch_equals_single(self) -> None:
        src, states = self.make(), _states()
        ids, scores = src.retrieve_batch(states, 15, [set(s.history) for s in states])
        for r, s in enumerate(states):
            i1, s1 = src.retrieve(s, 15, set(s.history))
            assert i1.tolist() == ids[r].tolist()
            np.testing.assert_allclose(s1, scores[r], rtol=1e-5, atol=1e-6)

    def test_positions_equal_ids_through_a_catalogue(self) -> None:
        """retrieve_positions answers what retrieve_batch does, in catalogue positions; so does
        a source that implements only retrieve_batch."""
        cat, states = _catalogue(), _states()
        extra: list[set[str] | None] = [{SONGS[0], "zz-a", "not-a-song"}, None, set(), {SONGS[59]}, None, None]
        sets = [set(s.history) | (e or set()) for s, e in zip(states, extra)]
        ids, scores = self.make().retrieve_batch(states, 25, sets)
        ex = Exclusions.of_states(states, cat, extra)
        assert ex.sizes.tolist() == [len(e) for e in sets]
        for src in (self.make(), _ById(self.make())):
            pos, sc = src.retrieve_positions(states, 25, ex, cat)
            assert pos.dtype == np.int64 and pos.shape == ids.shape
            assert np.where(pos >= 0, cat.id_array[pos], "").tolist() == ids.tolist()
            np.testing.assert_array_equal(sc, scores)

    def test_zero_n_and_empty_batch(self) -> None:
        src, states = self.make(), _states()
        ids, scores = src.retrieve_batch(states, 0, [set() for _ in states])
        assert ids.shape == (len(states), 0)
        ids, scores = src.retrieve_batch([], 5, [])
        assert ids.shape == (0, 5)


class TestFactorSource(SourceContract):
    def make(self) -> CandidateSource:
        return FactorSource(SONGS, V)

    def test_user_without_factor_gets_padding(self) -> None:
        ids, _ = self.make().retrieve(UserState("x", None, None), 5)
        assert ids.tolist() == [""] * 5


class TestFactorIndexSource(SourceContract):
    """The approximate ``als`` source (60 songs: one IVF list, so the search is exhaustive)."""

    def make(self) -> CandidateSource:
        return FactorIndexSource(SONGS, V, FactorIndexConfig(min_songs=1))

    def test_same_top_n_as_the_exact_source_when_exhaustive(self) -> None:
        states = _states()
        excl = [set(s.history) for s in states]
        got, got_sc = self.make().retrieve_batch(states, 10, excl)
        want, want_sc = FactorSource(SONGS, V).retrieve_batch(states, 10, excl)
        assert got.tolist() == want.tolist()
        np.testing.assert_allclose(got_sc, want_sc, rtol=1e-5, atol=1e-6)


class TestContentSource(SourceContract):
    def make(self) -> CandidateSource:
        idx = CandidateIndex(DIM, "Flat")
        idx.add(SONGS, E)
        return IndexSource("content", idx, "profile")


class TestContentSourceHNSW(SourceContract):
    def make(self) -> CandidateSource:
        idx = CandidateIndex(DIM, "HNSW8", ef_search=256)
        idx.add(SONGS, E)
        return IndexSource("content", idx, "profile")


class TestPseudoCFSource(SourceContract):
    n_available = 30

    def pool(self) -> list[str]:
        return SONGS[30:]

    def make(self) -> CandidateSource:
        idx = CandidateIndex(F, "Flat", normalize=False)
        idx.add(SONGS[30:], V[30:])
        return IndexSource("pseudo_cf", idx, "cf_factor")


class TestFreshSource(SourceContract):
    n_available = 20

    def pool(self) -> list[str]:
        return SONGS[40:]

    def make(self) -> CandidateSource:
        return RankedListSource("fresh", SONGS[40:], np.linspace(1, 0, 20))


# ---------------------------------------------------------------------------- CF models
def _interactions() -> pl.DataFrame:
    rng = np.random.default_rng(11)
    users, songs = [], []
    for u in range(40):
        for s in rng.choice(N_SONGS, size=8, replace=False):
            users.append(f"u{u:02d}")
            songs.append(SONGS[s])
    return pl.DataFrame({"user_id": users, "song_id": songs, "weight": np.ones(len(users))})


class CFContract:
    config: CFConfig

    @pytest.fixture(scope="class")
    @classmethod
    def model(cls) -> CFModel:
        return CFModel(cls.config).fit(_interactions())

    def test_shapes_and_padding(self, model: CFModel) -> None:
        n_items = len(model.song_ids)
        ids, scores = model.recommend("u00", k=n_items + 5)
        assert ids.shape == (n_items + 5,) and scores.dtype == np.float32
        k = int((ids != "").sum())
        assert k == n_items - 8  # history filtered, rest padded
        assert np.isneginf(scores[k:]).all() and np.all(np.diff(scores[:k]) <= 1e-6)
        assert model.user_factors.shape[1] == model.item_factors.shape[1]
        assert model.user_factors.flags.c_contiguous and model.item_factors.dtype == np.float32

    def test_history_filter(self, model: CFModel) -> None:
        inter = _interactions().filter(pl.col("user_id") == "u03")
        ids, _ = model.recommend("u03", k=20)
        assert not set(ids) & set(inter["song_id"])
        ids2, _ = model.recommend("u03", k=20, filter_history=False)
        assert set(ids2) & set(inter["song_id"])

    def test_batch_equals_single(self, model: CFModel) -> None:
        users = ["u00", "u05", "u17"]
        hits, D = model.recommend_batch(users, k=10)
        for r, u in enumerate(users):
            i1, d1 = model.recommend(u, k=10)
            assert i1.tolist() == hits[r].tolist()
            np.testing.assert_allclose(d1, D[r], rtol=1e-5, atol=1e-6)

    def test_score_and_unknown(self, model: CFModel) -> None:
        sc = model.score("u01", [model.song_ids[0], "cold-song"])
        assert np.isfinite(sc[0]) and np.isnan(sc[1])
        with pytest.raises(UnknownIdError, match="user_id 'ghost' was not seen"):
            model.recommend("ghost")

    def test_factor_from_history(self, model: CFModel) -> None:
        hist = _interactions().filter(pl.col("user_id") == "u02")["song_id"].to_list()
        u = model.factor_from_history(hist + ["cold-song"])
        assert u is not None and u.shape == (model.item_factors.shape[1],) and u.dtype == np.float32
        assert model.factor_from_history(["cold-song"]) is None

    def test_save_load_roundtrip(self, model: CFModel, tmp_path: Path) -> None:
        back = CFModel.load(model.save(tmp_path / "cf.npz"))
        assert back.config == model.config and back.song_ids == model.song_ids
        for u in ("u00", "u39"):
            assert back.recommend(u, 10)[0].tolist() == model.recommend(u, 10)[0].tolist()

    def test_factors_saved_apart_are_memory_mapped(self, model: CFModel, tmp_path: Path) -> None:
        """Issue 15: the factors in their own .npy files, mapped copy-on-write by load(mmap=True);
        a loader of the .npz alone reads them too; a missing .npy is refused by name."""
        from apex_rank.errors import ArtifactError
        from apex_rank.npfiles import apart_file

        path = model.save(tmp_path / "cf.npz", factors_apart=True)
        assert apart_file(path, "item_factors").name == "cf.item_factors.npy"
        mapped, plain = CFModel.load(path, mmap=True), CFModel.load(path)
        for arr in (mapped.item_factors, mapped.user_factors):
            assert isinstance(arr.base, np.memmap)
        assert not isinstance(plain.item_factors.base, np.memmap)
        for back in (mapped, plain):
            np.testing.assert_array_equal(back.item_factors, model.item_factors)
            assert back.recommend("u00", 10)[0].tolist() == model.recommend("u00", 10)[0].tolist()
        mapped.item_factors[0] = 0.0  # copy-on-write: the file keeps its values
        np.testing.assert_array_equal(CFModel.load(path).item_factors, model.item_factors)
        apart_file(path, "item_factors").unlink()
        with pytest.raises(ArtifactError, match="cf.item_factors.npy cannot be read"):
            CFModel.load(path)


class TestALS(CFContract):
    config = CFConfig(model="als", factors=8, iterations=5)

    def test_history_solve_matches_fitted_factor(self, model: CFModel) -> None:
        hist = _interactions().filter(pl.col("user_id") == "u04")["song_id"].to_list()
        u = model.factor_from_history(hist)
        fitted = model.user_factor("u04")
        assert float(u @ fitted / np.linalg.norm(u) / np.linalg.norm(fitted)) > 0.99

    def test_item_step_matches_fitted_factor(self, model: CFModel) -> None:
        """solve_item_factor, the mirror of the user step, over a song's listeners with the
        fitted user factors gives (nearly) the song's fitted factor, as the user step does."""
        from apex_rank.ranking.cf import solve_item_factor

        col = model.user_items.tocsc()[:, 3]
        v = solve_item_factor(model.user_factors, col.indices, col.data, alpha=model.step_alpha,
                              regularization=model.config.regularization)
        fitted = model.item_factors[3]
        assert v.dtype == np.float32 and float(v @ fitted / np.linalg.norm(v) / np.linalg.norm(fitted)) > 0.99
        assert not solve_item_factor(model.user_factors, np.zeros(0, np.int64), np.zeros(0),
                                     alpha=1.0, regularization=0.1).any()


class TestBPR(CFContract):
    config = CFConfig(model="bpr", factors=8, iterations=20, learning_rate=0.05)
