"""Pipeline-run tags: the stages executed together share a tag, kept in each registry entry's `run` field.

    make sft rm ppo                  # one tag for the three stages: the UTC time make started
    make sft rm ppo RUN=lr-sweep-1   # a tag of your own
    rlhf ppo --run lr-sweep-1        # the CLI; without --run (or $RLHF_RUN) a stage takes its parent's tag

The wandb group of a stage is `<pipeline>-<tag>`; `rlhf compare` and `rlhf plot` group entries by it.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timezone

from rlhf.errors import ConfigError
from rlhf.pipeline.registry import Entry

ENV = "RLHF_RUN"  # set by `rlhf --run`, so that processes started by accelerate inherit it
UNTAGGED = "untagged"  # entries made before run tags existed
_SAFE_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_tag(tag: str, *, where: str) -> str:
    """The tag, if it is safe as a folder name and a wandb group; else a ConfigError naming `where`."""
    if not isinstance(tag, str) or not _SAFE_TAG.match(tag) or ".." in tag:
        raise ConfigError(f"{where}: run tag {tag!r} is not allowed: use letters, digits, '.', '_' and '-', "
                          "start with a letter or digit, at most 64 characters, no '..'")
    return tag


def new_tag(now: datetime | None = None) -> str:
    """A tag from the UTC time, e.g. 20261123-091502."""
    return (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")


def resolve(parents: list[Entry]) -> str:
    """The tag of a new entry: $RLHF_RUN if set, else the first tagged parent's, else a new one."""
    explicit = os.environ.get(ENV, "").strip()
    if explicit:
        return check_tag(explicit, where=f"${ENV}")
    for parent in parents:
        if parent.stage != "base" and parent.run:
            return parent.run
    return new_tag()


def tag_of(entry: Entry) -> str:
    return entry.run or UNTAGGED


def group(pipeline: str, tag: str) -> str:
    """The wandb group of a pipeline run."""
    return f"{pipeline}-{tag}"
