"""What the SFT and reward-model stages share around a TRL trainer: its arguments from our config and the
evaluate-resume-train-evaluate sequence."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from rlhf.pipeline import history, tracking
from rlhf.pipeline.checkpoints import last_checkpoint
from rlhf.pipeline.config import Pipeline, TrainStage
from rlhf.pipeline.registry import Registry
from rlhf.stages.runner import Attempt
from rlhf.training import dist
from rlhf.training.models import resolve_precision


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
    trainer.add_callback(HistoryCallback(attempt.folder))  # history.jsonl beside the checkpoint
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


class HistoryCallback(TrainerCallback):
    """Writes every trainer log (training and evaluation) to the entry folder's history, main process only."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            history.append(self.folder, step=state.global_step, metrics=history.wandb_names(logs))
