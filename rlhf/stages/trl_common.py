"""What the SFT and reward-model stages share around a TRL trainer: its arguments from our config and the
evaluate-resume-train-evaluate sequence."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback

from rlhf.core.flops import mfu, peak_bf16_flops, shape_from_config, training_flops_per_token
from rlhf.core.timing import format_duration
from rlhf.pipeline import history, tracking
from rlhf.pipeline.checkpoints import last_checkpoint
from rlhf.pipeline.config import Pipeline, TrainStage
from rlhf.pipeline.registry import Registry
from rlhf.stages.runner import Attempt
from rlhf.training import dist
from rlhf.training.checkpointing import checkpointing_field
from rlhf.training.models import mixed_precision


def training_args(pipeline: Pipeline, cfg: TrainStage, attempt: Attempt, *, stage: str) -> dict:
    """Keyword arguments shared by SFTConfig, RewardConfig and DPOConfig (TrainingArguments and TRL's padding)."""
    precision = mixed_precision(cfg.precision)
    bf16, fp16 = precision == "bf16", precision == "fp16"
    # The pipeline's precision decides: under `accelerate launch` the trainer would otherwise take the accelerate
    # config's `mixed_precision` (bf16 in the shipped files) whenever bf16 and fp16 are both off.
    os.environ["ACCELERATE_MIXED_PRECISION"] = precision
    return dict(
        output_dir=str(attempt.checkpoints), run_name=f"{pipeline.name}-{stage}-{attempt.entry.id}",
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        bf16=bf16, fp16=fp16,
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=1,
        eval_strategy="steps" if cfg.eval_steps else "no", eval_steps=cfg.eval_steps,
        seed=pipeline.seed, data_seed=pipeline.seed, report_to=[],
        dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=not sys.stdout.isatty(),  # a progress bar (with its ETA) on a terminal; ProgressLines in a log
        include_num_input_tokens_seen="non_padding",  # state.num_input_tokens_seen, for PerfCallback
        **{checkpointing_field(): cfg.gradient_checkpointing},
        # The trainer compiles the whole model (2 minutes at 0.5B on an H200); batches padded to a multiple of 64
        # tokens give it few shapes to compile (SFTConfig, RewardConfig and DPOConfig all take pad_to_multiple_of).
        torch_compile=cfg.compile, **({"pad_to_multiple_of": 64} if cfg.compile else {}),
    )


@dataclass
class FitResult:
    before: dict  # eval metrics of the starting model, measured once and kept across resumes
    after: dict  # eval metrics of the trained model
    train_loss: float
    global_step: int
    train_runtime: float | None
    perf: dict  # train/tokens_per_s, and on a GPU train/mfu and train/peak_memory_mb (PerfCallback)


def fit(trainer: Trainer, attempt: Attempt, registry: Registry, *, stage: str) -> FitResult:
    """Evaluate the starting model (first attempt only), train (resuming from the last complete
    checkpoint of a killed attempt), and evaluate again."""
    print(f"{stage}: device {trainer.args.device}, precision "
          f"{'bf16' if trainer.args.bf16 else 'fp16' if trainer.args.fp16 else 'fp32'}, "
          f"{dist.world_size()} process(es)")
    # First in the list, so that the figures it adds to a log reach every other callback (wandb's included).
    perf = PerfCallback(sequences_per_example=2 if stage in ("rm", "dpo") else 1)  # a pair is two sequences
    trainer.callback_handler.callbacks.insert(0, perf)
    trainer.add_callback(HistoryCallback(attempt.folder))  # history.jsonl beside the checkpoint
    if trainer.args.disable_tqdm:  # in a log, one plain line per log step instead of the trainer's raw dicts
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(ProgressLines(stage))
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
                     global_step=result.global_step, train_runtime=result.metrics.get("train_runtime"),
                     perf=perf.run_figures())


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


class ProgressLines(TrainerCallback):
    """Where a stage is and when it will end, one line per log, for logs that are not a terminal:
    `sft step 40/129 (31%): loss 2.310  eval/loss 1.912  1m05s left` (the time left from the mean optimiser step of
    this attempt). Main process only."""

    def __init__(self, stage: str):
        self.stage = stage

    def on_train_begin(self, args, state, control, **kwargs):
        self.began, self.first_step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        shown = {name: value for name, value in history.wandb_names(logs).items()
                 if name in ("train/loss", "train/accuracy", "eval/loss", "eval/accuracy", "train/train_loss")}
        done = state.global_step - getattr(self, "first_step", state.global_step)
        left = (time.perf_counter() - self.began) / done * (state.max_steps - state.global_step) if done > 0 else None
        print(f"{self.stage} step {state.global_step}/{state.max_steps} "
              f"({state.global_step / max(state.max_steps, 1):.0%}): "
              + "  ".join(f"{name} {value:.4g}" for name, value in shown.items())
              + (f"  {format_duration(left)} left" if left is not None else ""), flush=True)


