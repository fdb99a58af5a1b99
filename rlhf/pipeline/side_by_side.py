"""Stage three side by side: what PPO, GRPO, RLOO, REINFORCE++ and DPO learn from the same SFT policy and reward
model, as medians over seeds, at equal episodes and at equal wall time. Pure: the runs are bench/algorithms.py's.

The figures of a run are its registry entry's final metrics (the same held-out evaluation for every method:
gold score, KL to the SFT policy) and its training loop's seconds, episodes per second and peak memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.pipeline.matrix import finite_median

# The methods, in the order the table lists them, and what each sets on top of the pipeline's ppo section (the
# group of 4 and the KL placement of the TRL 1.16 comparisons, docs/bench-trl.md). DPO is its own stage.
METHODS: dict[str, tuple[str, ...]] = {
    "ppo": (),
    "grpo": ("ppo.algorithm=grpo", "ppo.samples_per_prompt=4", "ppo.kl_penalty=loss"),
    "rloo": ("ppo.algorithm=rloo", "ppo.samples_per_prompt=4", "ppo.kl_penalty=reward"),
    "reinforce_pp": ("ppo.algorithm=reinforce_pp",),
    "dpo": (),
}
LABELS = {"ppo": "PPO (value model)", "grpo": "GRPO (group of 4, KL as k3 loss)", "rloo": "RLOO (group of 4)",
          "reinforce_pp": "REINFORCE++", "dpo": "DPO (offline, one pass over the RM's pairs)"}
ONLINE = ("ppo", "grpo", "rloo", "reinforce_pp")  # trained on their own samples: their episodes can be set


@dataclass(frozen=True)
class MethodRun:
    """One method on one seed: its entry's metrics."""

    method: str
    seed: int
    episodes: int | None  # responses trained on (None: DPO, which trains on the fixed pairs)
    gold: float  # held-out gold score of the trained policy
    sft_gold: float  # of the SFT policy, same prompts and sampling seed
    kl: float  # summed KL to the SFT policy on the held-out prompts, nats
    seconds: float  # the training loop (loading and the final evaluation excluded)
    episodes_per_s: float | None
    peak_memory_mb: float | None  # the training process's peak (resident set on a CPU)

    @property
    def gold_gain(self) -> float:
        return self.gold - self.sft_gold


@dataclass(frozen=True)
class MethodSummary:
    method: str
    seeds: tuple[int, ...]
    episodes: int | None
    sft_gold: float
    gold: float
    gold_gain: float
    kl: float
    seconds: float
    episodes_per_s: float | None
    peak_memory_mb: float | None


def summarise(runs: list[MethodRun]) -> list[MethodSummary]:
    """Medians over the seeds of each method (and episode count), in METHODS order."""
    groups: dict[tuple[str, int | None], list[MethodRun]] = {}
    for run in runs:
        if run.method not in METHODS:
            raise ValueError(f"unknown method {run.method!r} (known: {', '.join(METHODS)})")
        groups.setdefault((run.method, run.episodes), []).append(run)
    order = list(METHODS)
    out = []
    for (method, episodes), group in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1] or 0)):
        out.append(MethodSummary(
            method=method, seeds=tuple(r.seed for r in group), episodes=episodes,
            sft_gold=finite_median([r.sft_gold for r in group]), gold=finite_median([r.gold for r in group]),
            gold_gain=finite_median([r.gold_gain for r in group]), kl=finite_median([r.kl for r in group]),
            seconds=finite_median([r.seconds for r in group]),
            episodes_per_s=finite_median([r.episodes_per_s for r in group]),
            peak_memory_mb=finite_median([r.peak_memory_mb for r in group])))
    return out


def equal_time_episodes(seconds: float, episodes_per_s: float, *, multiple: int, at_least: int) -> int:
    """The episodes a method running at `episodes_per_s` trains in `seconds`, rounded to the nearest `multiple`
    (a step's episodes), and at least `at_least`."""
    if seconds <= 0 or episodes_per_s <= 0 or multiple <= 0:
        raise ValueError(f"equal time needs positive seconds, rate and step (got {seconds}, {episodes_per_s}, "
                         f"{multiple})")
    return max(at_least, multiple * round(seconds * episodes_per_s / multiple))


def table(summaries: list[MethodSummary]) -> str:
    """A Markdown table: one row per method (and episode count)."""
    def fmt(value: float | None, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    lines = ["| method | seeds | episodes | SFT gold | gold | gold gain | KL to SFT | training s | episodes/s | "
             "peak MB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in summaries:
        lines.append(f"| {LABELS[s.method]} | {','.join(map(str, s.seeds))} | "
                     f"{'pairs' if s.episodes is None else s.episodes} | {s.sft_gold:.2f} | {s.gold:.2f} | "
                     f"{s.gold_gain:.2f} | {s.kl:.2f} | {s.seconds:.1f} | {fmt(s.episodes_per_s, '.0f')} | "
                     f"{fmt(s.peak_memory_mb, '.0f')} |")
    return "\n".join(lines)
