"""Which registry entry a stage takes as each of its parents, and the rounds of RLHF.

Every parent lookup of every stage goes through `require` (or `newest` when a parent is optional), so that
"the newest complete entry of that stage, pipeline and round, unless the pipeline file names one" is written
once, with the error a user sees when it is missing.

Round 1 is the first reward model and PPO; round R >= 2 collects comparisons on round R-1's policy, trains a
reward model on them and runs PPO again:

    make collect            # round R = the newest PPO's round + 1: sample, label, register the pairs
    make rm ROUND=2         # reward model of round 2 on the collected pairs (+ earlier rounds' data)
    make ppo ROUND=2        # PPO from round 1's policy against round 2's reward model
    make rounds N=3         # collect -> rm -> ppo, three times
"""

from __future__ import annotations

from rlhf.errors import StageError
from rlhf.pipeline.order import make_target
from rlhf.pipeline.registry import Entry, Registry

# The files a collect entry holds: training pairs and held-out fresh pairs.
TRAIN_FILE = "comparisons.jsonl"
EVAL_FILE = "eval_comparisons.jsonl"


def newest(registry: Registry, *, stage: str, pipeline: str, round: int = 1) -> Entry | None:
    """The newest complete entry of that stage, pipeline and round."""
    found = [e for e in registry.entries(stage=stage, pipeline=pipeline, status="complete") if e.round == round]
    return found[-1] if found else None


def require(registry: Registry, *, stage: str, pipeline: str, round: int = 1, explicit: str | None = None) -> Entry:
    """The entry named `explicit` (an id from the pipeline file), else the newest complete one of that stage,
    pipeline and round; missing or unfinished, an error that names the command that makes it."""
    target = make_target(stage, round)
    if explicit:
        entry = registry.get(explicit)
        if entry.status != "complete":
            raise StageError(f"parent {explicit} is {entry.status}, not complete; run `{target}` to finish it")
        return entry
    entry = newest(registry, stage=stage, pipeline=pipeline, round=round)
    if entry is None:
        running = [e for e in registry.entries(stage=stage, pipeline=pipeline, status="running") if e.round == round]
        hint = f" ({running[-1].id} is still running)" if running else ""
        what = f"{stage} checkpoint" if round == 1 else f"{stage} entry of round {round}"
        raise StageError(f"no complete {what} for pipeline '{pipeline}'{hint}; run `{target}` first")
    return entry


def next_round(registry: Registry, pipeline: str) -> int:
    """The round after the newest complete PPO's (2 when there is only round 1, or no PPO yet)."""
    done = [e.round for e in registry.entries(stage="ppo", pipeline=pipeline, status="complete")]
    return max(done, default=1) + 1
