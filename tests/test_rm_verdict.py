"""The reward model's verdict and kept checkpoint, on hand-made numbers (rlhf/pipeline/rm_verdict.py), the settings
that drive them, and PPO's refusal of a weak reward model before it loads anything.

    .venv/bin/python -m pytest -q tests/test_rm_verdict.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rlhf.errors import ConfigError, ModelError
from rlhf.pipeline.config import load_pipeline
from rlhf.pipeline.registry import Registry
from rlhf.pipeline.rm_verdict import (
    EvalPoint,
    Verdict,
    best_point,
    eval_points,
    judge,
    keep_line,
    of_entry,
    require_accuracy,
)
from rlhf.stages import ppo

REPO = Path(__file__).resolve().parent.parent

# A trainer's log_history: the starting model at step 0, training logs, evaluations at 10, 20, 30, and the
# evaluation after training (step 30 again, the kept model's figures).
LOGS = [
    {"step": 0, "eval_loss": 0.70, "eval_accuracy": 0.50},
    {"step": 5, "loss": 0.69, "accuracy": 0.55},
    {"step": 10, "eval_loss": 0.50, "eval_accuracy": 0.80},
    {"step": 20, "eval_loss": 0.45, "eval_accuracy": 0.87},
    {"step": 30, "eval_loss": 0.40, "eval_accuracy": 0.82},
    {"step": 30, "train_loss": 0.55},
]


def test_eval_points_leave_out_the_starting_model_and_training_logs():
    assert eval_points(LOGS) == [EvalPoint(10, 0.80, 0.50), EvalPoint(20, 0.87, 0.45), EvalPoint(30, 0.82, 0.40)]
    # Two logs at one step (a resumed attempt evaluating again): the later one counts.
    assert eval_points([*LOGS, {"step": 30, "eval_loss": 0.3, "eval_accuracy": 0.9}])[-1] == EvalPoint(30, 0.9, 0.3)
    assert eval_points([]) == []


def test_best_point_is_the_first_best_as_transformers_picks_it():
    points = eval_points(LOGS)
    assert best_point(points, metric="accuracy").step == 20  # 0.87 beats 0.80 and 0.82
    assert best_point(points, metric="loss").step == 30  # 0.40 is the lowest loss
    tie = [EvalPoint(10, 0.9, 0.3), EvalPoint(20, 0.9, 0.3)]
    assert best_point(tie, metric="accuracy").step == 10 and best_point(tie, metric="loss").step == 10
    assert best_point([], metric="accuracy") is None


def test_keep_line_says_where_accuracy_peaked_and_what_is_kept():
    points = eval_points(LOGS)
    assert keep_line(points, kept_by="accuracy", kept_step=20, total_steps=30) == (
        "held-out accuracy peaked at 0.870 at step 20 of 30 (0.820 at the end); keeping that checkpoint "
        "(rm.best_metric: accuracy)")
    by_loss = keep_line(points, kept_by="loss", kept_step=30, total_steps=30)
    assert "lowest (0.4000, accuracy 0.820) at step 30 of 30" in by_loss and "peaked at 0.870 at step 20" in by_loss
    assert keep_line(points, kept_by="last", kept_step=30, total_steps=30) == (
        "held-out accuracy peaked at 0.870 at step 20 of 30 and ended at 0.820; keeping the last checkpoint "
        "(rm.best_metric: last)")
    rising = [EvalPoint(10, 0.7, 0.5), EvalPoint(20, 0.9, 0.3)]
    assert "the last evaluation; keeping the last checkpoint" in keep_line(rising, kept_by="accuracy", kept_step=20,
                                                                           total_steps=20)
    flat_end = [EvalPoint(10, 0.7, 0.5), EvalPoint(20, 0.9, 0.3), EvalPoint(30, 0.9, 0.2)]
    assert keep_line(flat_end, kept_by="accuracy", kept_step=20, total_steps=30) == (
        "held-out accuracy reached 0.900 at step 20 of 30 and rose no higher; keeping that checkpoint "
        "(rm.best_metric: accuracy)")
    assert keep_line([], kept_by="accuracy", kept_step=30, total_steps=30) is None  # evaluated at the end only


def test_verdict_ok_low_flat_and_both():
    ok = judge(accuracy=0.90, init_accuracy=0.50, warn_accuracy=0.7, warn_gain=0.05)
    assert ok.status == "ok" and ok.problems == () and ok.advice == ()
    assert ok.line() == "held-out accuracy 0.900 (0.500 before training): ok"
    # Learned (+0.15) but not enough: the low-accuracy advice, which starts with a lower rate and more epochs.
    low = judge(accuracy=0.65, init_accuracy=0.50, warn_accuracy=0.7, warn_gain=0.05)
    assert low.status == "weak" and low.problems == ("below rm.warn_accuracy 0.7",)
    assert "lower learning rate" in low.advice[0] and any("label" in a for a in low.advice)
    # Above the bar but hardly moved from a good start (0.78 -> 0.80 = +0.02 < 0.05): flat only.
    flat = judge(accuracy=0.80, init_accuracy=0.78, warn_accuracy=0.7, warn_gain=0.05)
    assert flat.status == "weak" and flat.problems == ("+0.020 over the starting model, less than rm.warn_gain 0.05",)
    assert "training loss hardly fell" in flat.advice[0]
    # Chance and unmoved: both problems, each piece of advice once.
    both = judge(accuracy=0.51, init_accuracy=0.50, warn_accuracy=0.7, warn_gain=0.05)
    assert len(both.problems) == 2 and len(set(both.advice)) == len(both.advice) > 4
    assert both.line().startswith("held-out accuracy 0.510 (0.500 before training): weak: +0.010 over")
    # Without a step-0 evaluation only the accuracy bar applies.
    assert judge(accuracy=0.75, init_accuracy=None, warn_accuracy=0.7, warn_gain=0.05).status == "ok"


def test_verdict_round_trips_through_the_registry_info():
    verdict = judge(accuracy=0.51, init_accuracy=0.50, warn_accuracy=0.7, warn_gain=0.05)
    assert Verdict.from_info(verdict.as_info()) == verdict


def _entries(registry: Registry, *, metrics: dict, info: dict | None = None):
    """A complete SFT entry and a complete RM entry with `metrics`: PPO's resolve reads no weights."""
    sft = registry.create(stage="sft", pipeline="gate", parents=[], config={}, config_hash="s", data_fingerprint="d")
    registry.complete(sft.id, metrics={})
    rm = registry.create(stage="rm", pipeline="gate", parents=[sft.id], config={}, config_hash="r",
                         data_fingerprint="d", info=info or {})
    return sft, registry.complete(rm.id, metrics=metrics)


