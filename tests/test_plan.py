"""What a stage would do, and what a rerun does: `rlhf plan`, the runner's decision (up to date, resume, train)
under FORCE and RESTART, parents by role, and registry entries written before roles, rounds and run tags were
fields. No training: entries are registered from the stages' own resolved inputs.

    .venv/bin/python -m pytest -q tests/test_plan.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.cli import main
from rlhf.pipeline import lineage
from rlhf.pipeline.config import load_pipeline
from rlhf.pipeline.registry import Entry, Registry
from rlhf.stages import plan, rm, sft
from rlhf.stages.base import ensure_base
from rlhf.stages.runner import StageInputs, decide

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "pipelines" / "tiny.yaml"


def dead_pid() -> int:
    return 2**22 + 12345  # above Linux's default pid_max: no such process


def actions(plans) -> dict[str, str]:
    return {p.stage: p.action for p in plans}


def register(registry: Registry, inputs: StageInputs, *, status: str = "complete") -> Entry:
    entry = registry.create(stage=inputs.stage, pipeline=inputs.pipeline, roles=inputs.roles, round=inputs.round,
                            config=inputs.config, config_hash=inputs.config_hash,
                            data_fingerprint=inputs.data_fingerprint, run="t")
    if status == "complete":
        return registry.complete(entry.id, metrics={})
    return registry.update(entry.id, pid=dead_pid())  # interrupted: its process is gone


@pytest.fixture
def setting(registry_home):
    pipeline, _ = load_pipeline(TINY, [])
    return pipeline, Registry(registry_home)


def test_a_fresh_registry_plans_every_stage_in_order(setting):
    pipeline, registry = setting
    plans = plan.plan(pipeline, registry, where="tiny")
    assert [(p.stage, p.action, p.after) for p in plans] == [
        ("sft", "train", []), ("rm", "train", ["sft"]), ("ppo", "train", ["sft", "rm"]),
        ("dpo", "train", ["sft", "rm"])]  # beside PPO, not after it
    assert plans[0].roles == {"base": "new base (built first)"}
    assert registry.entries() == []  # planning registers nothing


def test_plan_follows_the_registry_and_the_config(setting):
    pipeline, registry = setting
    base = ensure_base(pipeline, registry, where="tiny")
    found = sft.resolve(pipeline, registry, where="tiny", dry=True)
    assert found.inputs.roles == {"base": base.id}
    done = register(registry, found.inputs)

    plans = plan.plan(pipeline, registry, where="tiny")
    assert actions(plans) == {"sft": "up_to_date", "rm": "train", "ppo": "train", "dpo": "train"}
    assert plans[0].entry == done.id
    assert plans[1].roles == {"base": done.id} and plans[1].after == []  # the RM starts from that SFT policy

    assert actions(plan.plan(pipeline, registry, where="tiny", force=True))["sft"] == "train"
    changed, _ = load_pipeline(TINY, ["sft.learning_rate=1e-4"])
    plans = plan.plan(changed, registry, where="tiny")
    assert actions(plans) == {"sft": "train", "rm": "train", "ppo": "train", "dpo": "train"}
    assert plans[1].roles == {"base": "new sft"} and plans[1].after == ["sft"]


def test_an_interrupted_attempt_resumes_even_when_forced_and_restart_starts_over(setting):
    pipeline, registry = setting
    ensure_base(pipeline, registry, where="tiny")
    inputs = sft.resolve(pipeline, registry, where="tiny", dry=True).inputs
    killed = register(registry, inputs, status="running")
    saved = Path(killed.path) / "checkpoints" / "checkpoint-20"
    saved.mkdir(parents=True)
    (saved / "trainer_state.json").write_text("{}")
    (Path(killed.path) / "checkpoints" / "checkpoint-30").mkdir()  # torn: no trainer_state.json

    for force in (False, True):  # a cluster requeues the preempted `make sft FORCE=1` unchanged
        assert decide(registry, inputs, force=force, restart=False).action == "resume"
    [sft_plan] = [p for p in plan.plan(pipeline, registry, where="tiny", force=True) if p.stage == "sft"]
    assert (sft_plan.action, sft_plan.entry) == ("resume", killed.id)
    assert "from checkpoint-20" in sft_plan.detail

    restart = decide(registry, inputs, force=False, restart=True)
    assert restart.action == "train" and restart.superseded.id == killed.id


def test_force_retrains_a_complete_entry_and_a_live_attempt_is_busy(setting):
    pipeline, registry = setting
    ensure_base(pipeline, registry, where="tiny")
    inputs = sft.resolve(pipeline, registry, where="tiny", dry=True).inputs
    done = register(registry, inputs)
    assert decide(registry, inputs, force=False, restart=False).entry == done
    assert decide(registry, inputs, force=True, restart=False).action == "train"
    live = registry.create(stage="sft", pipeline=inputs.pipeline, roles=inputs.roles, config=inputs.config,
                           config_hash=inputs.config_hash, data_fingerprint=inputs.data_fingerprint)
    decision = decide(registry, inputs, force=True, restart=False)
    assert decision.action == "busy" and decision.entry.id == live.id


def test_rlhf_plan_prints_and_writes_json(setting, capsys):
    assert main(["plan", "--pipeline", str(TINY)]) == 0
    out = capsys.readouterr().out
    assert "sft" in out and "would train" in out and "after sft and rm" in out
    assert "memory per process" in out and "ppo: peak about" in out  # the estimate of each stage
    assert main(["plan", "--pipeline", str(TINY), "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert [p["stage"] for p in planned["stages"]] == ["sft", "rm", "ppo", "dpo"]
    assert planned["memory"]["ppo"]["peak_bytes"] > 0
    without, _ = load_pipeline(TINY, ["dpo=null"])  # a pipeline without a dpo section plans no DPO
    assert [p.stage for p in plan.plan(without, setting[1], where="tiny")] == ["sft", "rm", "ppo"]


def test_a_missing_parent_that_no_earlier_stage_makes_blocks_the_stage(setting):
    pipeline, registry = setting
    ensure_base(pipeline, registry, where="tiny")
    policy = register(registry, sft.resolve(pipeline, registry, where="tiny", dry=True).inputs)
    reward = register(registry, rm.resolve(pipeline, registry, where="tiny", dry=True).inputs)
    assert reward.roles == {"base": policy.id}
    plans = {p.stage: p for p in plan.plan(pipeline, registry, where="tiny")}
    assert actions(plans.values()) == {"sft": "up_to_date", "rm": "up_to_date", "ppo": "train", "dpo": "train"}
    assert plans["ppo"].roles == {"policy": policy.id, "reward": reward.id, "reference": policy.id}
    assert plans["dpo"].roles == {"policy": policy.id, "reference": policy.id, "reward": reward.id}

    named, _ = load_pipeline(TINY, ["ppo.sft_parent=sft-20261123T090512-a1b2c3"])  # an id that is not there
    plans = {p.stage: p for p in plan.plan(named, registry, where="tiny")}
    assert plans["ppo"].action == "blocked" and "sft-20261123T090512-a1b2c3" in plans["ppo"].detail


def test_a_later_round_plans_collect_rm_ppo_from_the_previous_policy(setting):
    pipeline, registry = setting
    plans = plan.plan(pipeline, registry, where="tiny", round=2)
    assert [p.stage for p in plans] == ["collect", "rm", "ppo"]  # no DPO after round 1
    assert plans[0].action == "blocked" and "run `make sft` first" in plans[0].detail
    ensure_base(pipeline, registry, where="tiny")
    policy = register(registry, sft.resolve(pipeline, registry, where="tiny", dry=True).inputs)
    plans = plan.plan(pipeline, registry, where="tiny", round=2)
    assert [(p.action, p.roles, p.after) for p in plans] == [
        ("train", {"policy": policy.id}, []), ("train", {}, ["collect"]), ("train", {}, ["collect", "rm"])]


def test_plan_of_a_hub_pipeline_offline_says_what_it_needs(capsys):
    """No hub here (the tests run with HF_HUB_OFFLINE=1): each stage says which data set it cannot see, and the
    memory estimate says which config.json it needs, in one line each; the plan itself succeeds."""
    assert main(["plan", "--pipeline", str(REPO / "pipelines" / "qwen2.5-0.5b-tldr.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.count("cannot tell without its data") == 3 and "HF_HUB_OFFLINE=1" in out
    assert "hf download Qwen/Qwen2.5-0.5B config.json" in out


# -- entries written before roles, rounds and run tags were fields -------------------------------------------------

OLD_PPO_ROUND_2 = {
    "id": "ppo-20261120T100000-abcdef", "stage": "ppo", "pipeline": "tiny", "status": "complete",
    "path": "/x", "created_at": "2026-11-20T10:00:00Z", "parents": ["ppo-20261119T100000-aaaaaa",
                                                                     "rm-20261120T090000-bbbbbb",
                                                                     "sft-20261119T080000-cccccc"],
    "info": {"round": 2, "run": "old-run", "sft": "sft-20261119T080000-cccccc", "rm": "rm-20261120T090000-bbbbbb",
             "start": "ppo-20261119T100000-aaaaaa", "reference": "sft-20261119T080000-cccccc"},
}


def test_old_entries_read_with_roles_round_and_run_tag():
    entry = Entry.from_dict(json.loads(json.dumps(OLD_PPO_ROUND_2)))
    assert (entry.round, entry.run) == (2, "old-run")
    assert entry.roles == {"policy": "ppo-20261119T100000-aaaaaa", "reward": "rm-20261120T090000-bbbbbb",
                           "reference": "sft-20261119T080000-cccccc"}
    round_one = Entry.from_dict({**OLD_PPO_ROUND_2, "parents": ["sft-20261119T080000-cccccc",
                                                                 "rm-20261120T090000-bbbbbb"],
                                 "info": {"run": "r"}})
    assert round_one.round == 1
    assert round_one.roles == {"policy": "sft-20261119T080000-cccccc", "reward": "rm-20261120T090000-bbbbbb",
                               "reference": "sft-20261119T080000-cccccc"}
    rm = Entry.from_dict({**OLD_PPO_ROUND_2, "id": "rm-20261120T090000-bbbbbb", "stage": "rm",
                          "parents": ["rm-20261119T090000-dddddd", "collect-20261120T080000-eeeeee"]})
    assert rm.roles == {"base": "rm-20261119T090000-dddddd", "comparisons": "collect-20261120T080000-eeeeee"}


def test_old_entries_are_found_by_round(registry_home):
    """An old round-2 entry on disk is found by `lineage` for round 2 and not for round 1."""
    registry = Registry(registry_home)
    (registry.root / "registry").mkdir(parents=True)
    (registry.root / "registry" / f"{OLD_PPO_ROUND_2['id']}.json").write_text(json.dumps(OLD_PPO_ROUND_2))
    assert lineage.newest(registry, stage="ppo", pipeline="tiny", round=2).id == OLD_PPO_ROUND_2["id"]
    assert lineage.newest(registry, stage="ppo", pipeline="tiny", round=1) is None
    assert lineage.next_round(registry, "tiny") == 3


def test_a_stage_that_does_not_fit_gets_the_cheapest_change_that_does(setting):
    """Against a GPU too small for the tiny PPO stage as configured, the plan says so and names the change that
    fits; the stages themselves never read the plan, so a user who insists still runs them."""
    pipeline, registry = setting
    found = plan.memory(pipeline, registry, ["sft", "rm", "ppo"], processes=1, on_gpu=True, gpu_bytes=600 * 2**20)
    assert "DOES NOT FIT" in found.text, found.text
    assert found.stages["sft"]["fits"] is False and found.stages["sft"]["change"], found.stages
    roomy = plan.memory(pipeline, registry, ["ppo"], processes=1, on_gpu=True, gpu_bytes=80 * 2**30)
    assert roomy.stages["ppo"]["fits"] is True and roomy.stages["ppo"]["change"] is None
