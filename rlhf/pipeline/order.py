"""The stages, in pipeline order, written once: the registry, the config, `rlhf compare`, `rlhf plan` and the
CLI read them from here.

    base -> sft -> rm -> ppo                      round 1
            sft + rm -> dpo                       round 1, beside PPO: DPO on the comparisons from the SFT
                                                  policy (the reward model only scores its final evaluation)
            collect -> rm -> ppo                  every later round, on the previous round's policy
"""

from __future__ import annotations

STAGES = ("base", "sft", "collect", "rm", "ppo", "dpo")
"""Every kind of registry entry, in pipeline order (`base` is the starting model, registered, not trained)."""

TRAINED = STAGES[1:]
"""The stages that produce something: the columns of `rlhf compare`."""

SECTIONS = ("sft", "rm", "ppo", "dpo")
"""The stages a pipeline file configures in a section of their own (`collect` reads the `rounds` section)."""

ROLES = ("base", "policy", "reference", "reward", "comparisons")
"""What a parent is to its child: the model a stage starts from (`base`), the policy sampled or trained
(`policy`), the KL anchor (`reference`), the reward model (`reward`), the collected pairs (`comparisons`)."""


def make_target(stage: str, round: int = 1) -> str:
    """The command that produces a stage's entry, for error messages."""
    return f"make {stage}" + (f" ROUND={round}" if round > 1 else "")
