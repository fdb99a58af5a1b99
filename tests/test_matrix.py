"""The task matrix (`make tasks`): medians over seeds, gap closed, verdicts and the one line for scripts (pure), and
`rlhf tasks` end to end on one small task (variants share their seed's SFT policy and reward model; a rerun trains
nothing)."""

from __future__ import annotations

import json
import math

import pytest

from rlhf.cli import main
from rlhf.errors import ConfigError
from rlhf.pipeline.matrix import RunFigures, Targets, final_line, summarise, table
from rlhf.pipeline.registry import Registry


def run(task="palette", variant="default", seed=1, **figures) -> RunFigures:
    values = dict(rm_accuracy=0.9, rm_start_accuracy=0.5, gold=1.0, sft_gold=0.0, best=3.0, length=6.0,
                  sft_length=6.0, kl=2.0)
    return RunFigures(task=task, variant=variant, seed=seed, **{**values, **figures})


def test_gap_closed_is_scale_free_and_can_be_negative():
    assert run(gold=1.0, sft_gold=0.0, best=3.0).gap_closed == pytest.approx(1 / 3)
    assert run(gold=10.0, sft_gold=0.0, best=30.0).gap_closed == pytest.approx(1 / 3)  # units do not matter
    assert run(gold=-1.0, sft_gold=0.0, best=2.0).gap_closed == pytest.approx(-0.5)
    assert math.isnan(run(gold=1.0, sft_gold=3.0, best=3.0).gap_closed)  # nothing left to close
    assert run(length=3.0, sft_length=6.0).length_ratio == 0.5


def test_medians_over_seeds_decide_each_target():
    runs = [run(seed=1, rm_accuracy=0.95, gold=2.0), run(seed=2, rm_accuracy=0.60, gold=0.1),
            run(seed=3, rm_accuracy=0.90, gold=1.5)]
    [summary] = summarise(runs)
    assert summary.seeds == (1, 2, 3) and summary.rm_accuracy == 0.90 and summary.gold == 1.5
    assert summary.gap_closed == pytest.approx(0.5) and summary.meets and summary.misses == ()


def test_a_run_with_no_gap_to_close_is_left_out_of_the_median_whatever_the_order():
    runs = [run(seed=1, gold=1.5), run(seed=2, gold=3.0, sft_gold=3.0), run(seed=3, gold=0.3)]
    assert math.isnan(runs[1].gap_closed)
    for order in (runs, runs[::-1], runs[1:] + runs[:1]):
        assert summarise(order)[0].gap_closed == pytest.approx((0.5 + 0.1) / 2)


def test_each_missed_target_is_named():
    weak = summarise([run(rm_accuracy=0.6, gold=0.5, length=1.0)])[0]
    assert not weak.meets
    assert weak.misses == ("rm accuracy 0.600 < 0.85", "gap closed 0.17 < 0.33",
                           "length 0.17x the SFT policy's < 0.50x")
    assert summarise([run(rm_accuracy=0.6)], Targets(rm_accuracy=0.5))[0].meets


def test_rows_keep_their_order_and_the_last_line_counts_them():
    summaries = summarise([run("praise"), run("lists", gold=0.0), run("praise", "lora", gold=0.2)])
    assert [(s.task, s.variant) for s in summaries] == [("praise", "default"), ("lists", "default"),
                                                       ("praise", "lora")]
    text = table(summaries)
    assert text.count("\n| ") == 4  # the header's separator and three rows
    assert text.splitlines()[-1] == final_line(summaries) == (
        "tasks: 1 of 3 meet the targets (rm accuracy >= 0.85, gold gap closed >= 1/3)")


def test_unknown_tasks_variants_and_seeds_are_refused(tmp_path, capsys):
    assert main(["tasks", "--tasks", "poetry", "--home", str(tmp_path)]) == 2
    assert "'poetry' is not a gold task" in capsys.readouterr().err
    assert main(["tasks", "--tasks", "lists", "--variants", "huge", "--home", str(tmp_path)]) == 2
    assert "'huge' is not a variant" in capsys.readouterr().err
    assert main(["tasks", "--seeds", "one", "--home", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["tasks", "--seeds", "1,1", "--home", str(tmp_path)]) == 2  # a seed twice would weigh twice
    assert "each once" in capsys.readouterr().err
    assert main(["tasks", "--tasks", "", "--home", str(tmp_path)]) == 2
    assert not (tmp_path / "registry").exists() and not (tmp_path / "data").exists()  # refused before any work
    with pytest.raises(ConfigError):
        from rlhf.stages.matrix import overrides
        overrides("lists", seed=1, data=tmp_path, variant="huge", extra=[])


@pytest.mark.slow
def test_rlhf_tasks_runs_one_small_task_end_to_end(tmp_path, capsys):
    args = ["tasks", "--tasks", "lists", "--seeds", "1", "--variants", "default,lora", "--home", str(tmp_path),
            "sft.max_steps=10", "rm.max_steps=10", "ppo.episodes=32", "ppo.rollout_batch_size=32",
            "ppo.max_eval_prompts=16"]
    code = main(args)
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert code == (0 if all(s["meets"] for s in summary["summaries"]) else 3)
    assert [(r["task"], r["variant"], r["seed"]) for r in summary["runs"]] == [("lists", "default", 1),
                                                                              ("lists", "lora", 1)]
    for r in summary["runs"]:  # the figures come from the entries, and best is the task's own bound
        assert 0 <= r["rm_accuracy"] <= 1 and r["sft_gold"] <= r["best"] and 2 <= r["best"] <= 5
    assert out.strip().splitlines()[-1].startswith("tasks: ") and "| lists | lora | 1 |" in out
    assert (tmp_path / "summary.md").read_text(encoding="utf-8").strip().endswith(out.strip().splitlines()[-1])
    entries = Registry(tmp_path / "registry").entries()
    assert sorted(e.stage for e in entries if e.stage != "base") == ["ppo", "ppo", "rm", "sft"]  # shared parents
    assert sorted(p.name for p in (tmp_path / "data" / "lists").iterdir()) == sorted(
        ["comparisons.jsonl", "eval_prompts.jsonl", "prompts.jsonl", "sft.jsonl"])
    main(args)  # a rerun trains nothing
    assert len(Registry(tmp_path / "registry").entries()) == len(entries)
