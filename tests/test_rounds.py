"""Iterated rounds on the tiny task: collect with the gold labeller, a round-2 reward model and PPO with
the whole lineage in the registry, `rlhf rounds`, and the external-labels round trip with its errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rlhf.cli import main
from rlhf.pipeline import labels, lineage
from rlhf.pipeline.registry import Registry
from rlhf.tasks.praise import gold_score

pytestmark = pytest.mark.slow

# Short stages; the reward model at 3e-3, the rate that learns praise in 2 epochs (the pipeline's 1e-3 is for 12).
SMALL = ["sft.epochs=1", "rm.epochs=2", "rm.learning_rate=3e-3", "rm.max_train_samples=1200", "ppo.episodes=128",
         "ppo.rollout_batch_size=32",
         "ppo.max_eval_prompts=32", "ppo.save_steps=100", "rounds.num_prompts=64",
         "rounds.kl_anchor=sft"]  # the code default (the tiny pipeline anchors to the previous round's policy)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """Round 1 (SFT, RM, PPO) of the tiny pipeline, shared by the tests of this file."""
    home = tmp_path_factory.mktemp("rounds")
    old = os.environ.get("RLHF_HOME")
    os.environ["RLHF_HOME"] = str(home)
    try:
        for stage in ("sft", "rm", "ppo"):
            assert main([stage, "--run", "r", *SMALL]) == 0
    finally:
        os.environ["RLHF_HOME"] = old or ""
    return home


@pytest.fixture
def registry(home, monkeypatch) -> Registry:
    monkeypatch.setenv("RLHF_HOME", str(home))
    return Registry(home)


# How far a later round's eval/gold may fall below round 1's. Measured with this file's settings (seeds 42, 1-4),
# rounds 2 and 3 ended 0.06 below to 0.60 above round 1; round 1 gained 0.17-0.43 over SFT, so this floor binds
# only where round 1 gained over 0.4 (seed 1), and the SFT floor (+0.25) elsewhere: the check takes the higher.
REGRESSION_MARGIN = 0.15


def newest(registry: Registry, stage: str):
    return registry.entries(stage=stage, pipeline="tiny", status="complete")[-1]


def gold_floor(ppo1) -> float:
    """What a later round's eval/gold must exceed: the SFT policy's + 0.25, and round 1's less REGRESSION_MARGIN."""
    return max(ppo1.metrics["eval/sft_gold"] + 0.25, ppo1.metrics["eval/gold"] - REGRESSION_MARGIN)


