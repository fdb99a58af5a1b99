"""PPO stage: optimise the SFT policy against the reward model, both found in the registry.

    make ppo [PIPELINE=pipelines/tiny.yaml] [SET="ppo.kl_coef=0.1 ppo.episodes=4096"] [FORCE=1]
    accelerate launch --config_file accelerate/ddp.yaml -m rlhf.cli ppo --pipeline pipelines/x.yaml

Each step: 1. rollout  2. score  3. advantages  4. optimise  5. log and save. Our own implementation
(TRL removed its PPOTrainer in 1.13), after Ziegler et al. 2019 and Huang et al. 2024.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object, set_seed

from accelerate import Accelerator
from rlhf.core import maths
from rlhf.core.prompts import PromptSet, PromptStream, left_pad, tokenize_prompts
from rlhf.core.sampling import response_texts, sample, sampling_config
from rlhf.errors import ConfigError, StageError
from rlhf.pipeline import history, rounds, tracking
from rlhf.pipeline.config import Pipeline, PPOStage
from rlhf.pipeline.data import prompt_rows
from rlhf.pipeline.registry import Entry, Registry, hash_config
from rlhf.stages.common import load_split, stage_config, tracked
from rlhf.stages.runner import Attempt, StageInputs, require_parent, run_stage
from rlhf.tasks import gold_function
from rlhf.training import dist
from rlhf.training.models import resolve_precision, whole_models
from rlhf.training.ppo import checkpoint
from rlhf.training.ppo.evaluate import evaluate, shard, summarise
from rlhf.training.ppo.plan import BatchPlan, plan_batches
from rlhf.training.ppo.setup import load_models, make_optimiser, save_models
from rlhf.training.ppo.sharding import (
    check_launch,
    configure_deepspeed,
    device_settings,
    fsdp_reshard_after_forward,
    gathered,
    sharding_of,
)
from rlhf.training.ppo.steps import Models, collect_rollout, compute_targets, ppo_update


def run(pipeline: Pipeline, *, registry: Registry, where: str, force: bool = False, round: int = 1) -> Entry:
    """Round 1 optimises the SFT policy against round 1's reward model; round R >= 2 continues from round
    R-1's policy (rounds.policy_init) against round R's reward model, KL-anchored to rounds.kl_anchor."""
    cfg = pipeline.ppo
    if cfg is None:
        raise ConfigError(f"{where}: has no 'ppo' section")
    check_launch(os.environ)
    plan = plan_batches(cfg, processes=dist.world_size(), where=where)
    gold = gold_function(cfg.gold, where=where)
    data = load_split(cfg.dataset, cfg.eval_prompts, eval_fraction=cfg.eval_fraction, seed=pipeline.seed,
                      rows_of=prompt_rows)
    eval_rows = data.eval[:cfg.max_eval_prompts]
    sft = require_parent(registry, stage="sft", pipeline=pipeline.name, explicit=cfg.sft_parent,
                         make_target="make sft")
    if cfg.rm_parent:
        rm = require_parent(registry, stage="rm", pipeline=pipeline.name, explicit=cfg.rm_parent,
                            make_target="make rm")
    else:
        rm = rounds.require(registry, stage="rm", pipeline=pipeline.name, round=round)
    start, reference = _start_and_reference(pipeline, registry, sft=sft, round=round)
    print(f"ppo: round {round}: policy from {start.stage} {start.id}, KL reference {reference.stage} {reference.id}, "
          f"reward model {rm.id} (eval/accuracy {rm.metrics.get('eval/accuracy')})")
    print(f"ppo: {plan.describe()}")
    config = stage_config(pipeline, stage="ppo", round=round)
    parents = list(dict.fromkeys([start.id, rm.id, reference.id]))  # round 1: [sft, rm]
    inputs = StageInputs(stage="ppo", pipeline=pipeline.name, parents=parents, config=config,
                         config_hash=hash_config(config), data_fingerprint=data.fingerprint,
                         info={"mode": cfg.mode, "sft": sft.id, "rm": rm.id, "plan": plan.describe(),
                               **({"round": round, "start": start.id, "reference": reference.id}
                                  if round > 1 else {})})

    def train(attempt: Attempt) -> dict:
        return _train(pipeline, cfg, plan, data.train, eval_rows, start=start, reference=reference, rm=rm,
                      gold=gold, attempt=attempt, registry=registry)

    return run_stage(registry, inputs, force=force, train=train)


def _start_and_reference(pipeline: Pipeline, registry: Registry, *, sft: Entry, round: int) -> tuple[Entry, Entry]:
    """(starting policy, KL reference): the SFT policy for both in round 1."""
    if round == 1:
        return sft, sft
    settings = pipeline.rounds
    previous = rounds.require(registry, stage="ppo", pipeline=pipeline.name, round=round - 1)
    start = previous if settings.policy_init == "previous" else sft
    return start, sft if settings.kl_anchor == "sft" else start


def _train(pipeline: Pipeline, cfg: PPOStage, plan: BatchPlan, train_rows: list[dict], eval_rows: list[dict], *,
           start: Entry, reference: Entry, rm: Entry, gold, attempt: Attempt, registry: Registry) -> dict:
    dist.state()  # the process group, joined the same way as every stage
    # The scheduler is stepped once per PPO step over all processes; accelerate's default would step it once
    # per process each time (it assumes a data loader whose batches grow with the process count).
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg.precision), **device_settings(os.environ),
                              gradient_accumulation_steps=plan.accumulation_steps, step_scheduler_with_optimizer=False)
    configure_deepspeed(accelerator, micro_batch_size=plan.micro_batch_size, max_grad_norm=cfg.max_grad_norm)
    set_seed(pipeline.seed)  # every process initialises new weights (LoRA adapters, a fresh value head) alike
    with whole_models(accelerator):
        loaded = load_models(pipeline, cfg, policy_entry=start, reference_entry=reference, rm=rm,
                             device=accelerator.device, frozen_dtype=_frozen_dtype(accelerator.mixed_precision))
    tokenizer = loaded.tokenizer
    prompts = _prompts(cfg, train_rows, tokenizer, origin=cfg.dataset.path)
    eval_prompts = _prompts(cfg, eval_rows, tokenizer, origin=(cfg.eval_prompts or cfg.dataset).path)
    optimiser, scheduler = make_optimiser(loaded.policy_and_value, cfg, steps=plan.steps)
    model, optimiser, scheduler = accelerator.prepare(loaded.policy_and_value, optimiser, scheduler)
    set_seed(pipeline.seed + accelerator.process_index)  # each process samples its own responses
    models = loaded.rollout_models(accelerator.unwrap_model(model))
    reshard = fsdp_reshard_after_forward(accelerator)
    kl_controller = maths.AdaptiveKLController(value=cfg.kl_coef, target=cfg.target_kl, horizon=cfg.kl_horizon)
    stream = PromptStream(len(prompts.ids), seed=pipeline.seed, rank=accelerator.process_index,
                          processes=accelerator.num_processes)
    shuffle = torch.Generator().manual_seed(pipeline.seed + accelerator.process_index)
    start_step, episodes, seconds = 0, 0, 0.0
    state = checkpoint.load_latest(accelerator, attempt.checkpoints) if attempt.resumed else None
    if state is not None:
        start_step, episodes, seconds = state.step, state.episodes, state.train_seconds
        stream.position = state.prompt_position
        kl_controller.load_state_dict(state.kl_controller)
        shuffle.manual_seed(pipeline.seed + accelerator.process_index + 7919 * state.step)
        print(f"ppo: continuing from checkpoint-{state.step} ({episodes} episodes done)")
    if accelerator.is_main_process:
        history.truncate_after(attempt.folder, step=start_step)
    generation = sampling_config(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    device = accelerator.device
    print(f"ppo: device {device}, precision {accelerator.mixed_precision}, {accelerator.num_processes} process(es), "
          f"weights {sharding_of(models.policy_and_value)}, "
          f"value model from {loaded.value_source}, reward model "
          f"{'shares the policy tokenizer' if models.scorer.shares_ids else 'has its own tokenizer (re-tokenised)'}")

    with tracked(pipeline, attempt, registry, stage="ppo"):
        for step in range(start_step + 1, plan.steps + 1):
            began = time.perf_counter()
            # 1. rollout: this process's share of the next prompts, one sampled response each
            batch = stream.next_batch(plan.rollout_batch_size)
            queries, query_mask = (t.to(device) for t in left_pad([prompts.ids[i] for i in batch],
                                                                  pad_token_id=tokenizer.pad_token_id))
            # Autocast covers the rollout alone: inside one autocast region torch caches the low-precision copy of
            # every weight it casts, so updates made within it would train on stale weights and never see their
            # own ratio move (the prepared model's forward enters its own autocast region on each call).
            model.eval()  # generation keeps its cache (gradient checkpointing would turn it off in train mode)
            with accelerator.autocast(), gathered(model, reshard_after_forward=reshard) as synced:
                sampled = sample(models.policy_and_value.policy, queries, query_mask, config=generation,
                                 micro_batch_size=plan.rollout_batch_size, synced=synced)
                # 2. score: log-probs, reference log-probs, values and reward-model scores
                try:
                    rollout = collect_rollout(models, queries, query_mask, sampled, cfg=cfg,
                                              micro_batch_size=plan.micro_batch_size)
                except FloatingPointError as err:
                    raise StageError(f"ppo step {step}: {err}; the step is refused and nothing is saved as "
                                     f"complete (check the reward model {rm.id})") from None
            # 3. advantages: KL-penalised rewards, GAE
            targets = compute_targets(rollout, cfg=cfg, kl_coef=kl_controller.value)
            # 4. optimise: K epochs of minibatch updates
            lr = scheduler.get_last_lr()[0]
            model.train()  # dropout is off in every model; train mode turns gradient checkpointing on
            update = ppo_update(model, optimiser, rollout, targets, cfg=cfg, plan=plan, backward=accelerator.backward,
                                clip_grad=lambda: _clip(accelerator, model, cfg.max_grad_norm),
                                accumulate=lambda: accelerator.accumulate(model), generator=shuffle)
            scheduler.step()
            # 5. log and save
            seq_kl = accelerator.gather(maths.masked_sum(targets.kl, rollout.response_mask, dim=1))
            kl_controller.update(float(seq_kl.mean()), n_steps=plan.episodes_per_step)
            elapsed = time.perf_counter() - began
            seconds += elapsed
            episodes += plan.episodes_per_step
            metrics = _step_metrics(accelerator, rollout, targets, update, seq_kl=seq_kl, kl_coef=kl_controller.value,
                                    lr=lr, elapsed=elapsed, episodes=episodes)
            if step % cfg.logging_steps == 0 or step == plan.steps:
                if gold is not None:  # the true objective on this step's rollouts (the RM score is its proxy)
                    metrics["objective/gold"] = _rollout_gold(accelerator, rollout, tokenizer, gold,
                                                              prompts=[prompts.texts[i] for i in batch])
                _log(metrics, step=step, folder=attempt.folder, main=accelerator.is_main_process)
            if cfg.sample_steps and step % cfg.sample_steps == 0 and accelerator.is_main_process:
                _log_samples(rollout, tokenizer, step=step)
            if step % cfg.save_steps == 0 and step < plan.steps:
                checkpoint.save(accelerator, attempt.checkpoints, checkpoint.LoopState(
                    step=step, prompt_position=stream.position, kl_controller=kl_controller.state_dict(),
                    episodes=episodes, train_seconds=seconds))

        in_sync = _processes_in_sync(accelerator, models.policy_and_value, reshard=reshard)
        final = _evaluate(accelerator, model, models, eval_prompts, tokenizer, cfg=cfg, generation=generation,
                          gold=gold, seed=pipeline.seed, reshard=reshard)
        save_models(accelerator, model, loaded, folder=attempt.folder)
        summary = {**final, "train/episodes": episodes, "train/steps": plan.steps, "train/seconds": seconds,
                   "train/episodes_per_s": episodes / seconds if seconds else None,
                   "train/peak_memory_mb": _peak_memory_mb(device), "train/processes": accelerator.num_processes,
                   "train/processes_in_sync": in_sync, "train/truncated_prompts": prompts.truncated,
                   "train/skipped_prompts": prompts.skipped, "objective/final_kl_coef": kl_controller.value}
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


def _frozen_dtype(mixed_precision: str) -> torch.dtype:
    """bf16 for the frozen reference and reward model under bf16; fp32 otherwise (fp16 weights of a model
    trained in bf16 can overflow)."""
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float32


def _mixed_precision(precision: str) -> str:
    bf16, fp16 = resolve_precision(precision)
    return "bf16" if bf16 else "fp16" if fp16 else "no"


def _clip(accelerator: Accelerator, model, max_norm: float) -> float:
    """The gradient norm before clipping (DeepSpeed clips inside its step, with the norm from configure_deepspeed,
    and reports it afterwards, or None)."""
    if max_norm <= 0:
        return float("nan")
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    return float("nan") if norm is None else float(norm)


def _step_metrics(accelerator: Accelerator, rollout, targets, update, *, seq_kl, kl_coef: float, lr: float,
                  elapsed: float, episodes: int) -> dict:
    """One step's metrics, averaged over every process's rollout (names grouped by prefix, as cleanrl)."""
    mask = rollout.response_mask
    scores = accelerator.gather(rollout.scores)
    non_score = accelerator.gather(maths.masked_sum(targets.non_score_rewards, mask, dim=1))
    lengths = accelerator.gather(mask.sum(dim=1).float())
    local = torch.tensor([update.policy_loss, update.value_loss, update.policy_clipfrac, update.value_clipfrac,
                          update.approx_kl, update.entropy, update.ratio, update.grad_norm], device=scores.device)
    shared = accelerator.reduce(local, reduction="mean").tolist()
    return {
        "objective/score": float(scores.mean()),
        "objective/raw_score": float(accelerator.gather(rollout.raw_scores).mean()),
        "objective/kl": float(seq_kl.mean()), "objective/non_score_reward": float(non_score.mean()),
        "objective/rlhf_reward": float((scores + non_score).mean()), "objective/kl_coef": kl_coef,
        "loss/policy": shared[0], "loss/value": shared[1], "policy/clipfrac": shared[2], "value/clipfrac": shared[3],
        "policy/approx_kl": shared[4], "policy/entropy": shared[5], "policy/ratio": shared[6],
        "policy/grad_norm": shared[7],
        "response/length": float(lengths.mean()), "response/eos_rate": float(accelerator.gather(
            rollout.has_eos.float()).mean()),
        "charts/learning_rate": lr, "charts/episodes": episodes,
        "perf/episodes_per_s": len(scores) / elapsed, "perf/tokens_per_s": float(lengths.sum()) / elapsed,
        "perf/step_seconds": elapsed,
    }


def _log(metrics: dict, *, step: int, folder: Path, main: bool) -> None:
    if not main:
        return
    tracking.log(metrics, step=step)
    history.append(folder, step=step, metrics=metrics)
    print(f"ppo step {step}: score {metrics['objective/score']:.3f}  kl {metrics['objective/kl']:.3f}  "
          f"entropy {metrics['policy/entropy']:.3f}  length {metrics['response/length']:.1f}  "
          f"{metrics['perf/episodes_per_s']:.1f} episodes/s")


def _rollout_gold(accelerator: Accelerator, rollout, tokenizer, gold, *, prompts: list[str]) -> float:
    """Mean gold score of the rollout's responses, over every process."""
    texts = response_texts(tokenizer, rollout.responses, rollout.response_mask)
    scores = [gold(prompt, text) for prompt, text in zip(prompts, texts)]
    local = torch.tensor([sum(scores), len(scores)], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum")
    return float(total[0] / total[1])


def _log_samples(rollout, tokenizer, *, step: int, count: int = 8) -> None:
    rows = []
    responses = response_texts(tokenizer, rollout.responses[:count], rollout.response_mask[:count])
    for i, response in enumerate(responses):
        prompt = tokenizer.decode(rollout.queries[i][rollout.query_mask[i].bool()], skip_special_tokens=True)
        rows.append([step, prompt, response, float(rollout.scores[i])])
    tracking.log_table("samples", columns=["step", "prompt", "response", "score"], rows=rows, step=step)


def _processes_in_sync(accelerator: Accelerator, unwrapped, *, reshard: bool) -> bool:
    """Every process holds the same weights after the last update (a cheap checksum of the whole weights)."""
    with torch.no_grad(), gathered(unwrapped, reshard_after_forward=reshard):
        total = sum(p.detach().double().sum() for p in unwrapped.parameters())
    sums = accelerator.gather(torch.tensor([float(total)], device=accelerator.device, dtype=torch.float64))
    return bool(torch.all(sums == sums[0]))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _evaluate(accelerator: Accelerator, prepared, models: Models, prompts: PromptSet, tokenizer, *, cfg: PPOStage,
              generation, gold, seed: int, reshard: bool) -> dict:
    """The PPO policy and the SFT policy on the held-out prompts, each process sampling its share. `prepared`:
    the model as accelerate prepared it (gathered whole under FSDP2 or ZeRO-3), `models`: what it wraps."""
    policy = models.policy_and_value.policy
    policy.eval()
    rank, processes = accelerator.process_index, accelerator.num_processes
    reference = lambda seq, att, width: models.reference_logits(seq, att, query_width=width)  # noqa: E731
    with accelerator.autocast(), gathered(prepared, reshard_after_forward=reshard) as synced:
        common = dict(indices=shard(len(prompts.ids), rank=rank, processes=processes), generation=generation,
                      temperature=cfg.temperature, batch_size=cfg.eval_batch_size, gold=gold, seed=seed + rank,
                      device=accelerator.device, synced=synced)
        trained = evaluate(policy, reference, models.scorer, prompts, tokenizer, **common)
        with models.as_reference() as sft_policy:
            baseline = evaluate(sft_policy, reference, models.scorer, prompts, tokenizer, **common)
    trained, baseline = (summarise(gather_object(results), prompts.texts) for results in (trained, baseline))
    metrics = {**trained.metrics("eval/"), **baseline.metrics("eval/sft_"), "eval/prompts": len(prompts.ids)}
    if trained.gold is not None:
        metrics["eval/gold_gain"] = trained.gold - baseline.gold
    if accelerator.is_main_process:
        print("ppo: eval " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
        for prompt, response, score in trained.samples[:4]:
            print(f"ppo: sample {prompt.strip()!r} -> {response!r} (score {score:.2f})")
    return metrics
