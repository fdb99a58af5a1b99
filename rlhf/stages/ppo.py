"""PPO stage: optimise the SFT policy against the reward model, both found in the registry.

    make ppo [PIPELINE=pipelines/tiny.yaml] [SET="ppo.kl_coef=0.1 ppo.episodes=4096"] [FORCE=1] [RESTART=1]
    accelerate launch --config_file accelerate/ddp.yaml -m rlhf.cli ppo --pipeline pipelines/x.yaml

This file finds the inputs (prompts and the policy, reference and reward model, by role) and hands them to our
trainer, `rlhf/training/ppo/trainer.py`, whose loop reads 1. rollout 2. score 3. advantages 4. optimise 5. log
and save. Our own implementation: TRL removed its PPOTrainer in 1.13.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from rlhf.errors import ConfigError
from rlhf.pipeline import lineage, rm_verdict
from rlhf.pipeline.config import Pipeline
from rlhf.pipeline.data import prompt_rows
from rlhf.pipeline.registry import Entry, Registry, hash_config
from rlhf.pipeline.stage_config import stage_config
from rlhf.stages.common import load_split, tracked
from rlhf.stages.runner import Attempt, StageInputs, run_stage
from rlhf.tasks import gold_function
from rlhf.training import dist
from rlhf.training.ppo import trainer
from rlhf.training.ppo.plan import plan_batches
from rlhf.training.ppo.sharding import check_launch


@dataclass(frozen=True)
class Resolved:
    """What a PPO run starts from."""

    inputs: StageInputs
    job: trainer.Job  # the prompts, the batch plan and the policy, reference and reward entries


def resolve(pipeline: Pipeline, registry: Registry, *, where: str, round: int = 1, dry: bool = False,
            processes: int | None = None) -> Resolved:
    """The prompts, the batch plan and the parents (`lineage.ppo_parents`: the SFT policy and round 1's reward
    model; from round 2, as the rounds settings say); the reward model must pass ppo.min_rm_accuracy. `dry`
    (`rlhf plan`) changes nothing: nothing here builds or registers a model."""
    cfg = pipeline.ppo
    if cfg is None:
        raise ConfigError(f"{where}: has no 'ppo' section")
    plan = plan_batches(cfg, processes=processes or dist.world_size(), where=where)
    gold = gold_function(cfg.gold, where=where)
    data = load_split(cfg.dataset, cfg.eval_prompts, eval_fraction=cfg.eval_fraction, seed=pipeline.seed,
                      rows_of=prompt_rows)
    parents = lineage.ppo_parents(registry, pipeline, round=round, quiet=dry)
    rm_verdict.require_accuracy(parents.reward, minimum=cfg.min_rm_accuracy, setting="ppo.min_rm_accuracy",
                                where=where)
    config = stage_config(pipeline, stage="ppo", round=round)
    inputs = StageInputs(stage="ppo", pipeline=pipeline.name, round=round, config=config, roles=parents.roles(),
                         config_hash=hash_config(config), data_fingerprint=data.fingerprint,
                         info={"mode": cfg.mode, "plan": plan.describe()})
    job = trainer.Job(pipeline=pipeline, plan=plan, train_rows=data.train, eval_rows=data.eval[:cfg.max_eval_prompts],
                      policy=parents.policy, reference=parents.reference, reward=parents.reward, gold=gold)
    return Resolved(inputs=inputs, job=job)


def run(pipeline: Pipeline, *, registry: Registry, where: str, force: bool = False, restart: bool = False,
        round: int = 1) -> Entry:
    check_launch(os.environ)
    found = resolve(pipeline, registry, where=where, round=round)
    job = found.job
    print(f"ppo: round {round}: policy from {job.policy.stage} {job.policy.id}, KL reference {job.reference.stage} "
          f"{job.reference.id}, reward model {job.reward.id}")
    verdict = rm_verdict.of_entry(job.reward)
    warn = "warning: " if verdict is not None and verdict.status == "weak" else ""
    print(f"ppo: {warn}reward model {job.reward.id}: "
          + (verdict.line() if verdict else "no held-out accuracy recorded"))
    print(f"ppo: {job.plan.describe()}")
    return run_stage(registry, found.inputs, force=force, restart=restart,
                     train=lambda attempt: train(pipeline, found, attempt=attempt, registry=registry))


def train(pipeline: Pipeline, found: Resolved, *, attempt: Attempt, registry: Registry) -> dict:
    """Our PPO loop (rlhf/training/ppo/trainer.py) on the resolved job; its final metrics."""
    with tracked(pipeline, attempt, registry, stage="ppo"):
        return trainer.train(found.job, folder=attempt.folder, checkpoints=attempt.checkpoints,
                             resumed=attempt.resumed)