def _gate_pipeline(*, minimum: float | None):
    """The tiny pipeline, as pipeline `gate`, with ppo.min_rm_accuracy set to `minimum`."""
    overrides = ["name=gate"] + ([f"ppo.min_rm_accuracy={minimum}"] if minimum is not None else [])
    return load_pipeline(REPO / "pipelines" / "tiny.yaml", overrides)


def test_ppo_refuses_a_reward_model_below_min_rm_accuracy_before_loading_anything():
    registry = Registry(os.environ["RLHF_HOME"])
    sft, rm = _entries(registry, metrics={"eval/accuracy": 0.62, "eval/init_accuracy": 0.5})
    pipeline, path = _gate_pipeline(minimum=0.8)
    with pytest.raises(ConfigError) as refused:
        ppo.run(pipeline, registry=registry, where=str(path))  # the entries' folders hold no model: nothing loads
    message = str(refused.value)
    assert rm.id in message and "0.620" in message and "ppo.min_rm_accuracy 0.8" in message, message
    assert not registry.entries(stage="ppo")  # refused before a PPO entry was made
    # At or above the bar (or unset) the same entries resolve.
    for minimum in (0.6, None):
        pipeline, path = _gate_pipeline(minimum=minimum)
        assert ppo.resolve(pipeline, registry, where=str(path)).job.reward.id == rm.id


def test_ppo_prints_the_reward_models_verdict_before_it_starts(capsys):
    registry = Registry(os.environ["RLHF_HOME"])
    _, rm = _entries(registry, metrics={"eval/accuracy": 0.62, "eval/init_accuracy": 0.60})
    pipeline, path = _gate_pipeline(minimum=None)
    with pytest.raises(ModelError):  # the entries hold no model: PPO stops at loading one, after its start-up lines
        ppo.run(pipeline, registry=registry, where=str(path))
    out = capsys.readouterr().out
    assert (f"ppo: warning: reward model {rm.id}: held-out accuracy 0.620 (0.600 before training): weak: +0.020 "
            "over the starting model, less than rm.warn_gain 0.05; below rm.warn_accuracy 0.7") in out


def test_min_rm_accuracy_refuses_an_entry_without_a_held_out_accuracy():
    registry = Registry(os.environ["RLHF_HOME"])
    _, rm = _entries(registry, metrics={})
    with pytest.raises(ConfigError, match=r"records no held-out accuracy.*name an rm entry with ppo.rm_parent"):
        require_accuracy(rm, minimum=0.7, setting="ppo.min_rm_accuracy", where="x.yaml")
    assert of_entry(rm) is None


def test_of_entry_prefers_the_recorded_verdict_and_judges_older_entries_by_the_defaults():
    registry = Registry(os.environ["RLHF_HOME"])
    recorded = judge(accuracy=0.75, init_accuracy=0.5, warn_accuracy=0.8, warn_gain=0.05)  # judged by stricter rm
    _, rm = _entries(registry, metrics={"eval/accuracy": 0.75, "eval/init_accuracy": 0.5},
                     info={"verdict": recorded.as_info()})
    assert of_entry(rm) == recorded and of_entry(rm).status == "weak"
    _, old = _entries(registry, metrics={"eval/accuracy": 0.75, "eval/init_accuracy": 0.5})
    assert of_entry(old).status == "ok" and of_entry(old).warn_accuracy == 0.7  # the RMStage defaults


@pytest.mark.parametrize("override, expected", [
    ("rm.eval_steps=10", r"'rm.best_metric' accuracy .* 'rm.eval_steps' \(10\) must equal 'rm.save_steps' \(40\)"),
    ("rm.warn_accuracy=1.5", r"'rm.warn_accuracy' must be in \[0, 1\], got 1.5"),
    ("rm.warn_gain=-0.1", r"'rm.warn_gain' must be in \[0, 1\]"),
    ("ppo.min_rm_accuracy=2", r"'ppo.min_rm_accuracy' must be in \[0, 1\] when set, got 2"),
    ("rm.best_metric=auc", r"'rm.best_metric' must be one of accuracy, loss, last; got 'auc'"),
])
def test_bad_rm_keep_and_alarm_settings_name_the_key(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_pipeline(REPO / "pipelines" / "tiny.yaml", [override])


def test_eval_steps_may_differ_from_save_steps_when_keeping_the_last():
    pipeline, _ = load_pipeline(REPO / "pipelines" / "tiny.yaml", ["rm.eval_steps=10", "rm.best_metric=last"])
    assert pipeline.rm.eval_steps == 10 and pipeline.rm.best_metric == "last"
    assert load_pipeline(REPO / "pipelines" / "tiny.yaml", ["rm.eval_steps=40"])[0].rm.eval_steps == 40
