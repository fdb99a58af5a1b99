"""What a PPO run reports: per-step metrics and timing, the console line, sample tables, and the final evaluation
of the trained policy beside its reference. Metric names are grouped by prefix (objective/, policy/, value/, loss/,
response/, charts/, perf/, eval/), as in cleanrl, and are the same in wandb, history.jsonl and the registry."""

from __future__ import annotations

import hashlib
import resource
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from rlhf.core import flops, maths
from rlhf.core.alarms import Alarm, AlarmWatch
from rlhf.core.prompts import PromptSet
from rlhf.core.rollout import Rollout, Targets
from rlhf.core.sampling import response_texts
from rlhf.core.timing import PhaseTimer, format_duration
from rlhf.pipeline import history, tracking
from rlhf.pipeline.config import PPOStage
from rlhf.training.ppo.evaluate import evaluate, shard, side_by_side
from rlhf.training.ppo.plan import BatchPlan
from rlhf.training.ppo.sharding import gathered, sharding_of
from rlhf.training.ppo.steps import Models, UpdateStats

PHASES = ("generate", "score", "update", "other")  # perf/<phase>_seconds of every step


def clip_gradients(accelerator: Accelerator, model, max_norm: float) -> float:
    """The gradient norm before clipping (DeepSpeed clips inside its step, with the norm from configure_deepspeed,
    and reports it afterwards, or None)."""
    if max_norm <= 0:
        return float("nan")
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    return float("nan") if norm is None else float(norm)


def step_metrics(accelerator: Accelerator, rollout: Rollout, targets: Targets, update: UpdateStats, *, seq_kl,
                 kl_coef: float, lr: float, episodes: int, cfg: PPOStage) -> dict:
    """One step's metrics, averaged over every process's rollout. Without a value model there are no value/
    metrics; with groups (grpo, rloo) `objective/flat_groups` counts the groups whose responses all scored the
    same, which teach nothing that step."""
    mask = rollout.response_mask
    scores = accelerator.gather(rollout.scores)
    non_score = accelerator.gather(maths.masked_sum(targets.non_score_rewards, mask, dim=1))
    lengths = accelerator.gather(mask.sum(dim=1).float())
    flat = maths.flat_groups(rollout.scores, group_size=cfg.samples_per_prompt) if cfg.samples_per_prompt > 1 else 0
    local = torch.tensor([update.policy_loss, update.value_loss, update.policy_clipfrac, update.value_clipfrac,
                          update.approx_kl, update.entropy, update.ratio, update.grad_norm, update.kl_loss],
                         device=scores.device)
    shared = accelerator.reduce(local, reduction="mean").tolist()
    metrics = {
        "objective/score": float(scores.mean()),
        "objective/raw_score": float(accelerator.gather(rollout.raw_scores).mean()),
        "objective/kl": float(seq_kl.mean()), "objective/non_score_reward": float(non_score.mean()),
        "objective/rlhf_reward": float((scores + non_score).mean()), "objective/kl_coef": kl_coef,
        "loss/policy": shared[0], "loss/value": shared[1], "policy/clipfrac": shared[2], "value/clipfrac": shared[3],
        "policy/approx_kl": shared[4], "policy/entropy": shared[5], "policy/ratio": shared[6],
        "policy/grad_norm": shared[7],
        "response/length": float(lengths.mean()),
        "response/eos_rate": float(accelerator.gather(rollout.has_eos.float()).mean()),
        "charts/learning_rate": lr, "charts/episodes": episodes,
    }
    if cfg.algorithm != "ppo":  # no value model was trained
        del metrics["loss/value"], metrics["value/clipfrac"]
    if cfg.kl_penalty == "loss":
        metrics["loss/kl"] = shared[8]
    if cfg.samples_per_prompt > 1:
        metrics["objective/flat_groups"] = float(accelerator.reduce(torch.tensor(float(flat), device=scores.device),
                                                                    reduction="sum"))
    return metrics


def phase_tokens(rollout: Rollout, *, plan: BatchPlan) -> dict[str, int]:
    """Tokens each phase of the step processed, over all processes (every process runs the same shapes):
    generation produces the response positions; scoring reads every sequence position once per model; the update
    reads them once per PPO epoch."""
    batch, response_width = rollout.responses.shape
    sequence_tokens = batch * (rollout.queries.shape[1] + response_width) * plan.processes
    return {"generate": batch * response_width * plan.processes, "score": sequence_tokens,
            "update": sequence_tokens * plan.ppo_epochs}


