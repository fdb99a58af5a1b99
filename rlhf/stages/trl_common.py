"""What the SFT and reward-model stages share around a TRL trainer: its arguments from our config,
the wandb run, and the evaluate-resume-train-evaluate sequence."""

from __future__ import annotations

import os
from dataclasses import dataclass
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from transformers import Trainer, TrainerCallback

from rlhf import dist, history, runs, tracking
from rlhf.config import DataSource, Pipeline, TrainStage
from rlhf.models import resolve_precision
from rlhf.data import Records, load_records, split_train_eval
from rlhf.registry import Registry, hash_config
from rlhf.schema import as_plain
from rlhf.stages.runner import Attempt, last_checkpoint


# Fields that change how a run is observed, not what it learns: left out of the config hash.
OPERATIONAL_FIELDS = ("logging_steps", "save_steps", "eval_steps", "eval_batch_size", "parent", "sft_parent",
                      "rm_parent", "sample_steps")


def stage_config(pipeline: Pipeline, *, stage: str, round: int = 1) -> dict:
    """The resolved config that identifies a run of `stage` (hashed for the up-to-date check); from round 2
    on, with the round and the rounds section."""
    section = as_plain(getattr(pipeline, stage))
    for name in OPERATIONAL_FIELDS:
        section.pop(name, None)
    config = {"model": pipeline.model, "seed": pipeline.seed, stage: section}
    if round > 1:
        rounds = {k: v for k, v in as_plain(pipeline.rounds).items() if k != "labels"}
        config.update(round=round, rounds=rounds)
    return config


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


def training_args(pipeline: Pipeline, cfg: TrainStage, attempt: Attempt, *, stage: str) -> dict:
    """Keyword arguments shared by SFTConfig and RewardConfig (both TrainingArguments)."""
    bf16, fp16 = resolve_precision(cfg.precision)
    # The pipeline's precision decides: under `accelerate launch` the trainer would otherwise take the accelerate
    # config's `mixed_precision` (bf16 in the shipped files) whenever bf16 and fp16 are both off.
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if bf16 else "fp16" if fp16 else "no"
    return dict(
        output_dir=str(attempt.checkpoints), run_name=f"{pipeline.name}-{stage}-{attempt.entry.id}",
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        activation_checkpointing=cfg.gradient_checkpointing, bf16=bf16, fp16=fp16,
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=1,
        eval_strategy="steps" if cfg.eval_steps else "no", eval_steps=cfg.eval_steps,
        seed=pipeline.seed, data_seed=pipeline.seed, report_to=tracking.report_to(),
        dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(), disable_tqdm=True,
    )


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
    run_id = tracking.start_run(project=pipeline.wandb_project, group=runs.group(pipeline.name, runs.tag_of(entry)),
                                job_type=stage, name=f"{pipeline.name}-{stage}-{entry.id}",
                                config={**entry.config, "parents": entry.parents, "run": runs.tag_of(entry)},
                                folder=wandb_dir,
                                resume_id=entry.info.get("wandb_run_id") if attempt.resumed else None)
    if run_id:
        registry.update(entry.id, info={**entry.info, "wandb_run_id": run_id, "wandb_dir": str(wandb_dir)})


@dataclass
class FitResult:
    before: dict  # eval metrics of the starting model, measured once and kept across resumes
    after: dict  # eval metrics of the trained model
    train_loss: float
    global_step: int
    train_runtime: float | None


def fit(trainer: Trainer, attempt: Attempt, registry: Registry, *, stage: str) -> FitResult:
    """Evaluate the starting model (first attempt only), train (resuming from the last complete
    checkpoint of a killed attempt), and evaluate again."""
    print(f"{stage}: device {trainer.args.device}, precision "
          f"{'bf16' if trainer.args.bf16 else 'fp16' if trainer.args.fp16 else 'fp32'}, "
          f"{dist.world_size()} process(es)")
    trainer.add_callback(history.HistoryCallback(attempt.folder))  # history.jsonl beside the checkpoint
    resume = last_checkpoint(attempt.checkpoints) if attempt.resumed else None
    if dist.is_main():  # steps a killed attempt logged after its last checkpoint are logged again
        history.truncate_after(attempt.folder, step=int(resume.name.split("-")[-1]) if resume else 0)
    before = attempt.entry.info.get("before")
    start = None
    if before is None:
        # The trainer evaluates the starting model itself once it has prepared it (`eval_on_start`): called
        # before `train`, `evaluate` fails under DeepSpeed (ZeRO-2 refuses it; ZeRO-3 leaves an engine without
        # an optimiser) and under FSDP2 (which prepares a model only together with its optimiser).
        start = _StartMetrics(registry, attempt.entry.id)
        trainer.add_callback(start)
        trainer.args.eval_on_start = True
    if resume is not None:
        print(f"{stage}: continuing from {resume.name}")
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if start is not None:
        before = start.metrics
    after = trainer.evaluate()
    return FitResult(before=before, after=after, train_loss=result.training_loss,
                     global_step=result.global_step, train_runtime=result.metrics.get("train_runtime"))


class _StartMetrics(TrainerCallback):
    """The evaluation of the starting model (the trainer's `eval_on_start`, at step 0), recorded in the registry
    entry as soon as it is made, so that an attempt resumed later does not measure it again."""

    def __init__(self, registry: Registry, entry_id: str):
        self.registry, self.entry_id = registry, entry_id
        self.metrics: dict | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.metrics is not None or state.global_step != 0:
            return
        self.metrics = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
        if dist.is_main():
            self.registry.update(self.entry_id, info={**self.registry.get(self.entry_id).info, "before": self.metrics})
