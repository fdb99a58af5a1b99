"""Reward-hacking alarms on fabricated metric streams: each alarm fires on its pattern, once, at the step worked out
by hand in the docstrings; a healthy noisy stream, one wild step and the tiny run's early KL peak fire nothing. Then one
short PPO run where they fire (console line, registry entry) and one where none does."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest

from rlhf.core.alarms import ENTROPY, KINDS, KL, LENGTH, SCORE, VALUE_LOSS, AlarmConfig, AlarmWatch
from rlhf.errors import ConfigError
from rlhf.pipeline.config import load_pipeline

TINY = Path(__file__).resolve().parent.parent / "pipelines" / "tiny.yaml"


def healthy(step: int, *, noise: random.Random | None = None, critic: bool = True) -> dict:
    """A good run's step, shaped like the tiny run's history.jsonl: the score rises to a plateau near 1.3, the KL
    rises from 0 and settles near 3.5 nats, entropy eases from 1.35 to 1.0, length stays near 7.9 tokens, the value
    loss falls from 0.5 to 0.05. `noise` adds the step-to-step scatter those runs show."""
    settle = 1 - math.exp(-step / 6)
    metrics = {SCORE: -0.4 + 1.7 * settle, KL: 3.5 * settle, ENTROPY: 1.35 - 0.35 * settle, LENGTH: 7.9,
               VALUE_LOSS: 0.05 + 0.45 * (1 - settle)}
    if noise is not None:
        scatter = {SCORE: 0.1, KL: 0.8, ENTROPY: 0.05, LENGTH: 0.6, VALUE_LOSS: 0.02}
        metrics = {name: value + noise.uniform(-1, 1) * scatter[name] for name, value in metrics.items()}
        metrics[VALUE_LOSS] = max(metrics[VALUE_LOSS], 0.01)
    if not critic:
        del metrics[VALUE_LOSS]
    return metrics


def run(stream, config: AlarmConfig | None = None) -> AlarmWatch:
    """Feed steps 1, 2, ... of `stream` (a list of metric dicts)."""
    watch = AlarmWatch(config or AlarmConfig())
    for step, metrics in enumerate(stream, start=1):
        watch.observe(metrics, step=step)
    return watch


def fired(watch: AlarmWatch) -> list[tuple[str, int]]:
    return [(alarm.kind, alarm.step) for alarm in watch.fired]


def with_(step: int, **changes) -> dict:
    """A healthy step (no noise) with some figures replaced, by short name."""
    names = {"score": SCORE, "kl": KL, "entropy": ENTROPY, "length": LENGTH, "value_loss": VALUE_LOSS}
    return {**healthy(step), **{names[k]: v for k, v in changes.items()}}


# -- quiet on good runs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("critic", [True, False], ids=["ppo", "critic-free"])
def test_a_healthy_noisy_run_fires_nothing(seed, critic):
    noise = random.Random(seed)
    watch = run([healthy(step, noise=noise, critic=critic) for step in range(1, 201)])
    assert fired(watch) == []
    assert watch.summary() == {"alarms/fired": "none"}


def test_the_tiny_runs_early_kl_peak_fires_nothing():
    """The bundled tiny run's KL can peak near 12 nats at steps 3-4 and then settle near 3: the rolling median (at
    most 6 at step 5: median of 0, 4, 12, 12, 6) stays far under kl_max, and it falls after."""
    kls = [0.0, 4.0, 12.0, 12.0, 6.0] + [3.0] * 40
    assert fired(run([with_(step, kl=kl) for step, kl in enumerate(kls, start=1)])) == []


def test_one_wild_step_fires_nothing():
    """A rolling median of 5 steps ignores any one step (and any two): a length of 1 token, a KL of 60 nats, an
    entropy of 0.01 and a value loss of 30 at step 21 move none of the medians past a threshold."""
    stream = [healthy(step) for step in range(1, 41)]
    stream[20] = {**stream[20], LENGTH: 1.0, KL: 60.0, ENTROPY: 0.01, VALUE_LOSS: 30.0}
    stream[25] = {**stream[25], LENGTH: 30.0, KL: 60.0}
    stream[26] = {**stream[26], LENGTH: 30.0, KL: 60.0}
    assert fired(run(stream)) == []


def test_missing_and_non_finite_figures_are_skipped():
    stream = [healthy(step) for step in range(1, 41)]
    for step in (10, 11, 12):
        stream[step] = {**stream[step], LENGTH: float("nan"), KL: None, ENTROPY: float("inf")}
    del stream[13][SCORE]
    assert fired(run(stream)) == []


# -- each alarm on its pattern, once -----------------------------------------------------------------------------
# A figure that steps from a to b at step 11 has a 5-step median of a up to step 12 and of b from step 13 (three of
# the five steps are b).

def test_length_collapse_fires_once_below_the_fraction():
    """7.9 tokens for 10 steps, then 1.5: the median is 1.5 at step 13, 18% of the first step's 7.9 (below 60%):
    fires at step 13, and never again though the length stays collapsed."""
    stream = [with_(step, length=7.9 if step <= 10 else 1.5) for step in range(1, 41)]
    watch = run(stream)
    assert fired(watch) == [("length_collapse", 13)]
    assert watch.fired[0].detail == ("mean response length 1.5 tokens (median of the last 5 steps), 18% of the "
                                     "starting policy's 7.9")


def test_length_collapse_sees_a_slow_slide():
    """7.9 tokens, then 0.2 fewer each step from step 11: length(10 + k) = 7.9 - 0.2k, whose median at step
    10 + k is the middle value 7.9 - 0.2 (k - 2); below 0.6 x 7.9 = 4.74 when 0.2 (k - 2) > 3.16, k = 18: step 28."""
    stream = [with_(step, length=7.9 if step <= 10 else 7.9 - 0.2 * (step - 10)) for step in range(1, 41)]
    assert fired(run(stream)) == [("length_collapse", 28)]


def test_length_explosion_fires_above_the_multiple():
    """8 tokens, then 20 from step 11: median 20 at step 13, 2.5x the first step's 8 (above 1.5x)."""
    stream = [with_(step, length=8.0 if step <= 10 else 20.0) for step in range(1, 41)]
    watch = run(stream)
    assert fired(watch) == [("length_explosion", 13)]
    assert "20.0 tokens" in watch.fired[0].detail and "2.50x the starting policy's 8.0" in watch.fired[0].detail


