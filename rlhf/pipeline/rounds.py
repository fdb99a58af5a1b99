"""Rounds of RLHF in the registry: round 1 is the first reward model and PPO; round R >= 2 collects
comparisons on round R-1's policy, trains a reward model on them, and runs PPO again.

    make collect            # round R = the newest PPO's round + 1: sample, label, register the pairs
    make rm ROUND=2         # reward model of round 2 on the collected pairs (+ earlier rounds' data)
    make ppo ROUND=2        # PPO from round 1's policy against round 2's reward model
    make rounds N=3         # collect -> rm -> ppo, three times

An entry's round is `info.round` (absent means round 1, as every entry made before rounds existed).
"""

from __future__ import annotations

from rlhf.errors import StageError
from rlhf.pipeline.registry import Entry, Registry

# The files a collect entry holds: training pairs and held-out fresh pairs.
TRAIN_FILE = "comparisons.jsonl"
EVAL_FILE = "eval_comparisons.jsonl"


def round_of(entry: Entry) -> int:
    return int(entry.info.get("round", 1))


def latest(registry: Registry, *, stage: str, pipeline: str, round: int) -> Entry | None:
    """The newest complete entry of that stage and round."""
    found = [e for e in registry.entries(stage=stage, pipeline=pipeline, status="complete") if round_of(e) == round]
    return found[-1] if found else None


def require(registry: Registry, *, stage: str, pipeline: str, round: int) -> Entry:
    """Like `latest`, but a missing entry is an error naming the make target that makes it."""
    entry = latest(registry, stage=stage, pipeline=pipeline, round=round)
    if entry is None:
        target = f"make {stage}" + (f" ROUND={round}" if round > 1 else "")
        raise StageError(f"no complete {stage} entry of round {round} for pipeline '{pipeline}'; run `{target}` first")
    return entry


def next_round(registry: Registry, pipeline: str) -> int:
    """The round after the newest complete PPO's (2 when there is only round 1, or no PPO yet)."""
    done = [round_of(e) for e in registry.entries(stage="ppo", pipeline=pipeline, status="complete")]
    return max(done, default=1) + 1

