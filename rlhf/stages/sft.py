"""SFT stage: supervised fine-tuning on demonstrations with TRL's SFTTrainer.

    make sft [PIPELINE=pipelines/tiny.yaml] [SET="sft.epochs=1"] [FORCE=1]
    rlhf sft --pipeline pipelines/tiny.yaml sft.learning_rate=1e-4

Reads the pipeline's `sft` section, starts from the registered base model (or `sft.parent`), and
registers a causal-LM folder whose metrics hold `eval_loss` and the base model's `base_eval_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import TaskType
from trl import SFTConfig, SFTTrainer

from rlhf import dist, tracking
from rlhf.base import ensure_base
from rlhf.config import Pipeline, SFTStage
from rlhf.data import load_records, sft_rows, split_train_eval, to_dataset
from rlhf.errors import ConfigError
from rlhf.models import (ensure_pad_token, load_causal_lm, load_tokenizer, parameter_counts, prepare_mode,
                         resolve_precision, save_final)
from rlhf.registry import Entry, Registry, hash_config
from rlhf.schema import as_plain
from rlhf.stages.runner import Attempt, StageInputs, last_checkpoint, require_parent, run_stage

# Fields that change how a run is observed, not what it learns: left out of the config hash.
OPERATIONAL_FIELDS = ("logging_steps", "save_steps", "eval_steps", "eval_batch_size", "parent")


@dataclass
class SFTData:
    train: list[dict]  # TRL prompt/completion rows
    eval: list[dict]
    fingerprint: str


def load_data(cfg: SFTStage, *, seed: int) -> SFTData:
    records = load_records(cfg.dataset)
    rows = sft_rows(records)
    fingerprint = records.fingerprint
    eval_rows = None
    if cfg.eval_dataset is not None:
        eval_records = load_records(cfg.eval_dataset)
        eval_rows = sft_rows(eval_records)
        fingerprint = hash_config({"train": fingerprint, "eval": eval_records.fingerprint})
    train, held_out = split_train_eval(rows, eval_rows=eval_rows, eval_fraction=cfg.eval_fraction, seed=seed,
                                       origin=records.origin)
    if cfg.max_train_samples is not None:
        train = train[:cfg.max_train_samples]
    return SFTData(train=train, eval=held_out, fingerprint=fingerprint)


def stage_config(pipeline: Pipeline) -> dict:
    """The resolved config that identifies an SFT run (hashed for the up-to-date check)."""
    sft = as_plain(pipeline.sft)
    for name in OPERATIONAL_FIELDS:
        sft.pop(name, None)
    return {"model": pipeline.model, "seed": pipeline.seed, "sft": sft}


def run(pipeline: Pipeline, *, registry: Registry, where: str, force: bool = False) -> Entry:
    cfg = pipeline.sft
    if cfg is None:
        raise ConfigError(f"{where}: has no 'sft' section")
    data = load_data(cfg, seed=pipeline.seed)
    if cfg.parent:
        parent = require_parent(registry, stage="sft", pipeline=pipeline.name, explicit=cfg.parent,
                                make_target="make sft")
    else:  # the main process builds and registers the base; the others read its entry
        base_id = dist.share(ensure_base(pipeline, registry, where=where).id if dist.is_main() else None)
        parent = registry.get(base_id)
    print(f"sft: starting from {parent.stage} {parent.id} ({parent.path}); "
          f"{len(data.train)} train / {len(data.eval)} eval examples")
    config = stage_config(pipeline)
    inputs = StageInputs(stage="sft", pipeline=pipeline.name, parents=[parent.id], config=config,
                         config_hash=hash_config(config), data_fingerprint=data.fingerprint,
                         info={"mode": cfg.mode, "init": parent.path})

    def train(attempt: Attempt) -> dict:
        return _train(pipeline, cfg, data, parent=parent, attempt=attempt, registry=registry)

    return run_stage(registry, inputs, force=force, train=train)


def _train(pipeline: Pipeline, cfg: SFTStage, data: SFTData, *, parent: Entry, attempt: Attempt,
           registry: Registry) -> dict:
    tokenizer = load_tokenizer(parent.path, trust_remote_code=pipeline.trust_remote_code)
    model = load_causal_lm(parent.path, trust_remote_code=pipeline.trust_remote_code)
    ensure_pad_token(tokenizer, model)
    peft_config = prepare_mode(model, cfg, task_type=TaskType.CAUSAL_LM)
    bf16, fp16 = resolve_precision(cfg.precision)
    args = SFTConfig(
        output_dir=str(attempt.checkpoints), run_name=f"{pipeline.name}-sft-{attempt.entry.id}",
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, max_length=cfg.max_length,
        completion_only_loss=cfg.completion_only_loss, packing=cfg.packing,
        activation_checkpointing=cfg.gradient_checkpointing, bf16=bf16, fp16=fp16,
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=1,
        eval_strategy="steps" if cfg.eval_steps else "no", eval_steps=cfg.eval_steps,
        seed=pipeline.seed, data_seed=pipeline.seed, report_to=tracking.report_to(),
        dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(), disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=to_dataset(data.train),
                         eval_dataset=to_dataset(data.eval), processing_class=tokenizer, peft_config=peft_config)
    trainable, total = parameter_counts(trainer.model)
    print(f"sft: mode {cfg.mode}: training {trainable:,} of {total:,} parameters")

    if dist.is_main():
        wandb_dir = attempt.folder.parent / "wandb"
        run_id = tracking.start_run(project=pipeline.wandb_project, group=pipeline.name, job_type="sft",
                                    name=f"{pipeline.name}-sft-{attempt.entry.id}",
                                    config={**attempt.entry.config, "parents": attempt.entry.parents},
                                    folder=wandb_dir)
        if run_id:
            registry.update(attempt.entry.id, info={**attempt.entry.info, "wandb_run_id": run_id,
                                                    "wandb_dir": str(wandb_dir)})
    failed = True
    try:
        base_eval_loss = attempt.entry.metrics.get("base_eval_loss")
        if base_eval_loss is None:  # measured once, before any update, and kept across resumes
            base_eval_loss = trainer.evaluate()["eval_loss"]
            if dist.is_main():
                registry.update_metrics(attempt.entry.id, {"base_eval_loss": base_eval_loss})
        resume = last_checkpoint(attempt.checkpoints) if attempt.resumed else None
        if resume is not None:
            print(f"sft: continuing from {resume.name}")
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        final = trainer.evaluate()
        save_final(trainer, attempt.folder)
        metrics = {
            "eval_loss": final["eval_loss"], "base_eval_loss": base_eval_loss,
            "train_loss": result.training_loss, "global_step": result.global_step,
            "train_runtime": result.metrics.get("train_runtime"),
            "train_samples": len(data.train), "eval_samples": len(data.eval),
            "trainable_parameters": trainable,
        }
        tracking.log_summary(metrics)
        failed = False
        return metrics
    finally:
        tracking.finish(failed=failed)
