"""The resolved settings that identify a run of a stage: what the registry hashes to tell whether a stage is up to
date, and what a later stage compares to find the parent the pipeline's current settings describe."""

from __future__ import annotations

from rlhf.pipeline.config import Pipeline
from rlhf.pipeline.registry import hash_config
from rlhf.pipeline.schema import as_plain

# Fields that change how a run is observed, not what it learns: left out of the config hash.
OPERATIONAL_FIELDS = ("logging_steps", "save_steps", "eval_steps", "eval_batch_size", "parent", "sft_parent",
                      "rm_parent", "sample_steps",
                      "compile", "generation_cache",  # speed switches: the same maths, fused or with a fixed cache
                      "alarms", "min_rm_accuracy", "warn_accuracy", "warn_gain")  # warnings and refusals only


def stage_config(pipeline: Pipeline, *, stage: str, round: int = 1) -> dict:
    """The resolved config that identifies a run of `stage` (hashed for the up-to-date check); from round 2
    on, with the round and the rounds section."""
    section = as_plain(getattr(pipeline, stage))
    for name in OPERATIONAL_FIELDS:
        section.pop(name, None)
    config = {"model": pipeline.model, "seed": pipeline.seed, stage: section}
    if round > 1:
        rounds = {k: v for k, v in as_plain(pipeline.rounds).items() if k != "labels"}
        config.update(round=round, rounds=rounds)
    return config


def settings_hash(pipeline: Pipeline, *, stage: str, round: int = 1) -> str | None:
    """The config hash a run of `stage` with the pipeline's current settings records; None when the pipeline has
    no section for it."""
    if getattr(pipeline, stage, None) is None:
        return None
    return hash_config(stage_config(pipeline, stage=stage, round=round))
