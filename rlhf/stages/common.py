"""What every stage shares around its training: the data split and the wandb run (the config that identifies a run:
rlhf/pipeline/stage_config.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rlhf.pipeline import run_tags, tracking
from rlhf.pipeline.config import DataSource, Pipeline
from rlhf.pipeline.data import Records, load_records, split_train_eval
from rlhf.pipeline.registry import Registry, hash_config
from rlhf.stages.runner import Attempt
from rlhf.training import dist


@dataclass
class Split:
    train: list[dict]  # normalised rows (prompt/completion for SFT, prompt/chosen/rejected for RM, prompt for PPO)
    eval: list[dict]
    fingerprint: str  # of the training and eval data


def load_split(dataset: DataSource, eval_dataset: DataSource | None, *, eval_fraction: float, seed: int,
               rows_of: Callable[[Records], list[dict]], max_train_samples: int | None = None) -> Split:
    """Load `dataset` (and `eval_dataset`), normalise rows with `rows_of`, hold out an eval split."""
    records = load_records(dataset)
    rows = rows_of(records)
    fingerprint = records.fingerprint
    eval_rows = None
    if eval_dataset is not None:
        eval_records = load_records(eval_dataset)
        eval_rows = rows_of(eval_records)
        fingerprint = hash_config({"train": fingerprint, "eval": eval_records.fingerprint})
    train, held_out = split_train_eval(rows, eval_rows=eval_rows, eval_fraction=eval_fraction, seed=seed,
                                       origin=records.origin)
    if max_train_samples is not None:
        train = train[:max_train_samples]
    return Split(train=train, eval=held_out, fingerprint=fingerprint)


@contextmanager
def tracked(pipeline: Pipeline, attempt: Attempt, registry: Registry, *, stage: str) -> Iterator[None]:
    """This stage's wandb run around the block: finished as failed if the block raises."""
    _start_tracking(pipeline, attempt, registry, stage=stage)
    try:
        yield
    except BaseException:
        tracking.finish(failed=True)
        raise
    if dist.is_main():
        entry = attempt.entry
        tracking.log_lineage(_checkpoint(entry), inputs=[_checkpoint(registry.get(p)) for p in entry.parents])
    tracking.finish(failed=False)


def _checkpoint(entry) -> tracking.Checkpoint:
    return tracking.Checkpoint(id=entry.id, stage=entry.stage, pipeline=entry.pipeline, path=entry.path)


def _start_tracking(pipeline: Pipeline, attempt: Attempt, registry: Registry, *, stage: str) -> None:
    """Open this stage's wandb run (main process), continuing the killed attempt's run when resuming,
    and record its id in the registry entry."""
    if not dist.is_main():
        return
    entry = registry.get(attempt.entry.id)
    wandb_dir = attempt.folder.parent / "wandb"
    tag = run_tags.tag_of(entry)
    run_id = tracking.start_run(project=pipeline.wandb_project, group=run_tags.group(pipeline.name, tag),
                                job_type=stage, name=f"{pipeline.name}-{stage}-{entry.id}",
                                config={**entry.config, "parents": entry.parents, "roles": entry.roles, "run": tag},
                                folder=wandb_dir,
                                resume_id=entry.info.get("wandb_run_id") if attempt.resumed else None)
    if run_id:
        registry.update(entry.id, info={**entry.info, "wandb_run_id": run_id, "wandb_dir": str(wandb_dir)})