def test_two_rounds_keep_the_lineage_and_compare_side_by_side(registry, capsys):
    sft, rm1, ppo1 = (newest(registry, s) for s in ("sft", "rm", "ppo"))
    assert main(["collect", "--round", "2", *SMALL]) == 0
    pairs = newest(registry, "collect")
    assert pairs.round == 2 and pairs.roles == {"policy": ppo1.id} and pairs.info["labeller"] == "gold"
    train = [json.loads(line) for line in (Path(pairs.path) / lineage.TRAIN_FILE).read_text().splitlines()]
    held = [json.loads(line) for line in (Path(pairs.path) / lineage.EVAL_FILE).read_text().splitlines()]
    assert len(train) == pairs.metrics["collect/pairs"] > 50 and held
    # The gold labeller ranked every pair by the gold reward (ties were dropped), on prompts kept apart.
    assert all(gold_score(r["prompt"], r["chosen"]) > gold_score(r["prompt"], r["rejected"]) for r in train + held)
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in held})

    assert main(["rm", "--round", "2", *SMALL]) == 0
    rm2 = newest(registry, "rm")
    assert rm2.round == 2 and rm2.roles == {"base": rm1.id, "comparisons": pairs.id}  # starts from round 1's RM
    assert rm2.parents == [rm1.id, pairs.id]
    assert rm2.metrics["eval/pairs"] == len(held) and rm2.metrics["train/pairs"] > len(train)  # mixed with round 1
    assert 0 <= rm2.metrics["eval/previous_rm_accuracy"] <= 1 and rm2.metrics["eval/accuracy"] > 0.5

    assert main(["ppo", "--round", "2", *SMALL]) == 0
    ppo2 = newest(registry, "ppo")
    assert ppo2.round == 2 and ppo2.roles == {"policy": ppo1.id, "reward": rm2.id, "reference": sft.id}
    assert ppo2.parents == [ppo1.id, rm2.id, sft.id]
    # The policy started from round 1's, so it is already away from the SFT anchor that the KL is measured to.
    assert ppo2.metrics["eval/kl"] > 0 and ppo2.metrics["eval/sft_kl"] == pytest.approx(0.0, abs=1e-4)
    assert ppo2.metrics["eval/sft_gold"] == ppo1.metrics["eval/sft_gold"]  # same seeded baseline
    # Round 2 keeps what round 1 learned: its policy's gold stays above the SFT policy's it is anchored to, and
    # does not fall back from round 1's, where it started.
    assert ppo2.metrics["eval/gold"] > gold_floor(ppo1), (ppo1.metrics, ppo2.metrics)

    # `rlhf ppo` without --round is still round 1: up to date, not confused by round 2's reward model.
    assert main(["ppo", *SMALL]) == 0
    assert "up to date" in capsys.readouterr().out

    # `rlhf rounds` runs collect -> rm -> ppo as round 3, from round 2's policy, here anchored to it.
    assert main(["rounds", "--count", "1", *SMALL, "rounds.mix_previous=false", "rounds.kl_anchor=previous"]) == 0
    pairs3, rm3, ppo3 = (newest(registry, s) for s in ("collect", "rm", "ppo"))
    assert [e.round for e in (pairs3, rm3, ppo3)] == [3, 3, 3]
    assert pairs3.parents == [ppo2.id] and rm3.parents == [rm2.id, pairs3.id]
    assert ppo3.parents == [ppo2.id, rm3.id] and ppo3.roles["reference"] == ppo2.id
    assert ppo3.metrics["eval/sft_kl"] == pytest.approx(0.0, abs=1e-4)  # KL measured to round 2's policy
    assert ppo3.metrics["eval/gold"] > gold_floor(ppo1), (ppo1.metrics, ppo3.metrics)  # still above SFT and round 1
    assert rm3.metrics["train/pairs"] == pairs3.metrics["collect/pairs"]  # not mixed this time

    capsys.readouterr()
    assert main(["compare", "--json"]) == 0
    rows = [r for r in json.loads(capsys.readouterr().out) if r["run"] == "r"]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[1]["stages"]["sft"]["reused"] and rows[1]["stages"]["ppo"]["id"] == ppo2.id
    assert rows[1]["stages"]["collect"]["metrics"]["collect/pairs"] == len(train)
    assert main(["compare"]) == 0
    assert "eval/previous_rm_accuracy" in capsys.readouterr().out


def test_external_labels_round_trip_and_bad_labels(registry, tmp_path, capsys):
    before = len(registry.entries(stage="collect"))
    file_labeller = [*SMALL, "rounds.labeller=file", "rounds.num_prompts=16"]
    assert main(["collect", "--round", "2", *file_labeller]) == 0
    out = capsys.readouterr().out
    assert "pairs to label" in out and "LABELS=" in out
    assert len(registry.entries(stage="collect")) == before  # nothing registered until the labels come back
    [pairs_file] = (registry.root / "tiny" / "labelling").glob("round-2-*.pairs.jsonl")
    pairs = labels.read_pairs(pairs_file)

    def choice(pair: labels.CandidatePair) -> str:  # a person who agrees with the gold reward
        a, b = gold_score(pair.prompt, pair.a), gold_score(pair.prompt, pair.b)
        return "skip" if a == b else "a" if a > b else "b"

    wrong_round = tmp_path / "wrong.jsonl"
    wrong_round.write_text("".join(json.dumps({"id": p.id, "round": 3, "choice": "a"}) + "\n" for p in pairs))
    assert main(["collect", "--round", "2", "--labels", str(wrong_round), *file_labeller]) == 2
    err = capsys.readouterr().err
    assert str(wrong_round) in err and "line 1" in err and "'round'" in err and len(err.strip().splitlines()) == 1
    assert len(registry.entries(stage="collect")) == before

    good = tmp_path / "labels.jsonl"
    good.write_text("".join(json.dumps({"id": p.id, "round": 2, "choice": choice(p)}) + "\n" for p in pairs))
    assert main(["collect", "--round", "2", "--labels", str(good), *file_labeller]) == 0
    entry = newest(registry, "collect")
    assert entry.info["labeller"] == "file" and entry.info["labels"] == str(good) and entry.round == 2
    rows = [json.loads(line) for name in (lineage.TRAIN_FILE, lineage.EVAL_FILE)
            for line in (Path(entry.path) / name).read_text().splitlines()]
    ranked = [p for p in pairs if choice(p) != "skip"]
    assert len(rows) == len(ranked) and entry.metrics["collect/skipped"] == len(pairs) - len(ranked)
    assert all(gold_score(r["prompt"], r["chosen"]) > gold_score(r["prompt"], r["rejected"]) for r in rows)
