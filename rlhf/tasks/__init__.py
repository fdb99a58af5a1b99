"""Tasks with a gold reward in code, to check that RLHF raised the true objective and not only its proxy.

Each task is a module `rlhf.tasks.<name>` with `gold_score`, `best_score` and `generate`, and a command line that
writes its data (`python -m rlhf.tasks.<name> OUT_DIR`); docs/tasks.md describes them. `TASKS` lists them by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from rlhf.errors import ConfigError
from rlhf.tasks import chores, digest, lists, palette, praise

GoldFn = Callable[[str, str], float]  # (prompt text, response text) -> true reward
BestFn = Callable[[str], float]  # prompt text -> the highest gold reward any response to it can earn


class Generate(Protocol):
    """Writes sft.jsonl, comparisons.jsonl, prompts.jsonl and eval_prompts.jsonl into `out_dir`."""

    def __call__(self, out_dir: Path, *, seed: int = ..., n_demos: int = ..., n_comparisons: int = ...,
                 n_prompts: int = ..., n_eval_prompts: int = ...) -> None: ...


@dataclass(frozen=True)
class Task:
    """A gold task: how to make its data and how to score a policy on it."""

    name: str  # also its module, rlhf.tasks.<name>
    gold: GoldFn
    best: BestFn  # for "gold gap closed": (policy gold - SFT gold) / (best - SFT gold)
    generate: Generate

    @property
    def command(self) -> str:
        """The command line that writes the task's data."""
        return f"python -m rlhf.tasks.{self.name} OUT_DIR"


TASKS: dict[str, Task] = {task.name: task for task in (
    Task(name="praise", gold=praise.gold_score, best=praise.best_score, generate=praise.generate),
    Task(name="digest", gold=digest.gold_score, best=digest.best_score, generate=digest.generate),
    Task(name="palette", gold=palette.gold_score, best=palette.best_score, generate=palette.generate),
    Task(name="lists", gold=lists.gold_score, best=lists.best_score, generate=lists.generate),
    Task(name="chores", gold=chores.gold_score, best=chores.best_score, generate=chores.generate),
)}
GOLD: dict[str, GoldFn] = {name: task.gold for name, task in TASKS.items()}
BEST: dict[str, BestFn] = {name: task.best for name, task in TASKS.items()}


def task(name: str, *, where: str) -> Task:
    """The task called `name`; `where` says which file or option named it, for the error."""
    if name not in TASKS:
        raise ConfigError(f"{where}: '{name}' is not a gold task (known: {', '.join(TASKS)})")
    return TASKS[name]


def gold_function(name: str | None, *, where: str) -> GoldFn | None:
    if name is None:
        return None
    if name not in GOLD:
        raise ConfigError(f"{where}: ppo.gold '{name}' is not a task with a gold reward (known: {', '.join(GOLD)})")
    return GOLD[name]