@dataclass(frozen=True)
class ModelShapes:
    """The shapes whose FLOPs a PPO step spends, and the devices' summed bf16 peak (None: MFU is not reported,
    as on a CPU or an unknown GPU)."""

    policy: flops.DecoderShape  # also the reference's
    value: flops.DecoderShape | None  # trained beside the policy; None for the critic-free algorithms
    reward: flops.DecoderShape  # frozen
    peak_flops_per_s: float | None

    @classmethod
    def of(cls, models: Models, *, device: torch.device, processes: int) -> ModelShapes:
        peak = flops.peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        value = models.policy_and_value.value
        return cls(policy=flops.shape_from_config(models.policy_and_value.policy.config, lm_head=True),
                   value=flops.shape_from_config(value.model.config, lm_head=False) if value else None,
                   reward=flops.shape_from_config(models.scorer.model.config, lm_head=False),
                   peak_flops_per_s=peak * processes if peak else None)


def phase_flops(shapes: ModelShapes, rollout: Rollout, *, plan: BatchPlan) -> dict[str, float]:
    """Model FLOPs of each phase of the step over all processes (the counting conventions of rlhf/core/flops.py):
    sampling every response position; scoring every sequence with the policy, the reference, the value and the
    reward model; each PPO epoch training policy and value model on every sequence."""
    batch, response_width = rollout.responses.shape
    width = rollout.queries.shape[1] + response_width
    sequences = batch * plan.processes
    scoring = (2 * flops.forward_flops_per_token(shapes.policy, context=width)
               + flops.forward_flops_per_token(shapes.reward, context=width))
    training = flops.training_flops_per_token(shapes.policy, context=width)
    if shapes.value is not None:
        scoring += flops.forward_flops_per_token(shapes.value, context=width)
        training += flops.training_flops_per_token(shapes.value, context=width)
    return {"generate": sequences * flops.generation_flops(shapes.policy, prompt_length=rollout.queries.shape[1],
                                                           new_tokens=response_width),
            "score": sequences * width * scoring, "update": sequences * width * training * plan.ppo_epochs}


def perf_metrics(timer: PhaseTimer, rollout: Rollout, *, plan: BatchPlan, elapsed: float,
                 shapes: ModelShapes) -> dict:
    """Seconds, tokens per second and (on a GPU) MFU of each phase of the step."""
    tokens, spent = phase_tokens(rollout, plan=plan), phase_flops(shapes, rollout, plan=plan)
    metrics = {"perf/step_seconds": elapsed, "perf/episodes_per_s": plan.episodes_per_step / elapsed,
               "perf/tokens_per_s": float(rollout.response_mask.sum()) * plan.processes / elapsed}
    for phase in PHASES:
        seconds = timer.seconds.get(phase, 0.0)
        metrics[f"perf/{phase}_seconds"] = seconds
        if phase in tokens and seconds > 0:
            metrics[f"perf/{phase}_tokens_per_s"] = tokens[phase] / seconds
            if shapes.peak_flops_per_s:
                metrics[f"perf/{phase}_mfu"] = flops.mfu(flops_per_s=spent[phase] / seconds,
                                                         peak_flops_per_s=shapes.peak_flops_per_s)
    metrics["perf/generate_share"] = metrics["perf/generate_seconds"] / elapsed if elapsed else 0.0
    return metrics


@dataclass
class PhaseTotals:
    """Seconds, tokens and model FLOPs per phase over the steps of this attempt, for the registry's figures."""

    shapes: ModelShapes | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)
    flops: dict[str, float] = field(default_factory=dict)

    def add(self, seconds: dict[str, float], rollout: Rollout, *, plan: BatchPlan) -> None:
        for totals, step in ((self.seconds, seconds), (self.tokens, phase_tokens(rollout, plan=plan)),
                             (self.flops, phase_flops(self.shapes, rollout, plan=plan))):
            for phase, value in step.items():
                totals[phase] = totals.get(phase, 0.0) + value

    def summary(self) -> dict:
        """train/<phase>_seconds, _tokens_per_s, _mfu (GPU) and train/generate_share (`rlhf compare --perf`)."""
        seconds, total = self.seconds, sum(self.seconds.values())
        summary = {f"train/{phase}_seconds": seconds.get(phase, 0.0) for phase in PHASES}
        summary.update({f"train/{phase}_tokens_per_s": self.tokens[phase] / seconds[phase]
                        for phase in self.tokens if seconds.get(phase)})
        if self.shapes.peak_flops_per_s:
            summary.update({f"train/{phase}_mfu": flops.mfu(flops_per_s=self.flops[phase] / seconds[phase],
                                                            peak_flops_per_s=self.shapes.peak_flops_per_s)
                            for phase in self.flops if seconds.get(phase)})
        summary["train/generate_share"] = seconds.get("generate", 0.0) / total if total else None
        return summary


