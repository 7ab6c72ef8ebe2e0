"""The seven APEX prediction tasks, in the canonical column order of the paper's release.

Popularity scores live on 0-100, SongEval aesthetic scores on 1-5. A head's output for a task is
``sigmoid(z) * scale + shift`` so predictions always stay inside the task's range.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    """One APEX task.

    Attributes
    ----------
    name:
        Column name in tables and key fragment in the official state_dict (``branch_{name}``).
    low, high:
        Closed range of valid labels and predictions.
    kind:
        ``"popularity"`` or ``"aesthetic"``.
    """

    name: str
    low: float
    high: float
    kind: str

    @property
    def scale(self) -> float:
        return self.high - self.low

    @property
    def shift(self) -> float:
        return self.low


APEX_TASK_SPECS: tuple[TaskSpec, ...] = (
    TaskSpec("score_streams", 0.0, 100.0, "popularity"),
    TaskSpec("score_likes", 0.0, 100.0, "popularity"),
    TaskSpec("coherence", 1.0, 5.0, "aesthetic"),
    TaskSpec("musicality", 1.0, 5.0, "aesthetic"),
    TaskSpec("memorability", 1.0, 5.0, "aesthetic"),
    TaskSpec("clarity", 1.0, 5.0, "aesthetic"),
    TaskSpec("naturalness", 1.0, 5.0, "aesthetic"),
)
#: Task names in canonical order: the column order of every (n, 7) prediction array.
APEX_TASKS: tuple[str, ...] = tuple(t.name for t in APEX_TASK_SPECS)
POPULARITY_TASKS: tuple[str, ...] = tuple(t.name for t in APEX_TASK_SPECS if t.kind == "popularity")
AESTHETIC_TASKS: tuple[str, ...] = tuple(t.name for t in APEX_TASK_SPECS if t.kind == "aesthetic")
#: Task sets of the official checkpoints ("task" field of ``best_model.pt``).
TASK_SETS: dict[str, tuple[str, ...]] = {"full": APEX_TASKS, "popularity": POPULARITY_TASKS}

_BY_NAME = {t.name: t for t in APEX_TASK_SPECS}


def task_spec(name: str) -> TaskSpec:
    """Return the spec of task ``name``; the error lists the valid names."""
    from apex_rank.errors import ConfigError

    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown APEX task {name!r}; valid tasks: {', '.join(APEX_TASKS)}") from None


def resolve_tasks(tasks: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Turn a task-set name (``"full"``, ``"popularity"``) or a list of names into task names.

    Order is always canonical, whatever order the caller gave.
    """
    from apex_rank.errors import ConfigError

    if isinstance(tasks, str):
        if tasks not in TASK_SETS:
            raise ConfigError(f"unknown task set {tasks!r}; valid: {', '.join(TASK_SETS)}")
        return TASK_SETS[tasks]
    names = list(tasks)
    if not names:
        raise ConfigError("at least one APEX task is required")
    for n in names:
        task_spec(n)
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate task names in {names}")
    return tuple(t for t in APEX_TASKS if t in names)
