"""SFT stage: supervised fine-tuning on demonstrations with TRL's SFTTrainer.

    make sft [PIPELINE=pipelines/tiny.yaml] [SET="sft.epochs=1"] [FORCE=1] [RESTART=1]
    rlhf sft --pipeline pipelines/tiny.yaml sft.learning_rate=1e-4

Reads the pipeline's `sft` section, starts from the registered base model (or `sft.parent`), and
registers a causal-LM folder whose metrics hold `eval/loss` and the base model's `eval/base_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft import TaskType
from trl import SFTConfig, SFTTrainer

from rlhf.errors import ConfigError
from rlhf.pipeline import lineage, tracking
from rlhf.pipeline.config import Pipeline
from rlhf.pipeline.data import sft_rows, to_dataset
from rlhf.pipeline.registry import Entry, Registry, hash_config
from rlhf.pipeline.stage_config import stage_config
from rlhf.stages.base import ensure_base
from rlhf.stages.common import Split, load_split, tracked
from rlhf.stages.runner import Attempt, StageInputs, run_stage
from rlhf.stages.trl_common import fit, training_args
from rlhf.training import dist
from rlhf.training.models import (
    load_policy,
    parameter_counts,
    prepare_mode,
    save_final,
)


@dataclass(frozen=True)
class Resolved:
    """What an SFT run starts from."""

    inputs: StageInputs | None  # None in a plan when the base model is not built yet
    data: Split
    base: Entry | None  # roles["base"]: the model fine-tuned


def resolve(pipeline: Pipeline, registry: Registry, *, where: str, round: int = 1, dry: bool = False) -> Resolved:
    """The data and the base model; `dry` (`rlhf plan`) builds and registers nothing."""
    cfg = pipeline.sft
    if cfg is None:
        raise ConfigError(f"{where}: has no 'sft' section")
    data = load_split(cfg.dataset, cfg.eval_dataset, eval_fraction=cfg.eval_fraction, seed=pipeline.seed,
                      rows_of=sft_rows, max_train_samples=cfg.max_train_samples)
    if cfg.parent:
        base = lineage.require(registry, stage="sft", pipeline=pipeline.name, explicit=cfg.parent)
    elif dry:
        base = ensure_base(pipeline, registry, where=where, build=False)
    else:  # the main process builds and registers the base; the others read its entry
        base = registry.get(dist.decide(lambda: ensure_base(pipeline, registry, where=where).id))
    if base is None:
        return Resolved(inputs=None, data=data, base=None)
    config = stage_config(pipeline, stage="sft")
    inputs = StageInputs(stage="sft", pipeline=pipeline.name, roles={"base": base.id}, config=config,
                         config_hash=hash_config(config), data_fingerprint=data.fingerprint,
                         info={"mode": cfg.mode, "init": base.path})
    return Resolved(inputs=inputs, data=data, base=base)


def run(pipeline: Pipeline, *, registry: Registry, where: str, force: bool = False, restart: bool = False) -> Entry:
    found = resolve(pipeline, registry, where=where)
    print(f"sft: starting from {found.base.stage} {found.base.id} ({found.base.path}); "
          f"{len(found.data.train)} train / {len(found.data.eval)} eval examples")
    return run_stage(registry, found.inputs, force=force, restart=restart,
                     train=lambda attempt: train(pipeline, found, attempt=attempt, registry=registry))


def train(pipeline: Pipeline, found: Resolved, *, attempt: Attempt, registry: Registry) -> dict:
    cfg, data, base = pipeline.sft, found.data, found.base
    tokenizer, model = load_policy(base.path, trust_remote_code=pipeline.trust_remote_code,
                                   allow_pickle=pipeline.allow_pickle)
    peft_config = prepare_mode(model, cfg, task_type=TaskType.CAUSAL_LM)
    args = SFTConfig(**training_args(pipeline, cfg, attempt, stage="sft"), max_length=cfg.max_length,
                     completion_only_loss=cfg.completion_only_loss, packing=cfg.packing)
    trainer = SFTTrainer(model=model, args=args, train_dataset=to_dataset(data.train),
                         eval_dataset=to_dataset(data.eval), processing_class=tokenizer, peft_config=peft_config)
    trainable, total = parameter_counts(trainer.model)
    print(f"sft: mode {cfg.mode}: training {trainable:,} of {total:,} parameters")

    with tracked(pipeline, attempt, registry, stage="sft"):
        fitted = fit(trainer, attempt, registry, stage="sft")
        save_final(trainer, attempt.folder)
        metrics = {
            "eval/loss": fitted.after["eval_loss"], "eval/base_loss": fitted.before["eval_loss"],
            "eval/samples": len(data.eval), "train/mean_loss": fitted.train_loss,
            "train/global_step": fitted.global_step, "train/runtime": fitted.train_runtime,
            "train/samples": len(data.train), "train/trainable_parameters": trainable,
            **fitted.perf,
        }
        tracking.log_summary(metrics)
        return metrics