def log(metrics: dict, *, step: int, steps: int, folder: Path, main: bool, seconds_left: float) -> None:
    """To wandb, history.jsonl and one console line (main process)."""
    if not main:
        return
    tracking.log(metrics, step=step)
    history.append(folder, step=step, metrics=metrics)
    print(f"ppo step {step}/{steps}: score {metrics['objective/score']:.3f}  kl {metrics['objective/kl']:.3f}  "
          f"entropy {metrics['policy/entropy']:.3f}  length {metrics['response/length']:.1f}  "
          f"{metrics['perf/episodes_per_s']:.1f} episodes/s  generation {metrics['perf/generate_share']:.0%}  "
          f"{format_duration(seconds_left)} left")


def sound_alarms(alarms: list[Alarm], *, main: bool) -> dict:
    """One console line per new alarm and `alarm/<kind>` = 1 to wandb at its step, at once (the step may fall
    between logged steps); returns those metrics for the step's history line."""
    metrics = {f"alarm/{alarm.kind}": 1 for alarm in alarms}
    if main and alarms:
        for alarm in alarms:
            print(f"ppo step {alarm.step}: alarm {alarm.kind}: {alarm.detail}")
        tracking.log(metrics, step=alarms[0].step)
    return metrics


def alarm_summary(watch: AlarmWatch, *, main: bool) -> dict:
    """The alarms that fired, and at which step, for the registry entry; printed at the end of the run."""
    summary = watch.summary()
    if main:
        fired = ", ".join(f"{alarm.kind} at step {alarm.step}" for alarm in watch.fired)
        print(f"ppo: alarms fired: {fired} (docs/alarms.md)" if fired else "ppo: alarms: none fired")
    return summary


def rollout_gold(accelerator: Accelerator, rollout: Rollout, tokenizer, gold, *, prompts: list[str]) -> float:
    """Mean gold score of the rollout's responses, over every process."""
    texts = response_texts(tokenizer, rollout.responses, rollout.response_mask)
    scores = [gold(prompt, text) for prompt, text in zip(prompts, texts)]
    local = torch.tensor([sum(scores), len(scores)], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum")
    return float(total[0] / total[1])


def log_samples(rollout: Rollout, tokenizer, *, step: int, count: int = 8) -> None:
    rows = []
    responses = response_texts(tokenizer, rollout.responses[:count], rollout.response_mask[:count])
    for i, response in enumerate(responses):
        prompt = tokenizer.decode(rollout.queries[i][rollout.query_mask[i].bool()], skip_special_tokens=True)
        rows.append([step, prompt, response, float(rollout.scores[i])])
    tracking.log_table("samples", columns=["step", "prompt", "response", "score"], rows=rows, step=step)


def processes_in_sync(accelerator: Accelerator, unwrapped) -> bool | None:
    """Whether every process holds the same weights after the last update: a digest of every weight's bytes,
    compared across processes. Under DDP (and ZeRO-1/2) each process keeps a whole copy, and one that drifted
    shows here. Under ZeRO-3 and FSDP2 there is one copy, split between the processes: gathering it hands every
    process the same bytes, so a comparison could never fail, and the answer is None (not applicable)."""
    if sharding_of(unwrapped) != "whole":
        return None
    with torch.no_grad():
        digest = weights_digest(unwrapped)
    digests = accelerator.gather(torch.tensor([digest], device=accelerator.device, dtype=torch.int64))
    return bool(torch.all(digests == digests[0]))


def weights_digest(model: torch.nn.Module) -> int:
    """A signed 64-bit digest of the bytes of every parameter, in order: any difference in any bit changes it
    (a sum of the weights would not see two weights swapped, or errors that cancel)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little", signed=True)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def evaluate_policies(accelerator: Accelerator, prepared, models: Models, prompts: PromptSet, tokenizer, *,
                      cfg: PPOStage, generation, gold, seed: int, reshard: bool) -> dict:
    """The PPO policy and the reference policy on the held-out prompts, each process sampling its share.
    `prepared`: the model as accelerate prepared it (gathered whole under FSDP2 or ZeRO-3), `models`: what it
    wraps."""
    policy = models.policy_and_value.policy
    policy.eval()
    rank, processes = accelerator.process_index, accelerator.num_processes

    def reference(sequences, attention, width):
        return models.reference_logits(sequences, attention, query_width=width)

    with accelerator.autocast(), gathered(prepared, reshard_after_forward=reshard) as synced:
        common = dict(indices=shard(len(prompts.ids), rank=rank, processes=processes), generation=generation,
                      temperature=cfg.temperature, batch_size=cfg.eval_batch_size, gold=gold, seed=seed + rank,
                      device=accelerator.device, synced=synced)
        trained = evaluate(policy, reference, models.scorer, prompts, tokenizer, **common)
        with models.as_reference() as sft_policy:
            baseline = evaluate(sft_policy, reference, models.scorer, prompts, tokenizer, **common)
    return side_by_side(gather_object(trained), gather_object(baseline), prompts.texts, stage="ppo",
                        main=accelerator.is_main_process)
