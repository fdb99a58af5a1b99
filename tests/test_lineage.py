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
from rlhf.pipeline.stage_config import settings_hash

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


def trained(registry: Registry, stage: str, settings, *, round: int = 1) -> Entry:
    """A complete entry of `stage` recorded with the config hash a run of `settings` (a pipeline) records, made
    a second after the last one (entries made within one second have no order)."""
    entry = registry.create(stage=stage, pipeline=settings.name, config={}, data_fingerprint="", round=round,
                            config_hash=settings_hash(settings, stage=stage, round=round))
    made = len(registry.entries())
    registry.update(entry.id, created_at=f"2026-11-30T12:00:{made:02d}Z")
    return registry.complete(entry.id, metrics={})


def test_parents_are_the_entries_the_current_settings_made_even_when_others_are_newer(registry, capsys):
    ours, other = pipeline(), pipeline("sft.epochs=3", "rm.epochs=2")
    sft, rm1 = trained(registry, "sft", ours), trained(registry, "rm", ours)
    newer_sft, newer_rm = trained(registry, "sft", other), trained(registry, "rm", other)  # make sft SET=...
    found = lineage.ppo_parents(registry, ours, round=1)
    assert (found.policy, found.reward, found.reference) == (sft, rm1, sft)
    assert lineage.current(registry, ours, stage="sft") == sft
    assert lineage.collect_policy(registry, ours, round=2) == sft
    assert "note:" not in capsys.readouterr().out
    # with those other settings, their own entries; and an entry named in the file wins over both
    found = lineage.ppo_parents(registry, other, round=1)
    assert (found.policy, found.reward) == (newer_sft, newer_rm)
    assert lineage.current(registry, ours, stage="sft", explicit=newer_sft.id) == newer_sft


def test_without_an_entry_of_the_current_settings_the_newest_is_taken_with_a_notice(registry, capsys):
    ours = pipeline()
    older, newest = trained(registry, "sft", pipeline("sft.epochs=3")), trained(registry, "sft", pipeline("seed=7"))
    assert lineage.current(registry, ours, stage="sft") == newest != older
    out = capsys.readouterr().out
    assert f"no complete sft entry of pipeline 'tiny' has its current 'sft' settings; taking the newest, {newest.id}" \
        in out and "`make sft` trains one" in out
    trained(registry, "sft", ours)  # a policy with these settings now exists: taken, though older ones stay
    assert lineage.current(registry, ours, stage="sft").config_hash == settings_hash(ours, stage="sft")
    assert "note:" not in capsys.readouterr().out


def test_a_round_twos_reward_model_compares_with_round_ones_of_the_current_settings(registry):
    ours, other = pipeline(), pipeline("rm.learning_rate=1e-4")
    rm1 = trained(registry, "rm", ours)
    trained(registry, "rm", other)  # newer round-1 model with other settings
    pairs2 = done(registry, "collect", round=2)
    found = lineage.rm_round_parents(registry, ours, round=2)
    assert (found.comparisons, found.previous) == (pairs2, rm1)


def test_a_plan_resolves_the_same_parents_without_the_notice(registry, capsys):
    newest = trained(registry, "sft", pipeline("sft.epochs=3"))
    trained(registry, "rm", pipeline("sft.epochs=3"))
    found = lineage.ppo_parents(registry, pipeline("rm.epochs=2"), round=1, quiet=True)
    assert found.policy == newest and "note:" not in capsys.readouterr().out
