"""Tasks with a gold reward in code, to check that RLHF raised the true objective and not only its proxy."""

from __future__ import annotations

from collections.abc import Callable

from rlhf.errors import ConfigError
from rlhf.tasks import digest, praise

GoldFn = Callable[[str, str], float]  # (prompt text, response text) -> true reward

GOLD: dict[str, GoldFn] = {"praise": praise.gold_score, "digest": digest.gold_score}


def gold_function(name: str | None, *, where: str) -> GoldFn | None:
    if name is None:
        return None
    if name not in GOLD:
        raise ConfigError(f"{where}: ppo.gold '{name}' is not a task with a gold reward (known: {', '.join(GOLD)})")
    return GOLD[name]
