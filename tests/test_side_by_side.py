"""Stage three side by side (rlhf/pipeline/side_by_side.py, bench/algorithms.py): medians over seeds, the equal-time
budget, the table, and one end-to-end run of the driver from the session's SFT and RM."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.pipeline.side_by_side import MethodRun, equal_time_episodes, summarise, table

REPO = Path(__file__).resolve().parent.parent


def run(method: str, seed: int, *, gold: float, episodes: int | None = 2048, seconds: float = 10.0,
        rate: float | None = 100.0, peak: float | None = 500.0) -> MethodRun:
    return MethodRun(method=method, seed=seed, episodes=episodes, gold=gold, sft_gold=0.5, kl=seed * 1.0,
                     seconds=seconds, episodes_per_s=rate, peak_memory_mb=peak)


def test_medians_per_method_in_the_table_order():
    runs = [run("grpo", 1, gold=2.0), run("ppo", 1, gold=1.0), run("ppo", 2, gold=3.0), run("ppo", 3, gold=2.5),
            run("dpo", 1, gold=1.5, episodes=None, rate=None), run("grpo", 2, gold=1.0)]
    by_method = {s.method: s for s in summarise(runs)}
    assert [s.method for s in summarise(runs)] == ["ppo", "grpo", "dpo"]
    assert by_method["ppo"].gold == 2.5 and by_method["ppo"].gold_gain == 2.0 and by_method["ppo"].kl == 2.0
    assert by_method["ppo"].seeds == (1, 2, 3)
    assert by_method["grpo"].gold == 1.5  # the median of two is their mean
    assert by_method["dpo"].episodes is None and by_method["dpo"].episodes_per_s is None


def test_one_method_at_two_budgets_is_two_rows():
    rows = summarise([run("rloo", 1, gold=1.0, episodes=2048), run("rloo", 1, gold=2.0, episodes=4096)])
    assert [(s.episodes, s.gold) for s in rows] == [(2048, 1.0), (4096, 2.0)]


def test_missing_figures_are_left_out_of_the_median():
    rows = summarise([run("ppo", 1, gold=1.0, peak=None), run("ppo", 2, gold=1.0, peak=300.0),
                      run("ppo", 3, gold=1.0, peak=math.nan)])
    assert rows[0].peak_memory_mb == 300.0


def test_an_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="unknown method 'dapo'"):
        summarise([run("dapo", 1, gold=1.0)])


def test_equal_time_episodes_round_to_whole_steps():
    assert equal_time_episodes(18.7, 139.0, multiple=64, at_least=64) == 2624  # 2599 episodes -> 41 steps
    assert equal_time_episodes(0.1, 10.0, multiple=64, at_least=64) == 64
    with pytest.raises(ValueError, match="positive"):
        equal_time_episodes(10.0, 0.0, multiple=64, at_least=64)


def test_the_table_has_a_row_per_summary_and_a_dash_for_what_dpo_lacks():
    text = table(summarise([run("ppo", 1, gold=2.0), run("dpo", 1, gold=1.0, episodes=None, rate=None)]))
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("| PPO (value model) | 1 | 2048 | 0.50 | 2.00 | 1.50 |")
    assert "| pairs |" in lines[3] and "| – |" in lines[3]


@pytest.mark.slow
def test_the_driver_compares_methods_from_one_sft_and_rm(trained_parents, tmp_path):
    """PPO, RLOO and DPO from the session's parents, then RLOO again at PPO's wall time: every method learned
    (gold above the SFT policy's), the equal-time run has its own episode count, and the files are written."""
    command = [sys.executable, str(REPO / "bench" / "algorithms.py"), "--home", str(trained_parents["home"]),
               "--sft", trained_parents["sft"], "--rm", trained_parents["rm"], "--seeds", "7",
               "--methods", "ppo,rloo,dpo", "--episodes", "512", "--threads", "1"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    home = Path(trained_parents["home"])
    document = json.loads((home / "summary.json").read_text())
    runs = document["runs"]
    assert [r["method"] for r in runs] == ["ppo", "rloo", "dpo", "rloo"]
    for r in runs:
        assert r["gold"] > r["sft_gold"] + 0.2, r  # every method moved the policy toward the gold reward
        assert r["seconds"] > 0
    assert runs[0]["episodes"] == runs[1]["episodes"] == 512 and runs[2]["episodes"] is None
    assert runs[3]["episodes"] % 64 == 0 and runs[3]["episodes"] != 512  # critic-free: more episodes in PPO's time
    text = (home / "summary.md").read_text()
    assert "Equal episodes" in text and "Equal wall time" in text
    assert (home / "curves.png").stat().st_size > 10_000
