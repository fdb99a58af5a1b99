"""What the SFT and reward-model stages share around a TRL trainer: its arguments from our config,
the wandb run, and the evaluate-resume-train-evaluate sequence."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Trainer

from rlhf import dist, tracking
from rlhf.config import Pipeline, TrainStage
from rlhf.models import resolve_precision
from rlhf.registry import Registry
from rlhf.stages.runner import Attempt, last_checkpoint


def training_args(pipeline: Pipeline, cfg: TrainStage, attempt: Attempt, *, stage: str) -> dict:
    """Keyword arguments shared by SFTConfig and RewardConfig (both TrainingArguments)."""
    bf16, fp16 = resolve_precision(cfg.precision)
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


def start_tracking(pipeline: Pipeline, attempt: Attempt, registry: Registry, *, stage: str) -> None:
    """Open this stage's wandb run (main process) and record its id in the registry entry."""
    if not dist.is_main():
        return
    wandb_dir = attempt.folder.parent / "wandb"
    run_id = tracking.start_run(project=pipeline.wandb_project, group=pipeline.name, job_type=stage,
                                name=f"{pipeline.name}-{stage}-{attempt.entry.id}",
                                config={**attempt.entry.config, "parents": attempt.entry.parents},
                                folder=wandb_dir)
    if run_id:
        registry.update(attempt.entry.id, info={**attempt.entry.info, "wandb_run_id": run_id,
                                                "wandb_dir": str(wandb_dir)})


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
    before = attempt.entry.info.get("before")
    if before is None:
        before = {k: v for k, v in trainer.evaluate().items() if isinstance(v, (int, float))}
        if dist.is_main():
            registry.update(attempt.entry.id, info={**registry.get(attempt.entry.id).info, "before": before})
    resume = last_checkpoint(attempt.checkpoints) if attempt.resumed else None
    if resume is not None:
        print(f"{stage}: continuing from {resume.name}")
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    after = trainer.evaluate()
    return FitResult(before=before, after=after, train_loss=result.training_loss,
                     global_step=result.global_step, train_runtime=result.metrics.get("train_runtime"))