def test_kl_high_fires_above_kl_max():
    """KL 3.5 nats, then 50 from step 21: the median is 50 at step 23, above kl_max 30; it is also more than twice
    step 13's 3.5, so kl_growth fires at the same step."""
    stream = [with_(step, kl=3.5 if step <= 20 else 50.0) for step in range(1, 41)]
    watch = run(stream)
    assert fired(watch) == [("kl_high", 23), ("kl_growth", 23)]
    assert watch.fired[0].detail == "KL to the reference 50.0 nats (median of the last 5 steps), above kl_max 30"


def test_kl_growth_fires_on_a_kl_that_keeps_climbing():
    """Settled at 3 nats to step 20, then up 0.5 a step: KL(20 + k) = 3 + 0.5k, whose median at step 20 + k
    (k >= 2) is the middle value 3 + 0.5 (k - 2). Against the median 10 steps before (3 up to step 22), it first
    exceeds both 2 x 3 = 6 and the 5-nat floor at k = 9 (6.5): fires at step 29."""
    stream = [with_(step, kl=3.0 if step <= 20 else 3.0 + 0.5 * (step - 20)) for step in range(1, 61)]
    watch = run(stream, AlarmConfig(kl_max=None))
    assert fired(watch) == [("kl_growth", 29)]
    assert watch.fired[0].detail == ("KL to the reference 6.5 nats (median of the last 5 steps), up from 3.0 at "
                                     "step 19: more than 2x in 10 steps")


def test_kl_growth_ignores_a_rise_that_settles_and_small_kls():
    """KL = 8 (1 - exp(-s / 8)) rises fast and settles near 8 nats: its median at step 20 (about 7.1) is only 1.4x
    step 10's (about 5.0), and it grows less after. From 1 to 3 nats stays under the 5-nat floor."""
    settling = [with_(step, kl=8 * (1 - math.exp(-step / 8))) for step in range(1, 61)]
    assert fired(run(settling)) == []
    small = [with_(step, kl=1.0 if step <= 20 else 3.0) for step in range(1, 61)]
    assert fired(run(small)) == []


def test_kl_growth_counts_from_the_end_of_the_warm_up():
    """KL = 0.3 s never settles. Its median at step s is 0.3 (s - 2); the earlier figure is taken no sooner than
    step 10 (kl_growth_steps), so the first comparison is at step 20: 5.4 against step 10's 2.4, 2.25x: fires."""
    rising = [with_(step, kl=0.3 * step) for step in range(1, 61)]
    assert fired(run(rising, AlarmConfig(kl_max=None))) == [("kl_growth", 20)]


