"""Our PPO trainer: set-up, then the loop of numbered steps. `rlhf/stages/ppo.py` finds its inputs in the registry
and calls `train`; `bench/run.py` drives the same stage.

    summary = train(job, folder=Path("runs/tiny/ppo-…"), checkpoints=Path(".../checkpoints"), resumed=False)

Each step: 1. rollout (sample one response per prompt)  2. score (log-probs, reference log-probs, values, reward-model
scores)  3. advantages (KL-penalised rewards, GAE)  4. optimise (K epochs of minibatch updates)  5. log and save.
After Ziegler et al. 2019 and Huang et al. 2024 ("The N+ implementation details of RLHF with PPO").
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase

from rlhf.core import flops, maths
from rlhf.core.alarms import AlarmWatch
from rlhf.core.prompts import PromptSet, PromptStream, left_pad, tokenize_prompts
from rlhf.core.sampling import sample, sampling_config
from rlhf.core.timing import PhaseTimer
from rlhf.errors import ConfigError, StageError
from rlhf.pipeline import history, tracking
from rlhf.pipeline.config import Pipeline, PPOStage
from rlhf.pipeline.registry import Entry
from rlhf.tasks import GoldFn
from rlhf.training import dist
from rlhf.training.models import mixed_precision, whole_models
from rlhf.training.ppo import checkpoint, report
from rlhf.training.ppo.models import packs_groups
from rlhf.training.ppo.plan import BatchPlan
from rlhf.training.ppo.setup import Loaded, load_models, make_optimiser, save_models
from rlhf.training.ppo.sharding import (
    configure_deepspeed,
    device_settings,
    fsdp_reshard_after_forward,
    fused_optimiser,
    gathered,
    sharding_of,
    will_shard,
)
from rlhf.training.ppo.steps import Models, collect_rollout, compute_targets, logprobs_from_sampling, ppo_update


@dataclass(frozen=True)
class Job:
    """What one PPO run trains: its settings, its prompts and the three models it starts from."""

    pipeline: Pipeline
    plan: BatchPlan  # the batch arithmetic, checked at start-up
    train_rows: list[dict]  # {"prompt": ...} rows
    eval_rows: list[dict]  # held-out prompts of the final evaluation
    policy: Entry  # the starting policy (the SFT policy; round R >= 2: round R-1's PPO policy)
    reference: Entry  # the KL anchor (the SFT policy)
    reward: Entry  # the reward model
    gold: GoldFn | None  # the task's true objective, when there is one

    @property
    def cfg(self) -> PPOStage:
        return self.pipeline.ppo


@dataclass
class RunState:
    """Everything the loop reads and updates, made once by `set_up` (and restored from a checkpoint)."""

    accelerator: Accelerator
    model: torch.nn.Module  # the prepared policy-and-value module: what the optimiser steps
    models: Models  # the same module unwrapped, the frozen reference and the reward scorer, for rollouts
    loaded: Loaded  # as loaded, for saving
    optimiser: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    tokenizer: PreTrainedTokenizerBase
    prompts: PromptSet
    eval_prompts: PromptSet
    stream: PromptStream  # where each process reads its next prompts
    kl_controller: maths.AdaptiveKLController
    shuffle: torch.Generator  # minibatch order
    generation: GenerationConfig
    reshard: bool  # FSDP2: reshard after forward
    alarms: AlarmWatch  # reward-hacking alarms, fed every step's metrics (docs/alarms.md)
    sampled_logprobs: bool  # rollout log-probs recorded while sampling, not recomputed (ppo.rollout_logprobs)
    alarms_restored: bool = False  # the watch came back from the checkpoint (else it is replayed from history)
    step: int = 0  # PPO steps done
    episodes: int = 0
    seconds: float = 0.0  # in the loop, across resumed attempts
    totals: report.PhaseTotals = field(default_factory=report.PhaseTotals)  # seconds, tokens, FLOPs per phase


def train(job: Job, *, folder: Path, checkpoints: Path, resumed: bool) -> dict:
    """Run the PPO loop into `folder` (resuming from `checkpoints` when `resumed`); returns the final metrics."""
    cfg = job.cfg
    run = set_up(job, checkpoints=checkpoints, resumed=resumed)
    plan = _prefix_plan(job, run.accelerator, run.models.policy_and_value.policy)
    accelerator, model, models, tokenizer = run.accelerator, run.model, run.models, run.tokenizer
    timer = PhaseTimer(sync=torch.cuda.synchronize if accelerator.device.type == "cuda" else None)
    if accelerator.is_main_process:  # steps an interrupted attempt logged after its checkpoint are logged again
        history.truncate_after(folder, step=run.step)
    if run.step and not run.alarms_restored:  # a checkpoint without the watch: rebuilt from the logged steps
        run.alarms.replay(history.read(folder), until=run.step)
    for step in range(run.step + 1, plan.steps + 1):
        timer.start_step()
        with ExitStack() as rollout_region:
            # 1. rollout: this process's share of the next prompts, samples_per_prompt responses to each, in a row
            # (the groups of grpo and rloo)
            with timer.phase("generate"):
                prompts = run.stream.next_batch(plan.prompts_per_step)
                batch = [i for i in prompts for _ in range(plan.samples_per_prompt)]
                queries, query_mask = (t.to(accelerator.device) for t in left_pad(
                    [run.prompts.ids[i] for i in batch], pad_token_id=tokenizer.pad_token_id))
                # Autocast covers the rollout alone: inside one autocast region torch caches the low-precision copy
                # of every weight it casts, so updates made within it would train on stale weights and never see
                # their own ratio move (the prepared model's forward enters its own autocast region on each call).
                model.eval()  # generation keeps its cache (gradient checkpointing would turn it off in train mode)
                rollout_region.enter_context(accelerator.autocast())
                synced = rollout_region.enter_context(gathered(model, reshard_after_forward=run.reshard))
                sampled = sample(models.policy_and_value.policy, queries, query_mask, config=run.generation,
                                 micro_batch_size=plan.rollout_batch_size, synced=synced,
                                 with_logprobs=run.sampled_logprobs)
            # 2. score: log-probs, reference log-probs, values and reward-model scores
            with timer.phase("score"):
                try:
                    rollout = collect_rollout(models, queries, query_mask, sampled, cfg=cfg,
                                              micro_batch_size=plan.micro_batch_size, group=plan.prefix_group)
                except FloatingPointError as err:
                    raise StageError(f"ppo step {step}: {err}; the step is refused and nothing is saved as "
                                     f"complete (check the reward model {job.reward.id})") from None
        with timer.phase("update"):
            # 3. advantages: KL-penalised rewards, then GAE (ppo) or the critic-free estimator
            targets = compute_targets(rollout, cfg=cfg, kl_coef=run.kl_controller.value)
            # 4. optimise: K epochs of minibatch updates
            lr = run.scheduler.get_last_lr()[0]
            model.train()  # dropout is off in every model; train mode turns gradient checkpointing on
            update = ppo_update(model, run.optimiser, rollout, targets, cfg=cfg, plan=plan,
                                backward=accelerator.backward, kl_coef=run.kl_controller.value,
                                clip_grad=lambda: report.clip_gradients(accelerator, model, cfg.max_grad_norm),
                                accumulate=lambda: accelerator.accumulate(model), generator=run.shuffle)
            run.scheduler.step()
        # 5. log and save
        with timer.phase("other"):
            seq_kl = accelerator.gather(maths.masked_sum(targets.kl, rollout.response_mask, dim=1))
            run.kl_controller.update(float(seq_kl.mean()), n_steps=plan.episodes_per_step)
            run.step, run.episodes = step, run.episodes + plan.episodes_per_step
            metrics = report.step_metrics(accelerator, rollout, targets, update, seq_kl=seq_kl,
                                          kl_coef=run.kl_controller.value, lr=lr, episodes=run.episodes, cfg=cfg)
            alarms = run.alarms.observe(metrics, step=step)  # reward hacking (docs/alarms.md): each kind fires once
            metrics.update(report.sound_alarms(alarms, main=accelerator.is_main_process))
            logged = step % cfg.logging_steps == 0 or step == plan.steps
            if logged and job.gold is not None:  # the true objective on this step's rollouts (the RM score: a proxy)
                metrics["objective/gold"] = report.rollout_gold(accelerator, rollout, tokenizer, job.gold,
                                                                prompts=[run.prompts.texts[i] for i in batch])
            if cfg.sample_steps and step % cfg.sample_steps == 0 and accelerator.is_main_process:
                report.log_samples(rollout, tokenizer, step=step)
            if step % cfg.save_steps == 0 and step < plan.steps:
                checkpoint.save(accelerator, checkpoints, checkpoint.LoopState(
                    step=step, prompt_position=run.stream.position, kl_controller=run.kl_controller.state_dict(),
                    episodes=run.episodes, train_seconds=run.seconds + timer.step_seconds(),
                    alarms=run.alarms.state_dict()), shuffle=run.shuffle)
        elapsed = timer.end_step()
        run.seconds += elapsed
        run.totals.add(timer.seconds, rollout, plan=plan)
        if logged:
            metrics.update(report.perf_metrics(timer, rollout, plan=plan, elapsed=elapsed, shapes=run.totals.shapes))
            report.log(metrics, step=step, steps=plan.steps, folder=folder, main=accelerator.is_main_process,
                       seconds_left=timer.mean_step_seconds() * (plan.steps - step))
    return finish(job, run, folder=folder)


def set_up(job: Job, *, checkpoints: Path, resumed: bool) -> RunState:
    """Accelerator, models, optimiser, prompts and controllers, prepared for the loop; restored from the newest
    complete checkpoint of an interrupted attempt when `resumed`."""
    pipeline, cfg, plan = job.pipeline, job.cfg, job.plan
    dist.state()  # the process group, joined the same way as every stage
    # The scheduler is stepped once per PPO step over all processes; accelerate's default would step it once
    # per process each time (it assumes a data loader whose batches grow with the process count).
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg.precision), **device_settings(os.environ),
                              gradient_accumulation_steps=plan.accumulation_steps, step_scheduler_with_optimizer=False)
    configure_deepspeed(accelerator, micro_batch_size=plan.micro_batch_size, max_grad_norm=cfg.max_grad_norm)
    if cfg.generation_cache == "static" and will_shard(accelerator):  # before any model is loaded
        raise ConfigError("ppo.generation_cache static cannot be used with sharded models (ZeRO-3 or FSDP), whose "
                          "generation runs synced over gathered weights; set ppo.generation_cache: dynamic")
    set_seed(pipeline.seed)  # every process initialises new weights (LoRA adapters, a fresh value head) alike
    with whole_models(accelerator):
        loaded = load_models(pipeline, cfg, policy_entry=job.policy, reference_entry=job.reference, rm=job.reward,
                             device=accelerator.device, frozen_dtype=_frozen_dtype(accelerator.mixed_precision))
    tokenizer = loaded.tokenizer
    prompts = _prompts(cfg, job.train_rows, tokenizer, origin=cfg.dataset.path)
    eval_prompts = _prompts(cfg, job.eval_rows, tokenizer, origin=(cfg.eval_prompts or cfg.dataset).path)
    optimiser, scheduler = make_optimiser(loaded.policy_and_value, cfg, steps=plan.steps,
                                          fused=fused_optimiser(accelerator))
    model, optimiser, scheduler = accelerator.prepare(loaded.policy_and_value, optimiser, scheduler)
    set_seed(pipeline.seed + accelerator.process_index)  # each process samples its own responses
    generation = sampling_config(max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens,
                                 temperature=cfg.temperature, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, cache=cfg.generation_cache)
    run = RunState(
        accelerator=accelerator, model=model, models=loaded.rollout_models(accelerator.unwrap_model(model)),
        loaded=loaded, optimiser=optimiser, scheduler=scheduler, tokenizer=tokenizer, prompts=prompts,
        eval_prompts=eval_prompts,
        stream=PromptStream(len(prompts.ids), seed=pipeline.seed, rank=accelerator.process_index,
                            processes=accelerator.num_processes),
        kl_controller=maths.AdaptiveKLController(value=cfg.kl_coef, target=cfg.target_kl, horizon=cfg.kl_horizon),
        shuffle=torch.Generator().manual_seed(pipeline.seed + accelerator.process_index), generation=generation,
        reshard=fsdp_reshard_after_forward(accelerator), alarms=AlarmWatch(cfg.alarms),
        sampled_logprobs=logprobs_from_sampling(cfg, mixed_precision=accelerator.mixed_precision))
    run.totals.shapes = report.ModelShapes.of(run.models, device=accelerator.device,
                                              processes=accelerator.num_processes)
    state = None
    if resumed:
        state = checkpoint.load_latest(accelerator, checkpoints, shuffle=run.shuffle,
                                       seed=pipeline.seed + accelerator.process_index)
    if state is not None:
        run.step, run.episodes, run.seconds = state.step, state.episodes, state.train_seconds
        run.stream.position = state.prompt_position
        run.kl_controller.load_state_dict(state.kl_controller)
        if state.alarms is not None:  # resumed: the alarms keep their baselines and do not repeat what fired
            run.alarms.load_state_dict(state.alarms)
            run.alarms_restored = True
        print(f"ppo: continuing from checkpoint-{state.step} ({run.episodes} episodes done)")
    scorer = "shares the policy tokenizer" if run.models.scorer.shares_ids else "has its own tokenizer (re-tokenised)"
    print(f"ppo: device {accelerator.device}, precision {accelerator.mixed_precision}, "
          f"{accelerator.num_processes} process(es), weights {sharding_of(loaded.policy_and_value)}, "
          f"value model from {loaded.value_source}, reward model {scorer}, rollout log-probs from "
          f"{'sampling' if run.sampled_logprobs else 'a forward pass'}")
    return run


def finish(job: Job, run: RunState, *, folder: Path) -> dict:
    """Check the processes agree, evaluate the trained and the reference policy, save, and summarise."""
    accelerator = run.accelerator
    in_sync = report.processes_in_sync(accelerator, run.models.policy_and_value)  # None when sharded
    final = report.evaluate_policies(accelerator, run.model, run.models, run.eval_prompts, run.tokenizer,
                                     cfg=job.cfg, generation=run.generation, gold=job.gold, seed=job.pipeline.seed,
                                     reshard=run.reshard)
    save_models(accelerator, run.model, run.loaded, folder=folder)
    summary = {**final, "train/episodes": run.episodes, "train/steps": job.plan.steps, "train/seconds": run.seconds,
               "train/episodes_per_s": run.episodes / run.seconds if run.seconds else None,
               "train/peak_memory_mb": report.peak_memory_mb(accelerator.device),
               "train/processes": accelerator.num_processes, "train/processes_in_sync": in_sync,
               "train/truncated_prompts": run.prompts.truncated, "train/skipped_prompts": run.prompts.skipped,
               "objective/final_kl_coef": run.kl_controller.value,
               **run.totals.summary(), **report.alarm_summary(run.alarms, main=accelerator.is_main_process)}
    tracking.log_summary(summary)
    return summary


def _prompts(cfg: PPOStage, rows: list[dict], tokenizer, *, origin: str) -> PromptSet:
    found = tokenize_prompts(rows, tokenizer, max_length=cfg.max_prompt_length, long_prompts=cfg.long_prompts,
                             origin=origin)
    if found.truncated or found.skipped:
        what = "truncated (keeping their end)" if found.truncated else "skipped"
        print(f"ppo: {found.truncated or found.skipped} prompts of {origin} are longer than max_prompt_length "
              f"{cfg.max_prompt_length} tokens and were {what}")
    return found


def _prefix_plan(job: Job, accelerator: Accelerator, policy: nn.Module) -> BatchPlan:
    """The job's plan, with an unset `ppo.shared_prefix` stepping aside where sharing is not measured or does not
    pay: under sharded weights (ZeRO-3, FSDP2); for short prompts (max_prompt_length < 2 x max_new_tokens) on a
    model whose attention cannot take the packed layout's mask, where the cached way's second pass costs more than
    it saves; and, packed, where the packed row's attention over every slot costs more forward FLOPs than the
    prompt passes it saves (long responses in large groups: `flops.group_forward_flops`)."""
    cfg, group = job.cfg, job.plan.prefix_group
    if group == 1 or cfg.shared_prefix is not None:
        return job.plan
    if will_shard(accelerator):
        why = "under sharded weights"
    elif not packs_groups(policy):
        if cfg.max_prompt_length >= 2 * cfg.max_new_tokens:
            return job.plan
        why = (f"for short prompts on {getattr(policy.config, '_attn_implementation', None)} attention (the packed "
               f"pass needs sdpa)")
    else:
        shape = flops.shape_from_config(policy.config, lm_head=False)
        sizes = dict(prompt=cfg.max_prompt_length, response=cfg.max_new_tokens, group=group)
        packed, rows = (flops.group_forward_flops(shape, **sizes, packed=p) for p in (True, False))
        if packed <= rows:
            return job.plan
        why = (f"for long responses: a packed group of {group} x {cfg.max_new_tokens} new tokens behind "
               f"{cfg.max_prompt_length} prompt tokens costs {packed / rows:.2f}x its rows' forward FLOPs (its "
               f"attention mask covers the whole packed row)")
    print(f"ppo: shared_prefix off {why} (set ppo.shared_prefix: true to share prompts anyway)")
    return dataclasses.replace(job.plan, prefix_group=1)


def _frozen_dtype(mixed_precision: str) -> torch.dtype:
    """bf16 for the frozen reference and reward model under bf16; fp32 otherwise (fp16 weights of a model
    trained in bf16 can overflow)."""
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float32


