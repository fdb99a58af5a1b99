"""The batch arithmetic of a PPO run, computed and checked once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.errors import ConfigError
from rlhf.pipeline.config import PPOStage


@dataclass(frozen=True)
class BatchPlan:
    processes: int
    rollout_batch_size: int  # responses per step, per process
    samples_per_prompt: int  # responses per prompt: a group, for grpo and rloo
    mini_batch_size: int  # episodes per optimiser step, per process
    micro_batch_size: int  # episodes per forward/backward pass
    accumulation_steps: int  # micro batches per optimiser step
    minibatches_per_epoch: int  # optimiser steps per PPO epoch
    ppo_epochs: int
    steps: int  # PPO steps (rollouts) in the run
    episodes_per_step: int  # over all processes
    prefix_group: int = 1  # rows that share one prompt pass (ppo.shared_prefix): samples_per_prompt, or 1 (off)

    @property
    def prompts_per_step(self) -> int:
        """Prompts sampled per step, per process."""
        return self.rollout_batch_size // self.samples_per_prompt

    @property
    def episodes(self) -> int:
        return self.steps * self.episodes_per_step

    @property
    def optimiser_steps(self) -> int:
        return self.steps * self.ppo_epochs * self.minibatches_per_epoch

    def describe(self) -> str:
        prompts = (f"{self.rollout_batch_size} prompts" if self.samples_per_prompt == 1 else
                   f"{self.prompts_per_step} prompts x {self.samples_per_prompt} responses")
        return (f"{self.steps} steps x {self.episodes_per_step} episodes ({self.processes} process(es) x "
                f"{prompts}); each step: {self.ppo_epochs} epochs x "
                f"{self.minibatches_per_epoch} minibatches of {self.mini_batch_size} "
                f"({self.accumulation_steps} x {self.micro_batch_size} per pass)"
                + (f"; each prompt's pass shared by its {self.prefix_group} responses" if self.prefix_group > 1
                   else ""))


def plan_batches(cfg: PPOStage, *, processes: int, where: str) -> BatchPlan:
    """Check that the sizes divide and derive the rest; errors name the fields."""
    if cfg.algorithm in ("grpo", "rloo") and cfg.samples_per_prompt < 2:
        raise ConfigError(f"{where}: ppo.algorithm {cfg.algorithm} compares the responses to one prompt with each "
                          f"other: ppo.samples_per_prompt must be at least 2, got {cfg.samples_per_prompt}")
    if cfg.rollout_batch_size % cfg.samples_per_prompt:
        raise ConfigError(f"{where}: ppo.rollout_batch_size ({cfg.rollout_batch_size}) must be a multiple of "
                          f"ppo.samples_per_prompt ({cfg.samples_per_prompt}): each step samples whole groups")
    if cfg.rollout_batch_size % cfg.mini_batch_size:
        raise ConfigError(f"{where}: ppo.rollout_batch_size ({cfg.rollout_batch_size}) must be a multiple of "
                          f"ppo.mini_batch_size ({cfg.mini_batch_size})")
    if cfg.mini_batch_size % cfg.micro_batch_size:
        raise ConfigError(f"{where}: ppo.mini_batch_size ({cfg.mini_batch_size}) must be a multiple of "
                          f"ppo.micro_batch_size ({cfg.micro_batch_size})")
    group = prefix_group(cfg, where=where)
    per_step = cfg.rollout_batch_size * processes
    if cfg.episodes % per_step:
        raise ConfigError(f"{where}: ppo.episodes ({cfg.episodes}) must be a multiple of ppo.rollout_batch_size "
                          f"({cfg.rollout_batch_size}) x {processes} process(es) = {per_step}")
    return BatchPlan(processes=processes, rollout_batch_size=cfg.rollout_batch_size,
                     samples_per_prompt=cfg.samples_per_prompt,
                     mini_batch_size=cfg.mini_batch_size, micro_batch_size=cfg.micro_batch_size,
                     accumulation_steps=cfg.mini_batch_size // cfg.micro_batch_size,
                     minibatches_per_epoch=cfg.rollout_batch_size // cfg.mini_batch_size,
                     ppo_epochs=cfg.ppo_epochs, steps=cfg.episodes // per_step, episodes_per_step=per_step,
                     prefix_group=group)


def prefix_group(cfg: PPOStage, *, where: str) -> int:
    """How many rows share one prompt pass: samples_per_prompt where `ppo.shared_prefix` is on (true, or unset with
    nothing in the way), else 1. true with something in the way is an error naming it. (Unset, the trainer still
    turns it off where the loaded models make it not pay: `trainer._prefix_plan`.)"""
    if cfg.samples_per_prompt == 1 or cfg.shared_prefix is False:
        return 1
    blockers = [f"ppo.{name} ({getattr(cfg, name)}) is not a multiple of ppo.samples_per_prompt "
                f"({cfg.samples_per_prompt})" for name in ("mini_batch_size", "micro_batch_size")
                if getattr(cfg, name) % cfg.samples_per_prompt]
    # The cached way (rlhf/training/ppo/models.py) hands the prompt's keys and values to the responses' pass as a
    # cache, which checkpointed blocks drop and compiled blocks are not built for; the packed way is not measured
    # under either.
    blockers += [f"ppo.{name} is on" for name in ("gradient_checkpointing", "compile") if getattr(cfg, name)]
    if cfg.shared_prefix is None:
        return 1 if blockers else cfg.samples_per_prompt
    if blockers:
        raise ConfigError(f"{where}: ppo.shared_prefix runs each group's prompt once for its responses, but "
                          + "; ".join(blockers))
    return cfg.samples_per_prompt
