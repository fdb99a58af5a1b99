"""The stages, in pipeline order, written once: the registry, the config, `rlhf compare`, `rlhf plan`, the
pre-flight, the rounds loop of the CLI and the plots read them from here.

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

ROUND_ONE = ("sft", "rm", "ppo")
"""Round 1 in run order, `make sft rm ppo`: the three stages of RLHF."""

BESIDE = {"dpo": ("sft", "rm")}
"""Round-1 stages off that chain, each with the stages whose entries it starts from: DPO sits beside PPO."""

LATER_ROUNDS = ("collect", "rm", "ppo")
"""Every round R >= 2 in run order, `make rounds`: new comparisons on round R-1's policy, a reward model, PPO."""

ROLES = ("base", "policy", "reference", "reward", "comparisons")
"""What a parent is to its child: the model a stage starts from (`base`), the policy sampled or trained
(`policy`), the KL anchor (`reference`), the reward model (`reward`), the collected pairs (`comparisons`)."""


def round_stages(round: int) -> tuple[str, ...]:
    """Every stage of `round` in the order `rlhf plan` lists them (DPO, round 1 only, after PPO)."""
    return ROUND_ONE + tuple(BESIDE) if round == 1 else LATER_ROUNDS


def waits_for(stage: str, *, round: int) -> tuple[str, ...]:
    """The stages of `round` whose new entries `stage` would start from: those before it, or its `BESIDE` list."""
    stages = round_stages(round)
    return BESIDE.get(stage, stages[:stages.index(stage)])


def make_target(stage: str, round: int = 1) -> str:
    """The command that produces a stage's entry, for error messages."""
    return f"make {stage}" + (f" ROUND={round}" if round > 1 else "")
