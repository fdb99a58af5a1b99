"""Reward-hacking alarms: watch each PPO step's metrics (ppo, grpo, rloo, reinforce++) and warn, once per kind,
when the policy looks like it is gaming the reward model or falling apart. Pure: numbers in, alarms out.

    watch = AlarmWatch(AlarmConfig())
    for alarm in watch.observe({"response/length": 1.4, "objective/kl": 3.1, ...}, step=12):
        print(f"ppo step {alarm.step}: alarm {alarm.kind}: {alarm.detail}")
    watch.summary()  # {"alarms/fired": "length_collapse@12", "alarms/length_collapse_step": 12}

Every figure is compared as a rolling median over `window` steps, so one noisy step, however wild, fires nothing;
the baselines are the first step's figures (the starting policy, before its first update). What each alarm means
and what to try: docs/alarms.md. Written by hand: no maintained library watches an RLHF run for these patterns.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from rlhf.errors import ConfigError

# The step metrics watched (rlhf/training/ppo/report.py names them; critic-free runs have no loss/value).
SCORE, KL, ENTROPY, LENGTH, VALUE_LOSS = ("objective/score", "objective/kl", "policy/entropy", "response/length",
                                          "loss/value")
KINDS = ("length_collapse", "length_explosion", "kl_high", "kl_growth", "value_loss_explosion", "entropy_collapse")


@dataclass
class AlarmConfig:
    """Thresholds of the reward-hacking alarms (docs/alarms.md). Set a threshold to null to turn its alarm off."""

    window: int = 5
    """PPO steps in each rolling median (3 or more ignore any one step); no alarm fires before this many are seen"""
    length_collapse: float | None = 0.6
    """fire when the mean response length falls below this fraction of the first step's (the starting policy's)"""
    length_explosion: float | None = 1.5
    """fire when the mean response length rises above this multiple of the first step's"""
    kl_max: float | None = 30.0
    """nats: fire when the sequence KL to the reference (objective/kl) rises above this"""
    kl_growth: float | None = 2.0
    """fire when the KL has grown by more than this factor over the last kl_growth_steps steps"""
    kl_growth_steps: int = 10
    """steps the KL's growth is measured over; also the warm-up: the rise from 0 in the first ones is not counted"""
    kl_growth_min: float = 5.0
    """nats: a KL below this is not a runaway, however fast it grew"""
    value_loss_explosion: float | None = 5.0
    """ppo only: fire when the value loss rises above this multiple of its lowest while the score rises"""
    value_loss_min_rise: float = 0.1
    """how much the score (the normalised reward) must have risen over the last `window` steps to count as rising
    for value_loss_explosion: a plateaued score's noise is not a rise"""
    entropy_collapse: float | None = 0.15
    """fire when the policy's per-token entropy falls below this fraction of the first step's"""

    def validate(self, *, where: str, path: str) -> None:
        for name in ("window", "kl_growth_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}: '{path}.{name}' must be at least 1, got {getattr(self, name)}")
        for name in ("length_collapse", "entropy_collapse"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                raise ConfigError(f"{where}: '{path}.{name}' must be a fraction in (0, 1) or null, got {value}")
        for name in ("length_explosion", "kl_growth", "value_loss_explosion"):
            value = getattr(self, name)
            if value is not None and value <= 1:
                raise ConfigError(f"{where}: '{path}.{name}' must be a multiple above 1 or null, got {value}")
        if self.kl_max is not None and self.kl_max <= 0:
            raise ConfigError(f"{where}: '{path}.kl_max' must be > 0 nats or null, got {self.kl_max}")
        if self.value_loss_min_rise < 0:
            raise ConfigError(f"{where}: '{path}.value_loss_min_rise' must be >= 0, got {self.value_loss_min_rise}")
        if self.kl_growth_min < 0:
            raise ConfigError(f"{where}: '{path}.kl_growth_min' must be >= 0 nats, got {self.kl_growth_min}")


@dataclass(frozen=True)
class Alarm:
    kind: str  # one of KINDS
    step: int  # the PPO step it fired at
    detail: str  # the figures, in words


class _Series:
    """One metric as fed: its first value, its last `window` values, and its recent rolling medians by step."""

    def __init__(self, *, window: int, keep: int):
        self.first: float | None = None
        self.lowest = math.inf  # the lowest rolling median so far
        self.recent: deque[float] = deque(maxlen=window)
        self.medians: deque[tuple[int, float]] = deque(maxlen=keep)  # (step, rolling median), oldest first

    def add(self, value, *, step: int) -> float | None:
        """The rolling median with `value` in, once `window` values are; None until then, or when `value` is
        missing or not finite (it is then skipped)."""
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        if self.first is None:
            self.first = float(value)
        self.recent.append(float(value))
        if len(self.recent) < self.recent.maxlen:
            return None
        median = statistics.median(self.recent)
        self.medians.append((step, median))
        self.lowest = min(self.lowest, median)
        return median

    def state_dict(self) -> dict:
        return {"first": self.first, "lowest": None if math.isinf(self.lowest) else self.lowest,
                "recent": list(self.recent), "medians": [list(pair) for pair in self.medians]}

    def load_state_dict(self, state: dict) -> None:
        self.first = state["first"]
        self.lowest = math.inf if state["lowest"] is None else state["lowest"]
        self.recent.clear()
        self.recent.extend(state["recent"])
        self.medians.clear()
        self.medians.extend((int(step), float(median)) for step, median in state["medians"])

    def median_at(self, step: int) -> tuple[int, float] | None:
        """The newest rolling median kept of a step up to `step`, with its step."""
        earlier = [(s, m) for s, m in self.medians if s <= step]
        return earlier[-1] if earlier else None


class AlarmWatch:
    """Feed it each step's metrics; it returns the alarms that fire for the first time at that step."""

    def __init__(self, config: AlarmConfig):
        self.config = config
        self.fired: list[Alarm] = []
        keep = max(config.window, config.kl_growth_steps) + 1  # medians far enough back for the growth checks
        self._series = {name: _Series(window=config.window, keep=keep)
                        for name in (SCORE, KL, ENTROPY, LENGTH, VALUE_LOSS)}

    def observe(self, metrics: Mapping[str, object], *, step: int) -> list[Alarm]:
        medians = {name: series.add(metrics.get(name), step=step) for name, series in self._series.items()}
        found = [self._length(medians[LENGTH]), self._kl_high(medians[KL]), self._kl_growth(medians[KL], step),
                 self._value_loss(medians[VALUE_LOSS], step), self._entropy(medians[ENTROPY])]
        done = {alarm.kind for alarm in self.fired}
        new = [Alarm(kind=kind, step=step, detail=detail) for kind, detail in filter(None, found) if kind not in done]
        self.fired += new
        return new

    def state_dict(self) -> dict:
        """Everything the watch has seen, as JSON-ready data, for a checkpoint (a resumed run then keeps its
        baselines and windows exactly and does not warn again about what already fired)."""
        return {"fired": [[a.kind, a.step, a.detail] for a in self.fired],
                "series": {name: series.state_dict() for name, series in self._series.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.fired = [Alarm(kind=kind, step=step, detail=detail) for kind, step, detail in state["fired"]]
        for name, series in self._series.items():
            series.load_state_dict(state["series"][name])

    def replay(self, rows: Iterable[Mapping[str, object]], *, until: int) -> None:
        """Feed the logged steps of an interrupted attempt (history.jsonl rows, each with its `step`) up to
        `until`: for a checkpoint written before the watch's state was saved in it. Only logged steps are in
        history.jsonl, so with `logging_steps` above 1 the baselines and windows are approximate."""
        for row in rows:
            if isinstance(row.get("step"), int) and row["step"] <= until:
                self.observe(row, step=row["step"])

    def summary(self) -> dict[str, object]:
        """For the registry entry and the wandb summary: `alarms/fired` lists kind@step (or says none), and
        `alarms/<kind>_step` is the step each fired alarm fired at."""
        fired = ", ".join(f"{alarm.kind}@{alarm.step}" for alarm in self.fired) or "none"
        return {"alarms/fired": fired, **{f"alarms/{alarm.kind}_step": alarm.step for alarm in self.fired}}

    def _length(self, median: float | None) -> tuple[str, str] | None:
        cfg, start = self.config, self._series[LENGTH].first
        if median is None or not start:
            return None
        ratio = median / start
        said = f"mean response length {median:.1f} tokens (median of the last {cfg.window} steps)"
        if cfg.length_collapse is not None and ratio < cfg.length_collapse:
            return "length_collapse", f"{said}, {math.floor(ratio * 100)}% of the starting policy's {start:.1f}"
        if cfg.length_explosion is not None and ratio > cfg.length_explosion:
            return "length_explosion", f"{said}, {ratio:.2f}x the starting policy's {start:.1f}"
        return None

    def _kl_high(self, median: float | None) -> tuple[str, str] | None:
        cfg = self.config
        if median is None or cfg.kl_max is None or median <= cfg.kl_max:
            return None
        return "kl_high", (f"KL to the reference {median:.1f} nats (median of the last {cfg.window} steps), above "
                           f"kl_max {cfg.kl_max:g}")

    def _kl_growth(self, median: float | None, step: int) -> tuple[str, str] | None:
        # The earlier figure is taken no sooner than step kl_growth_steps: every run's KL rises from 0 at first.
        cfg = self.config
        if median is None or cfg.kl_growth is None or median < cfg.kl_growth_min:
            return None
        earlier = self._series[KL].median_at(step - cfg.kl_growth_steps)
        if earlier is None or earlier[0] < cfg.kl_growth_steps or median <= cfg.kl_growth * earlier[1]:
            return None
        return "kl_growth", (f"KL to the reference {median:.1f} nats (median of the last {cfg.window} steps), up "
                             f"from {earlier[1]:.1f} at step {earlier[0]}: more than {cfg.kl_growth:g}x in "
                             f"{step - earlier[0]} steps")

    def _value_loss(self, median: float | None, step: int) -> tuple[str, str] | None:
        # Reward rising while the critic fails: the policy exploits something the value model cannot follow.
        cfg, scores = self.config, self._series[SCORE]
        if median is None or cfg.value_loss_explosion is None or not scores.medians:
            return None
        lowest = self._series[VALUE_LOSS].lowest
        score_now, score_then = scores.medians[-1][1], scores.median_at(step - cfg.window)
        if lowest <= 0 or median <= cfg.value_loss_explosion * lowest or score_then is None:
            return None
        if score_now - score_then[1] < cfg.value_loss_min_rise or score_now <= score_then[1]:
            return None
        return "value_loss_explosion", (f"value loss {median:.3g} (median of the last {cfg.window} steps), "
                                        f"{median / lowest:.1f}x its lowest {lowest:.3g}, while the score rose from "
                                        f"{score_then[1]:.2f} to {score_now:.2f}")

    def _entropy(self, median: float | None) -> tuple[str, str] | None:
        cfg, start = self.config, self._series[ENTROPY].first
        if median is None or cfg.entropy_collapse is None or not start or start <= 0:
            return None
        if median >= cfg.entropy_collapse * start:
            return None
        return "entropy_collapse", (f"policy entropy {median:.2f} nats per token (median of the last {cfg.window} "
                                    f"steps), {math.floor(median / start * 100)}% of the starting policy's "
                                    f"{start:.2f}")
