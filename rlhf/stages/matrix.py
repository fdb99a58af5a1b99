"""The task matrix: the default pipeline's stages on every gold task, a few seeds each, and one table.

    rlhf tasks [--tasks praise,palette,lists,chores] [--seeds 1,2,3] [--variants default,lora] [--home DIR]
               [key=value ...]                        (make tasks)

Each (task, seed) is a pipeline of its own, `tasks-<task>-s<seed>`, in a registry of its own (--home, default
runs/tasks): pipelines/tiny.yaml with the task's data, its gold reward and the seed; a variant adds overrides to
the PPO stage only, so the variants of a seed share its SFT policy and reward model. A rerun trains only what is
missing or changed. The task's data is generated once into <home>/data/<task> (praise uses the bundled data/tiny).
Prints the table of rlhf/pipeline/matrix.py and ends with its one line for scripts; writes summary.md and
summary.json into --home.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from rlhf.errors import ConfigError
from rlhf.pipeline import matrix
from rlhf.pipeline.config import DataSource, load_pipeline
from rlhf.pipeline.data import load_records, prompt_rows
from rlhf.pipeline.registry import Entry, Registry
from rlhf.stages import ppo, rm, sft
from rlhf.tasks import TASKS
from rlhf.tasks import task as find_task

REPO = Path(__file__).resolve().parents[2]
PIPELINE = REPO / "pipelines" / "tiny.yaml"
BUNDLED = {"praise": REPO / "data" / "tiny"}  # the default task's data ships with the repo
MATRIX_TASKS = ("praise", "palette", "lists", "chores")  # digest is the long-prompt speed task, not a learning one
VARIANTS: dict[str, tuple[str, ...]] = {
    "default": (),
    "lora": ("ppo.mode=lora",),
}
FILES = ("sft.jsonl", "comparisons.jsonl", "prompts.jsonl", "eval_prompts.jsonl")


def task_data(name: str, home: Path) -> Path:
    """The folder of the task's four files, generated (seed 0, the generator's sizes) when missing."""
    if name in BUNDLED:
        return BUNDLED[name]
    folder = home / "data" / name
    if not all((folder / f).is_file() for f in FILES):
        find_task(name, where="rlhf tasks --tasks").generate(folder)
    return folder


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ConfigError(f"rlhf tasks --variants: '{variant}' is not a variant (known: {', '.join(VARIANTS)})")


def overrides(name: str, *, seed: int, data: Path, variant: str, extra: list[str]) -> list[str]:
    check_variant(variant)
    return [f"name=tasks-{name}-s{seed}", f"seed={seed}", f"sft.dataset={data / 'sft.jsonl'}",
            f"rm.dataset={data / 'comparisons.jsonl'}", f"ppo.dataset={data / 'prompts.jsonl'}",
            f"ppo.eval_prompts={data / 'eval_prompts.jsonl'}", f"ppo.gold={name}", *VARIANTS[variant], *extra]


def mean_best(name: str, eval_prompts: DataSource, *, limit: int) -> float:
    """The mean over the prompts PPO evaluates (the file's first `limit`) of the best gold score each allows."""
    rows = prompt_rows(load_records(eval_prompts))[:limit]
    best = TASKS[name].best
    return sum(best(row["prompt"]) for row in rows) / len(rows)


def figures(name: str, variant: str, seed: int, *, reward: Entry, policy: Entry, best: float) -> matrix.RunFigures:
    m, r = policy.metrics, reward.metrics
    missing = [k for k in ("eval/gold", "eval/sft_gold", "eval/length", "eval/sft_length", "eval/kl") if k not in m]
    if missing or "eval/accuracy" not in r:
        raise ConfigError(f"rlhf tasks: {policy.id} or {reward.id} lacks {', '.join(missing) or 'eval/accuracy'}: "
                          f"the matrix needs held-out prompts with a gold task and held-out pairs")
    return matrix.RunFigures(task=name, variant=variant, seed=seed, rm_accuracy=r["eval/accuracy"],
                             rm_start_accuracy=r.get("eval/init_accuracy"), gold=m["eval/gold"],
                             sft_gold=m["eval/sft_gold"], best=best, length=m["eval/length"],
                             sft_length=m["eval/sft_length"], kl=m["eval/kl"])


def finite_or_null(value):
    """`value` with every NaN or infinity replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def run(*, tasks: list[str], seeds: list[int], variants: list[str], home: Path, extra: list[str]) -> list[
        matrix.Summary]:
    for option, values in (("--tasks", tasks), ("--seeds", seeds), ("--variants", variants)):
        if not values or len(set(values)) != len(values):
            raise ConfigError(f"rlhf tasks {option}: give at least one, each once (got {values})")
    for name in tasks:
        find_task(name, where="rlhf tasks --tasks")
    for variant in variants:
        check_variant(variant)
    registry = Registry(home / "registry")
    runs = []
    for name in tasks:
        data = task_data(name, home)
        for seed in seeds:
            for variant in variants:
                pipeline, _ = load_pipeline(PIPELINE, overrides(name, seed=seed, data=data, variant=variant,
                                                                extra=extra))
                where = f"rlhf tasks ({name}, seed {seed}, {variant})"
                print(f"tasks: {name}, seed {seed}, {variant}", flush=True)
                sft.run(pipeline, registry=registry, where=where)
                reward = rm.run(pipeline, registry=registry, where=where)
                policy = ppo.run(pipeline, registry=registry, where=where)
                best = mean_best(name, pipeline.ppo.eval_prompts, limit=pipeline.ppo.max_eval_prompts)
                runs.append(figures(name, variant, seed, reward=reward, policy=policy, best=best))
    summaries = matrix.summarise(runs)
    text = matrix.table(summaries)
    home.mkdir(parents=True, exist_ok=True)
    (home / "summary.md").write_text(text + "\n", encoding="utf-8")
    document = {"runs": [dataclasses.asdict(r) for r in runs], "summaries": [dataclasses.asdict(s) for s in summaries]}
    (home / "summary.json").write_text(json.dumps(finite_or_null(document), indent=1), encoding="utf-8")
    print(text, flush=True)
    return summaries
