"""The world stage of ``apex-rank demo``: the synthetic songs, embeddings and plays every later
stage runs on (the generator itself is library code, :mod:`apex_rank.synthetic`)."""

from __future__ import annotations

from collections.abc import Generator

from apex_rank.synthetic import World, WorldConfig, make_world


def world_stage(seed: int = 0) -> Generator[str, None, World]:
    """Yield a line describing the default world for ``seed``; return the world."""
    world = make_world(WorldConfig(seed=seed))
    width = world.embeddings["embedding"].list.len()[0]
    yield (f"   {world.songs.height} songs, {world.interactions.height} interactions, "
           f"{world.interactions['user_id'].n_unique()} users, embedding width {width}")
    return world
