"""A small synthetic music world with planted structure, for the demo, tests and benchmarks.

No public data set pairs music audio with interaction logs and popularity, so the demo and
several tests run on this generator instead; everything it makes is labelled synthetic.

The plant: every song has a hidden taste vector z (``n_factors``) and a hidden quality q. Its
content embedding is a fixed random non-linear map of (z, q) plus noise, so audio-like content
carries both taste and quality. Users have taste vectors u; a user picks songs with
probability ∝ exp(u·z / τ + β·q). Streams and likes come from a large hidden audience and
grow with q and age; the five aesthetic labels are noisy functions of q and z, and only a share
of songs is labelled (as in real catalogues). The newest ``cold_share`` of songs are released
after the training cut: their interactions all lie after it, so they are cold for any model
fitted on interactions before the cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import polars as pl

from apex_rank.schemas import embeddings_frame
from apex_rank.tasks import AESTHETIC_TASKS

EPOCH = datetime(2026, 1, 1)


@dataclass(frozen=True)
class WorldConfig:
    """Size and shape of a synthetic world (all fields documented in the module doc)."""

    n_songs: int = 2000
    n_users: int = 400
    dim: int = 64
    n_factors: int = 8
    interactions_per_user: int = 40
    cold_share: float = 0.2
    label_share: float = 0.6
    quality_weight: float = 1.0
    temperature: float = 0.5
    embedding_noise: float = 0.1
    days: int = 100
    seed: int = 0


@dataclass
class World:
    """The generated tables plus the hidden truth (for tests only)."""

    songs: pl.DataFrame
    embeddings: pl.DataFrame
    interactions: pl.DataFrame
    cutoff: datetime
    taste: np.ndarray
    quality: np.ndarray
    user_taste: np.ndarray


def make_world(config: WorldConfig | None = None) -> World:
    """Generate a world; the same config gives the same tables."""
    cfg = config or WorldConfig()
    rng = np.random.default_rng(cfg.seed)
    S, U, F = cfg.n_songs, cfg.n_users, cfg.n_factors
    z = rng.normal(size=(S, F)) / np.sqrt(F)
    q = rng.normal(size=S)
    # Content: a fixed random two-layer map of (z, q) -> dim, plus noise.
    latent = np.concatenate([z * np.sqrt(F), q[:, None]], axis=1)
    W1 = rng.normal(size=(F + 1, 4 * cfg.dim)) / np.sqrt(F + 1)
    W2 = rng.normal(size=(4 * cfg.dim, cfg.dim)) / np.sqrt(4 * cfg.dim)
    emb = np.tanh(latent @ W1) @ W2 + cfg.embedding_noise * rng.normal(size=(S, cfg.dim))

    # Release days: the newest cold_share of songs come after the cut.
    n_cold = int(round(cfg.cold_share * S))
    cut_day = cfg.days * 0.7
    release = np.empty(S)
    order = rng.permutation(S)
    release[order[: S - n_cold]] = rng.uniform(0, cut_day - 5, size=S - n_cold)
    release[order[S - n_cold :]] = rng.uniform(cut_day, cfg.days - 5, size=n_cold)
    cutoff = EPOCH + timedelta(days=cut_day)

    # Hidden audience: popularity counts driven by quality and age.
    age = cfg.days - release
    rate = np.exp(1.2 * q + 0.3 * rng.normal(size=S)) * (1 + age)
    streams = rng.poisson(20 * rate)
    likes = rng.binomial(streams, 1 / (1 + np.exp(-(q - 1.5))))

    aest = np.empty((S, len(AESTHETIC_TASKS)))
    for j in range(len(AESTHETIC_TASKS)):
        w = rng.normal(size=F)
        raw = 0.8 * q + 0.4 * (z @ w) * np.sqrt(F) / np.sqrt(F) + 0.3 * rng.normal(size=S)
        aest[:, j] = np.clip(3 + raw, 1, 5)
    labelled = rng.random(S) < cfg.label_share
    platforms = np.where(rng.random(S) < 0.5, "suno", "udio")

    song_ids = [f"s{i:06d}" for i in range(S)]
    songs = pl.DataFrame(
        {
            "song_id": song_ids,
            "platform": platforms.tolist(),
            "created_at": [EPOCH + timedelta(days=float(d)) for d in release],
            "streams": streams.astype(np.int64),
            "likes": likes.astype(np.int64),
            **{
                t: pl.Series(np.where(labelled, aest[:, j], np.nan), dtype=pl.Float64).fill_nan(None)
                for j, t in enumerate(AESTHETIC_TASKS)
            },
        }
    )

    # Interactions: each user draws events over time among released songs.
    u = rng.normal(size=(U, F)) / np.sqrt(F)
    logits = (u @ z.T) * np.sqrt(F) / cfg.temperature + cfg.quality_weight * q[None, :]
    n_events = np.maximum(3, rng.poisson(cfg.interactions_per_user, size=U))
    users, items, times = [], [], []
    for ui in range(U):
        t = np.sort(rng.uniform(0, cfg.days, size=n_events[ui]))
        for day in t:
            avail = release <= day
            if not avail.any():
                continue
            lg = np.where(avail, logits[ui], -np.inf)
            p = np.exp(lg - lg.max())
            p /= p.sum()
            s = int(rng.choice(S, p=p))
            users.append(ui)
            items.append(s)
            times.append(day)
    inter = pl.DataFrame(
        {
            "user_id": [f"u{i:05d}" for i in users],
            "song_id": [song_ids[i] for i in items],
            "ts": [EPOCH + timedelta(days=float(d)) for d in times],
            "weight": np.ones(len(users)),
        }
    ).unique(subset=["user_id", "song_id"], keep="first", maintain_order=True)
    return World(
        songs=songs,
        embeddings=embeddings_frame(song_ids, emb.astype(np.float32), encoder="synthetic"),
        interactions=inter,
        cutoff=cutoff,
        taste=z,
        quality=q,
        user_taste=u,
    )
