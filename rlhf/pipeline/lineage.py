"""Which registry entry a stage takes as each of its parents, and the rounds of RLHF.

Every parent lookup of every stage goes through `require` (or `newest` when a parent is optional), so that
"the newest complete entry of that stage, pipeline and round, unless the pipeline file names one" is written
once, with the error a user sees when it is missing. An SFT policy or reward model taken as a parent is, among
those, the newest trained with the pipeline's current settings for its stage (`current`): the entry `make sft`
reports up to date is the one `make rm` then starts from, even when another SFT entry, trained with other
settings (`SET=...`), is newer; when none has those settings, the newest, with a notice (none in a plan,
`quiet`). Which parent a stage takes in which round (the rounds
settings policy_init, kl_anchor, rm_init, mix_previous) is decided here too, by role: `collect_policy`,
`ppo_parents`, `rm_round_parents`; the stages only ask.

Round 1 is the first reward model and PPO; round R >= 2 collects comparisons on round R-1's policy, trains a
reward model on them and runs PPO again:

    make collect            # round R = the newest PPO's round + 1: sample, label, register the pairs
    make rm ROUND=2         # reward model of round 2 on the collected pairs (+ earlier rounds' data)
    make ppo ROUND=2        # PPO from round 1's policy against round 2's reward model
    make rounds N=3         # collect -> rm -> ppo, three times
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.errors import StageError
from rlhf.pipeline.config import Pipeline
from rlhf.pipeline.order import make_target
from rlhf.pipeline.registry import Entry, Registry
from rlhf.pipeline.stage_config import settings_hash

# The files a collect entry holds: training pairs and held-out fresh pairs.
TRAIN_FILE = "comparisons.jsonl"
EVAL_FILE = "eval_comparisons.jsonl"


def newest(registry: Registry, *, stage: str, pipeline: str, round: int = 1,
           config_hash: str | None = None) -> Entry | None:
    """The newest complete entry of that stage, pipeline and round (and config hash, when given)."""
    found = [e for e in registry.entries(stage=stage, pipeline=pipeline, status="complete") if e.round == round
             and config_hash in (None, e.config_hash)]
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


def current(registry: Registry, pipeline: Pipeline, *, stage: str, round: int = 1,
            explicit: str | None = None, quiet: bool = False) -> Entry:
    """As `require`, but of the complete entries, the newest trained with the pipeline's current settings for
    `stage` (its section, the model and the seed: what `make <stage>` compares to call an entry up to date); when
    none was, the newest, and a notice that says so."""
    wanted = None if explicit else settings_hash(pipeline, stage=stage, round=round)
    if wanted is not None:
        match = newest(registry, stage=stage, pipeline=pipeline.name, round=round, config_hash=wanted)
        if match is not None:
            return match
    entry = require(registry, stage=stage, pipeline=pipeline.name, round=round, explicit=explicit)
    if wanted is not None and not quiet:
        print(f"note: no complete {stage} entry of pipeline '{pipeline.name}' has its current '{stage}' settings; "
              f"taking the newest, {entry.id}, trained with others (`{make_target(stage, round)}` trains one "
              f"with these)", flush=True)
    return entry


def next_round(registry: Registry, pipeline: str) -> int:
    """The round after the newest complete PPO's (2 when there is only round 1, or no PPO yet)."""
    done = [e.round for e in registry.entries(stage="ppo", pipeline=pipeline, status="complete")]
    return max(done, default=1) + 1


# ---- each stage's parents, by role ----------------------------------------------------------------------------

def collect_policy(registry: Registry, pipeline: Pipeline, *, round: int) -> Entry:
    """roles["policy"] of collect: the policy round R samples from, round R-1's PPO policy; for round 2 without a
    PPO entry, the SFT policy (`ppo.sft_parent`, else the newest)."""
    previous = newest(registry, stage="ppo", pipeline=pipeline.name, round=round - 1)
    if previous is not None:
        return previous
    if round == 2:
        explicit = pipeline.ppo.sft_parent if pipeline.ppo is not None else None
        return current(registry, pipeline, stage="sft", explicit=explicit)
    return require(registry, stage="ppo", pipeline=pipeline.name, round=round - 1)


@dataclass(frozen=True)
class PPOParents:
    """PPO's parents. `roles()` keeps the order PPO entries have always been registered with: the registry
    compares parent lists, so another order would make every earlier PPO entry look out of date."""

    policy: Entry  # the policy trained: the SFT policy; round R >= 2: as rounds.policy_init
    reward: Entry  # the reward model of the same round
    reference: Entry  # the KL anchor: the SFT policy; round R >= 2: as rounds.kl_anchor

    def roles(self) -> dict[str, str]:
        return {"policy": self.policy.id, "reward": self.reward.id, "reference": self.reference.id}


def ppo_parents(registry: Registry, pipeline: Pipeline, *, round: int, quiet: bool = False) -> PPOParents:
    """Round 1 optimises the SFT policy (`ppo.sft_parent`, else the newest) against round 1's reward model
    (`ppo.rm_parent`, else the newest); round R >= 2 starts from round R-1's policy or the SFT policy
    (rounds.policy_init) against round R's reward model, KL-anchored to the SFT or the starting policy
    (rounds.kl_anchor). Round R-1's PPO entry is required whatever the settings: rounds follow one another."""
    cfg = pipeline.ppo
    sft = current(registry, pipeline, stage="sft", explicit=cfg.sft_parent, quiet=quiet)
    reward = current(registry, pipeline, stage="rm", round=round, explicit=cfg.rm_parent, quiet=quiet)
    if round == 1:
        return PPOParents(policy=sft, reward=reward, reference=sft)
    previous = require(registry, stage="ppo", pipeline=pipeline.name, round=round - 1)
    policy = previous if pipeline.rounds.policy_init == "previous" else sft
    return PPOParents(policy=policy, reward=reward, reference=sft if pipeline.rounds.kl_anchor == "sft" else policy)


@dataclass(frozen=True)
class RMRoundParents:
    """What a reward model of round R >= 2 is trained from, besides the rm section's own data."""

    comparisons: Entry  # roles["comparisons"]: the pairs collected for round R
    earlier: tuple[Entry, ...]  # rounds 2..R-1's collected pairs, trained on too with rounds.mix_previous
    previous: Entry  # round R-1's reward model: the new one is compared with it on the fresh pairs
    base: Entry | None  # roles["base"] when the rounds settings fix it (rm_init previous); None: as rm.init


def rm_round_parents(registry: Registry, pipeline: Pipeline, *, round: int, quiet: bool = False) -> RMRoundParents:
    """Round R's collected pairs (and, with rounds.mix_previous, every earlier round's), round R-1's reward model,
    and the backbone when rounds.rm_init is `previous`: that same reward model."""
    if round < 2:
        raise StageError(f"round {round} has no collected comparisons: rounds 2 and later do (`make collect`)")
    settings = pipeline.rounds
    comparisons = require(registry, stage="collect", pipeline=pipeline.name, round=round)
    previous = current(registry, pipeline, stage="rm", round=round - 1, quiet=quiet)
    earlier = tuple(require(registry, stage="collect", pipeline=pipeline.name, round=r)
                    for r in range(2, round)) if settings.mix_previous else ()
    return RMRoundParents(comparisons=comparisons, earlier=earlier, previous=previous,
                          base=previous if settings.rm_init == "previous" else None)