def test_value_loss_explosion_fires_while_the_score_rises():
    """Value loss 0.05 to step 20, then 1.0: the median is 1.0 at step 23, 20x its lowest 0.05 (above 5x), while
    the score (0.05 s) rose from step 18's median 0.05 x 16 = 0.80 to 0.05 x 21 = 1.05."""
    stream = [with_(step, value_loss=0.05 if step <= 20 else 1.0, score=0.05 * step) for step in range(1, 41)]
    watch = run(stream)
    assert fired(watch) == [("value_loss_explosion", 23)]
    assert watch.fired[0].detail == ("value loss 1 (median of the last 5 steps), 20.0x its lowest 0.05, while the "
                                     "score rose from 0.80 to 1.05")


def test_value_loss_explosion_needs_more_than_a_plateaus_noise():
    """A long run's value loss falls a hundredfold (0.2 to 0.002) and then spikes for a few steps while the score
    has plateaued (chores, 4,096 episodes, 2026-11-30): 0.05 over the window is noise, 0.1 a rise."""
    for rise, fires in ((0.01, False), (0.02, True)):  # per step: 0.05 and 0.10 over the 5-step window
        stream = [with_(step, value_loss=0.002 if step <= 30 else 0.5, score=1.5 + rise * step)
                  for step in range(1, 41)]
        assert fired(run(stream)) == ([("value_loss_explosion", 33)] if fires else []), rise


def test_value_loss_explosion_needs_a_rising_score_and_a_value_loss():
    falling = [with_(step, value_loss=0.05 if step <= 20 else 1.0, score=2.0 - 0.05 * step) for step in range(1, 41)]
    assert fired(run(falling)) == []
    critic_free = [{k: v for k, v in with_(step, score=0.05 * step).items() if k != VALUE_LOSS}
                   for step in range(1, 41)]
    assert fired(run(critic_free)) == []


def test_entropy_collapse_fires_below_the_fraction_of_the_start():
    """1.35 nats per token, then 0.1 from step 11: median 0.1 at step 13, 7% of the first step's 1.35."""
    stream = [with_(step, entropy=1.35 if step <= 10 else 0.1) for step in range(1, 41)]
    watch = run(stream)
    assert fired(watch) == [("entropy_collapse", 13)]
    assert watch.fired[0].detail == ("policy entropy 0.10 nats per token (median of the last 5 steps), 7% of the "
                                     "starting policy's 1.35")


def test_several_kinds_each_fire_once_and_are_summarised():
    stream = [with_(step, length=7.9 if step <= 10 else 1.5, entropy=1.35 if step <= 20 else 0.1)
              for step in range(1, 41)]
    watch = run(stream)
    assert fired(watch) == [("length_collapse", 13), ("entropy_collapse", 23)]
    assert watch.summary() == {"alarms/fired": "length_collapse@13, entropy_collapse@23",
                               "alarms/length_collapse_step": 13, "alarms/entropy_collapse_step": 23}


def test_a_null_threshold_turns_its_alarm_off():
    stream = [with_(step, length=7.9 if step <= 10 else 1.5) for step in range(1, 41)]
    assert fired(run(stream, AlarmConfig(length_collapse=None))) == []


def test_a_longer_window_needs_a_longer_pattern():
    """Window 10: the median of 10 steps is the mean of the 5th and 6th values; with k steps of 1.5 after 7.9s it is
    (7.9 + 1.5) / 2 = 4.7 at k = 5 (below 4.74): fires at step 15, not 13."""
    stream = [with_(step, length=7.9 if step <= 10 else 1.5) for step in range(1, 41)]
    assert fired(run(stream, AlarmConfig(window=10))) == [("length_collapse", 15)]


# -- a resumed run -------------------------------------------------------------------------------------------------

def test_replay_keeps_baselines_and_does_not_repeat_fired_alarms():
    stream = [with_(step, length=7.9 if step <= 10 else 1.5) for step in range(1, 41)]
    rows = [{"step": step, **metrics} for step, metrics in enumerate(stream, start=1)]
    watch = AlarmWatch(AlarmConfig())
    watch.replay(rows + [{"step": 99, LENGTH: 100.0}], until=20)  # lines past the checkpoint are not replayed
    assert fired(watch) == [("length_collapse", 13)]
    assert all(watch.observe(metrics, step=step) == [] for step, metrics in enumerate(stream[20:], start=21))
    # The baseline is still the first step's 7.9: 12 tokens from step 21 is 1.52x, an explosion at step 23.
    resumed = AlarmWatch(AlarmConfig())
    resumed.replay(rows[:20], until=20)
    new = [alarm for step in range(21, 31) for alarm in resumed.observe(with_(step, length=12.0), step=step)]
    assert [(alarm.kind, alarm.step) for alarm in new] == [("length_explosion", 23)]


