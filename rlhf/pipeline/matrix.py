"""The task matrix's figures: one row per (task, variant, seed) run, medians over seeds, verdicts against the
targets of issue 18, and the table `make tasks` prints. Pure: the runs themselves are rlhf/stages/matrix.py's.

Targets, each on the median over seeds: the reward model's held-out accuracy >= 0.85; PPO closes at least a third
of the gap between the SFT policy's gold score and the best gold score the task allows (scale-free:
(gold - sft gold) / (best - sft gold)); and responses do not collapse (mean length at least half the SFT policy's).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Targets:
    rm_accuracy: float = 0.85
    gap_closed: float = 1 / 3
    length_ratio: float = 0.5  # response length / the SFT policy's, at least


@dataclass(frozen=True)
class RunFigures:
    """One pipeline run (SFT, RM, PPO) of one task, variant and seed: the registry entries' metrics."""

    task: str
    variant: str  # "default", "lora", ...
    seed: int
    rm_accuracy: float  # held-out, after training
    rm_start_accuracy: float | None  # held-out, of the starting model
    gold: float  # PPO policy's mean gold score on the held-out prompts
    sft_gold: float  # the SFT policy's, on the same prompts and random stream
    best: float  # mean over the same prompts of the best gold score each allows
    length: float  # mean response length (tokens), PPO policy
    sft_length: float
    kl: float  # summed KL to the SFT policy, nats

    @property
    def gap_closed(self) -> float:
        """Share of the SFT policy's distance to the best gold score that PPO covered (negative: it lost ground)."""
        gap = self.best - self.sft_gold
        return (self.gold - self.sft_gold) / gap if gap > 1e-9 else float("nan")

    @property
    def length_ratio(self) -> float:
        return self.length / self.sft_length if self.sft_length > 0 else float("nan")


@dataclass(frozen=True)
class Summary:
    """One task and variant over its seeds: medians and whether they meet the targets."""

    task: str
    variant: str
    seeds: tuple[int, ...]
    rm_accuracy: float
    sft_gold: float
    gold: float
    best: float
    gap_closed: float
    length_ratio: float
    kl: float
    meets: bool
    misses: tuple[str, ...]  # which targets it misses, in words


def finite_median(values) -> float | None:
    """The median of the values that are numbers and not NaN (statistics.median mis-sorts NaN); None if none are."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(kept) if kept else None


def summarise(runs: list[RunFigures], targets: Targets = Targets()) -> list[Summary]:
    """Medians over the seeds of each (task, variant), in the order they first appear."""
    groups: dict[tuple[str, str], list[RunFigures]] = {}
    for run in runs:
        groups.setdefault((run.task, run.variant), []).append(run)
    out = []
    for (task, variant), group in groups.items():
        def median(values: list[float]) -> float:  # NaN (no gap to close) left out; statistics.median mis-sorts it
            found = finite_median(values)
            return math.nan if found is None else found

        accuracy = median([r.rm_accuracy for r in group])
        gap = median([r.gap_closed for r in group])
        ratio = median([r.length_ratio for r in group])
        misses = []
        if not accuracy >= targets.rm_accuracy:
            misses.append(f"rm accuracy {accuracy:.3f} < {targets.rm_accuracy:.2f}")
        if not gap >= targets.gap_closed:
            misses.append(f"gap closed {gap:.2f} < {targets.gap_closed:.2f}")
        if not ratio >= targets.length_ratio:
            misses.append(f"length {ratio:.2f}x the SFT policy's < {targets.length_ratio:.2f}x")
        out.append(Summary(task=task, variant=variant, seeds=tuple(r.seed for r in group), rm_accuracy=accuracy,
                           sft_gold=median([r.sft_gold for r in group]), gold=median([r.gold for r in group]),
                           best=median([r.best for r in group]), gap_closed=gap, length_ratio=ratio,
                           kl=median([r.kl for r in group]), meets=not misses, misses=tuple(misses)))
    return out


def table(summaries: list[Summary], targets: Targets = Targets()) -> str:
    """A Markdown table of the summaries, then the one line for scripts."""
    lines = ["| task | variant | seeds | RM accuracy | SFT gold | PPO gold | best | gap closed | length vs SFT | KL | "
             "meets targets |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in summaries:
        verdict = "yes" if s.meets else "no: " + "; ".join(s.misses)
        lines.append(f"| {s.task} | {s.variant} | {','.join(map(str, s.seeds))} | {s.rm_accuracy:.3f} | "
                     f"{s.sft_gold:.2f} | {s.gold:.2f} | {s.best:.2f} | {s.gap_closed:.2f} | {s.length_ratio:.2f}x | "
                     f"{s.kl:.1f} | {verdict} |")
    return "\n".join(lines) + "\n\n" + final_line(summaries, targets)


def final_line(summaries: list[Summary], targets: Targets = Targets()) -> str:
    met = sum(s.meets for s in summaries)
    return (f"tasks: {met} of {len(summaries)} meet the targets (rm accuracy >= {targets.rm_accuracy:g}, "
            f"gold gap closed >= 1/{round(1 / targets.gap_closed)})")