class HistoryCallback(TrainerCallback):
    """Every trainer log (training and evaluation), under wandb's names, to the entry folder's history and to the
    stage's wandb run, main process only. We log to wandb ourselves rather than through transformers' WandbCallback
    (`report_to` is empty), so that a tracking failure is a warning (rlhf/pipeline/tracking.py), never a stopped
    stage."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            metrics = history.wandb_names(logs)
            history.append(self.folder, step=state.global_step, metrics=metrics)
            tracking.log(metrics, step=state.global_step)


@dataclass
class _Span:
    """Optimiser steps timed together: their seconds, non-padding tokens and sequences (over all processes)."""

    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0
    sequences: int = 0


class PerfCallback(TrainerCallback):
    """Training speed into the trainer's logs, so that wandb and history.jsonl get it: `perf/tokens_per_s` over
    each logging window and, on a GPU, `perf/mfu` and `perf/peak_memory_mb` (allocated, since training began);
    in the last log the same over the whole run as `train/tokens_per_s`, `train/mfu`, `train/peak_memory_mb`
    (`run_figures`, for the registry), from the second optimiser step on: the first pays for warm-up.

    Tokens are the trainer's own count of non-padding input tokens over all processes (`num_input_tokens_seen`).
    The clock runs from the end of one optimiser step to the end of the next, with a CUDA synchronise there so it
    times finished work; evaluation, saving and logging in between are left out. MFU counts 3 x the forward FLOPs
    of each token at the mean sequence length (rlhf/core/flops.py) against the bf16 peak of every process's GPU,
    and is left out when some weights are frozen (LoRA, top_n), which skip most of the backward pass."""

    def __init__(self, *, sequences_per_example: int):
        self.sequences_per_example = sequences_per_example
        self.window, self.run, self.warm = _Span(), _Span(), _Span()  # warm: the run from its second step on

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.cuda = args.device.type == "cuda"
        peak = peak_bf16_flops(torch.cuda.get_device_name(args.device)) if self.cuda else None
        all_trained = model is not None and all(p.requires_grad for p in model.parameters())
        self.peak = peak * args.world_size if peak and all_trained else None
        if self.peak:
            lm_head = model.get_output_embeddings() is not None  # a causal LM, not a one-score head
            self.shape = shape_from_config(model.config, lm_head=lm_head)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(args.device)
        self.sequences_per_step = (args.per_device_train_batch_size * args.gradient_accumulation_steps
                                   * args.world_size * self.sequences_per_example)
        self.first_step, self.tokens_seen = state.global_step + 1, state.num_input_tokens_seen
        self.clock = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.synchronize(args.device)
        now = time.perf_counter()
        step = _Span(steps=1, seconds=now - self.clock, tokens=state.num_input_tokens_seen - self.tokens_seen,
                     sequences=self.sequences_per_step)
        self.clock, self.tokens_seen = now, state.num_input_tokens_seen
        spans = (self.window, self.run) + ((self.warm,) if state.global_step > self.first_step else ())
        for span in spans:
            span.steps, span.seconds = span.steps + 1, span.seconds + step.seconds
            span.tokens, span.sequences = span.tokens + step.tokens, span.sequences + step.sequences

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "train_loss" in logs:  # the trainer's last log, after training
            logs.update(self.run_figures())
        elif logs is not None and "loss" in logs and self.window.steps:
            logs.update(self._figures(self.window, prefix="perf/"))
            self.window = _Span()
        self.clock = time.perf_counter()  # the time spent logging, evaluating or saving is not training

    def on_evaluate(self, args, state, control, **kwargs):
        self.clock = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        self.clock = time.perf_counter()

    def run_figures(self) -> dict:
        """The whole run's figures (from its second step, when it has one), named for the registry."""
        return self._figures(self.warm if self.warm.steps else self.run, prefix="train/")

    def _figures(self, span: _Span, *, prefix: str) -> dict:
        if not span.seconds:
            return {}
        tokens_per_s = span.tokens / span.seconds
        figures = {f"{prefix}tokens_per_s": tokens_per_s}
        if self.peak and span.sequences:
            flops = training_flops_per_token(self.shape, context=round(span.tokens / span.sequences))
            figures[f"{prefix}mfu"] = mfu(flops_per_s=tokens_per_s * flops, peak_flops_per_s=self.peak)
        if self.cuda:
            figures[f"{prefix}peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return figures