def test_a_saved_watch_resumes_exactly_where_history_would_not():
    """The watch's state through JSON (as the PPO checkpoint keeps it) continues exactly as an uninterrupted
    watch does, noisy steps and all; history.jsonl with logging_steps 3 holds every third step only, and a watch
    replayed from it fires at another step."""
    noise = random.Random(3)
    stream = [{**healthy(step, noise=noise), LENGTH: 7.9 if step <= 12 else 2.0 + noise.random()}
              for step in range(1, 41)]
    straight = run(stream, AlarmConfig())
    first = AlarmWatch(AlarmConfig())
    for step, metrics in enumerate(stream[:14], start=1):
        first.observe(metrics, step=step)
    resumed = AlarmWatch(AlarmConfig())
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for step, metrics in enumerate(stream[14:], start=15):
        resumed.observe(metrics, step=step)
    assert fired(resumed) == fired(straight) and fired(straight)  # something fired, at the same step
    replayed = AlarmWatch(AlarmConfig())
    replayed.replay([{"step": step, **m} for step, m in enumerate(stream, start=1) if step % 3 == 0], until=14)
    for step, metrics in enumerate(stream[14:], start=15):
        replayed.observe(metrics, step=step)
    assert fired(replayed) != fired(straight)


# -- the config ------------------------------------------------------------------------------------------------------

def test_every_kind_is_named_and_documented():
    text = (Path(__file__).resolve().parent.parent / "docs" / "alarms.md").read_text(encoding="utf-8")
    assert all(f"`{kind}`" in text for kind in KINDS)
    fields = [f.name for f in dataclasses.fields(AlarmConfig)]
    assert all(f"`{name}`" in text for name in fields), [n for n in fields if f"`{n}`" not in text]


@pytest.mark.parametrize("override, message", [
    ("ppo.alarms.window=0", r"'ppo.alarms.window' must be at least 1"),
    ("ppo.alarms.length_collapse=1.5", r"'ppo.alarms.length_collapse' must be a fraction in \(0, 1\)"),
    ("ppo.alarms.kl_growth=0.5", r"'ppo.alarms.kl_growth' must be a multiple above 1"),
    ("ppo.alarms.kl_max=0", r"'ppo.alarms.kl_max' must be > 0"),
    ("ppo.alarms.loudness=3", r"unknown key 'ppo.alarms.loudness'"),
])
def test_bad_thresholds_are_refused_with_their_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline(TINY, [override])


def test_thresholds_are_set_from_the_pipeline_file():
    pipeline, _ = load_pipeline(TINY, ["ppo.alarms.kl_max=null", "ppo.alarms.window=3"])
    assert pipeline.ppo.alarms.kl_max is None and pipeline.ppo.alarms.window == 3
    assert load_pipeline(TINY)[0].ppo.alarms == AlarmConfig()


# -- in the trainer ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_ppo_run_prints_logs_and_lists_its_alarms(trained_parents, capsys):
    """kl_coef 0 at 30x the tiny learning rate drifts several nats from the reference in a step or two; with
    kl_max 0.5 over 2-step medians the KL alarm fires. A run with the defaults lists none."""
    from rlhf.pipeline import history
    from rlhf.pipeline.registry import Registry
    from rlhf.stages import ppo

    def run_ppo(name: str, *extra: str):
        settings = [f"name={name}", f"ppo.sft_parent={trained_parents['sft']}",
                    f"ppo.rm_parent={trained_parents['rm']}", "ppo.episodes=128", "ppo.rollout_batch_size=32",
                    "ppo.mini_batch_size=16", "ppo.micro_batch_size=16", "ppo.max_eval_prompts=16", *extra]
        pipeline, path = load_pipeline(TINY, settings)
        return ppo.run(pipeline, registry=Registry(trained_parents["home"]), where=str(path))

    entry = run_ppo("alarms-fire", "ppo.kl_coef=0", "ppo.learning_rate=1e-2", "ppo.alarms.window=2",
                    "ppo.alarms.kl_max=0.5")
    out = capsys.readouterr().out
    step = entry.metrics["alarms/kl_high_step"]
    assert f"ppo step {step}: alarm kl_high: KL to the reference" in out, out
    [listed] = [line for line in out.splitlines() if line.startswith("ppo: alarms fired: ")]
    assert f"kl_high at step {step}" in listed, listed  # the run also drifts in length: other alarms may come first
    assert f"kl_high@{step}" in entry.metrics["alarms/fired"]
    assert next(row for row in history.read(entry.path) if row["step"] == step)["alarm/kl_high"] == 1

    quiet = run_ppo("alarms-quiet")
    assert quiet.metrics["alarms/fired"] == "none"
    assert "ppo: alarms: none fired" in capsys.readouterr().out
