"""Stage metrics side by side, one row per pipeline run, from the registry alone (no wandb needed).

    rlhf compare [--pipeline tiny] [--stage ppo] [--last 5] [--perf] [--json | --csv]      (make compare)

A pipeline run is the entries that share a run tag (see run_tags.py), one row per round (lineage.py).
A run that reused a stage made earlier (`make ppo` alone reuses the SFT and RM entries; round 2 reuses
the SFT policy) shows that stage's metrics through the lineage, marked as reused.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field

from rlhf.pipeline.order import TRAINED
from rlhf.pipeline.registry import Entry
from rlhf.pipeline.run_tags import tag_of

KEY_METRICS: dict[str, tuple[str, ...]] = {
    "sft": ("eval/loss", "eval/base_loss"),
    "collect": ("collect/pairs", "collect/policy_gold"),
    "rm": ("eval/accuracy", "eval/previous_rm_accuracy", "eval/margin"),
    "ppo": ("eval/score", "eval/kl", "eval/gold", "eval/sft_gold", "eval/gold_gain"),
    # PPO's final evaluation (the same held-out prompts, reward model and gold task), then DPO's own pair accuracy
    "dpo": ("eval/score", "eval/kl", "eval/gold", "eval/sft_gold", "eval/gold_gain", "eval/reward_accuracy"),
}
# `--perf`: how fast each stage ran and how much memory it took (MFU on a GPU only).
PERF_METRICS: dict[str, tuple[str, ...]] = {
    "sft": ("train/tokens_per_s", "train/mfu", "train/peak_memory_mb"),
    "collect": (),
    "rm": ("train/tokens_per_s", "train/mfu", "train/peak_memory_mb"),
    "ppo": ("train/episodes_per_s", "train/generate_share", "train/generate_tokens_per_s",
            "train/score_tokens_per_s", "train/update_tokens_per_s", "train/update_mfu", "train/peak_memory_mb"),
    "dpo": ("train/seconds", "train/tokens_per_s", "train/mfu", "train/peak_memory_mb"),
}
VIEWS = {"learning": KEY_METRICS, "perf": PERF_METRICS}


@dataclass
class StageResult:
    id: str
    reused: bool  # made by an earlier run and reached through the lineage
    metrics: dict  # the KEY_METRICS of its stage that the entry has


@dataclass
class PipelineRun:
    pipeline: str
    run: str  # the run tag
    round: int
    started: str  # created_at of its first entry
    stages: dict[str, StageResult] = field(default_factory=dict)


def pipeline_runs(entries: list[Entry], *, pipeline: str | None = None, stage: str | None = None,
                  last: int | None = None, view: str = "learning") -> list[PipelineRun]:
    """Complete entries grouped by (pipeline, run tag), oldest run first, with the filters applied:
    `stage` keeps runs that trained that stage themselves, `last` the newest N runs; each stage's metrics of
    `view` (VIEWS)."""
    wanted = VIEWS[view]
    by_id = {e.id: e for e in entries}
    done = [e for e in entries if e.status == "complete" and e.stage in TRAINED
            and pipeline in (None, e.pipeline)]
    groups: dict[tuple[str, str, int], list[Entry]] = {}
    for entry in sorted(done, key=lambda e: (e.created_at, e.id)):
        groups.setdefault((entry.pipeline, tag_of(entry), entry.round), []).append(entry)
    found = []
    for (name, tag, number), members in groups.items():
        run = PipelineRun(pipeline=name, run=tag, round=number, started=members[0].created_at)
        for entry in members:  # the newest complete entry of each stage wins
            run.stages[entry.stage] = _result(entry, reused=False, wanted=wanted)
        _fill_from_lineage(run, by_id, wanted=wanted)
        found.append(run)
    found.sort(key=lambda r: (r.started, r.run, r.round))
    if stage is not None:
        found = [r for r in found if stage in r.stages and not r.stages[stage].reused]
    return found[-last:] if last else found


def _fill_from_lineage(run: PipelineRun, by_id: dict[str, Entry], *, wanted: dict[str, tuple[str, ...]]) -> None:
    """Stages this run did not train itself: the nearest ancestors of that stage among the lineage of the
    stages it did (PPO -> SFT and RM; round 3's PPO -> round 2's -> round 1's -> SFT)."""
    queue = [result.id for stage in reversed(TRAINED) if (result := run.stages.get(stage))]
    seen = set(queue)
    while queue:
        entry = by_id.get(queue.pop(0))
        for parent_id in entry.parents if entry else []:
            parent = by_id.get(parent_id)
            if parent is None or parent_id in seen:
                continue
            seen.add(parent_id)
            if parent.stage in TRAINED and parent.stage not in run.stages and parent.status == "complete":
                run.stages[parent.stage] = _result(parent, reused=True, wanted=wanted)
            queue.append(parent_id)


def _result(entry: Entry, *, reused: bool, wanted: dict[str, tuple[str, ...]]) -> StageResult:
    metrics = {k: entry.metrics[k] for k in wanted[entry.stage] if entry.metrics.get(k) is not None}
    return StageResult(id=entry.id, reused=reused, metrics=metrics)


def label(stage: str, metric: str) -> str:
    """Column name: the stage, then the metric (`rm eval/accuracy`; `collect/pairs` says its stage)."""
    return metric if metric.startswith(stage + "/") else f"{stage} {metric}"


def columns(stages: tuple[str, ...] = TRAINED, *, view: str = "learning") -> list[str]:
    return [label(stage, metric) for stage in stages for metric in VIEWS[view][stage]]


def flat_rows(runs: list[PipelineRun], *, stages: tuple[str, ...] = TRAINED, view: str = "learning") -> list[dict]:
    """One flat dict per run (for CSV): pipeline, run, each stage's id and key metrics."""
    rows = []
    for run in runs:
        row: dict = {"pipeline": run.pipeline, "run": run.run, "round": run.round, "started": run.started}
        for stage in stages:
            result = run.stages.get(stage)
            row[f"{stage} id"] = result.id if result else None
            row[f"{stage} reused"] = result.reused if result else None
            for metric in VIEWS[view][stage]:
                row[label(stage, metric)] = result.metrics.get(metric) if result else None
        rows.append(row)
    return rows


def to_json(runs: list[PipelineRun]) -> str:
    return json.dumps([asdict(r) for r in runs], indent=2)


def to_csv(runs: list[PipelineRun], *, stages: tuple[str, ...] = TRAINED, view: str = "learning") -> str:
    rows = flat_rows(runs, stages=stages, view=view)
    out = io.StringIO()
    fields = ["pipeline", "run", "round", "started", *[f"{s} {k}" for s in stages for k in ("id", "reused")],
              *columns(stages, view=view)]
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def to_table(runs: list[PipelineRun], *, stages: tuple[str, ...] = TRAINED, view: str = "learning") -> str:
    """A plain-text table; a value followed by * comes from a stage the run reused. Columns that no row
    has a value for are left out (round 1 has no collect step)."""
    if not runs:
        return "(no complete stage entries)"
    shown = [(stage, metric) for stage in stages for metric in VIEWS[view][stage]
             if any(r.stages.get(stage) and metric in r.stages[stage].metrics for r in runs)]
    header = ["pipeline", "run", "round", *[label(stage, metric) for stage, metric in shown]]
    body = []
    for run in runs:
        cells = [run.pipeline, run.run, str(run.round)]
        for stage, metric in shown:
            result = run.stages.get(stage)
            value = result.metrics.get(metric) if result else None
            cells.append("-" if value is None else _number(value) + ("*" if result.reused else ""))
        body.append(cells)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *body]]
    if any(r.stages.get(s) and r.stages[s].reused for r in runs for s in stages):
        lines.append("* made earlier (by an earlier run or round) and reused here")
    return "\n".join(lines)


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
