"""Which entry each stage takes in each role, round by round (rlhf/pipeline/lineage.py): collect's policy, PPO's
policy, reward model and KL reference, a later round's reward model's comparisons, backbone and predecessor.
No training: entries are registered by hand, each stage once per round.

    .venv/bin/python -m pytest -q tests/test_lineage.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.errors import StageError
from rlhf.pipeline import lineage
from rlhf.pipeline.config import load_pipeline
from rlhf.pipeline.registry import Entry, Registry

TINY = Path(__file__).resolve().parent.parent / "pipelines" / "tiny.yaml"


@pytest.fixture
def registry(registry_home) -> Registry:
    return Registry(registry_home)


def pipeline(*overrides: str):
    return load_pipeline(TINY, list(overrides))[0]


def done(registry: Registry, stage: str, *, round: int = 1, name: str = "tiny") -> Entry:
    entry = registry.create(stage=stage, pipeline=name, config={}, config_hash=f"{stage}-{round}",
                            data_fingerprint="", round=round)
    return registry.complete(entry.id, metrics={})


def test_collect_samples_the_previous_rounds_policy(registry):
    sft = done(registry, "sft")
    assert lineage.collect_policy(registry, pipeline(), round=2) == sft  # no PPO yet: the SFT policy
    ppo1 = done(registry, "ppo")
    assert lineage.collect_policy(registry, pipeline(), round=2) == ppo1
    with pytest.raises(StageError, match=r"no complete ppo entry of round 2 .*run `make ppo ROUND=2` first"):
        lineage.collect_policy(registry, pipeline(), round=3)


def test_ppo_takes_the_sft_policy_in_round_one_and_follows_the_rounds_settings_after(registry):
    sft, rm1 = done(registry, "sft"), done(registry, "rm")
    first = lineage.ppo_parents(registry, pipeline(), round=1)
    assert (first.policy, first.reward, first.reference) == (sft, rm1, sft)
    assert first.roles() == {"policy": sft.id, "reward": rm1.id, "reference": sft.id}  # the registry's role order

    rm2 = done(registry, "rm", round=2)
    with pytest.raises(StageError, match=r"no complete ppo checkpoint .*run `make ppo` first"):
        lineage.ppo_parents(registry, pipeline(), round=2)
    ppo1 = done(registry, "ppo")
    cases = {("previous", "sft"): (ppo1, sft), ("previous", "previous"): (ppo1, ppo1), ("sft", "sft"): (sft, sft),
             ("sft", "previous"): (sft, sft)}  # kl_anchor previous: the policy the round starts from
    for (policy_init, kl_anchor), (policy, reference) in cases.items():
        found = lineage.ppo_parents(registry, pipeline(f"rounds.policy_init={policy_init}",
                                                       f"rounds.kl_anchor={kl_anchor}"), round=2)
        assert (found.policy, found.reward, found.reference) == (policy, rm2, reference), (policy_init, kl_anchor)


def test_ppo_takes_the_parents_the_pipeline_file_names(registry):
    sft, rm1 = done(registry, "sft"), done(registry, "rm")
    done(registry, "sft"), done(registry, "rm")  # newer, but not the ones named
    found = lineage.ppo_parents(registry, pipeline(f"ppo.sft_parent={sft.id}", f"ppo.rm_parent={rm1.id}"), round=1)
    assert (found.policy, found.reward, found.reference) == (sft, rm1, sft)


def test_a_later_reward_model_takes_its_rounds_pairs_and_the_previous_model(registry):
    rm1 = done(registry, "rm")
    with pytest.raises(StageError, match=r"no complete collect entry of round 2 .*run `make collect ROUND=2` first"):
        lineage.rm_round_parents(registry, pipeline(), round=2)
    pairs2, rm2, pairs3 = done(registry, "collect", round=2), done(registry, "rm", round=2), \
        done(registry, "collect", round=3)

    second = lineage.rm_round_parents(registry, pipeline(), round=2)
    assert (second.comparisons, second.earlier, second.previous, second.base) == (pairs2, (), rm1, rm1)
    third = lineage.rm_round_parents(registry, pipeline(), round=3)
    assert (third.comparisons, third.earlier, third.previous) == (pairs3, (pairs2,), rm2)
    alone = lineage.rm_round_parents(registry, pipeline("rounds.mix_previous=false", "rounds.rm_init=rm_init"),
                                     round=3)
    assert (alone.earlier, alone.base) == ((), None)  # rounds.rm_init rm_init: the rm section's init decides
    with pytest.raises(StageError, match="round 1 has no collected comparisons"):
        lineage.rm_round_parents(registry, pipeline(), round=1)
