"""The three steps of a PPO iteration: collect a rollout, derive targets, update on minibatches.

Each is a function of explicit inputs; rlhf/stages/ppo.py calls them in run order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rlhf.core import maths
from rlhf.core.rollout import Rollout, Targets, minibatch
from rlhf.core.sampling import Sampled
from rlhf.pipeline.config import PPOStage
from rlhf.training.ppo.models import PolicyAndValue, response_logits
from rlhf.training.ppo.plan import BatchPlan
from rlhf.training.ppo.scorer import RewardScorer, training_scores


@dataclass(frozen=True)
class Models:
    """What a rollout consults. `reference` is None with LoRA: the policy with its adapter disabled."""

    policy_and_value: PolicyAndValue  # unwrapped (no DDP hooks) for rollout-time forward passes
    reference: nn.Module | None
    scorer: RewardScorer

    def reference_logits(self, sequences: Tensor, attention_mask: Tensor, *, query_width: int,
                         group: int = 1) -> Tensor:
        if self.reference is not None:
            return response_logits(self.reference, sequences, attention_mask, query_width=query_width, group=group)
        with self.policy_and_value.policy.disable_adapter():
            return response_logits(self.policy_and_value.policy, sequences, attention_mask, query_width=query_width,
                                   group=group)

    @contextmanager
    def as_reference(self) -> Iterator[nn.Module]:
        """The reference policy as a generating model (the SFT baseline of the final evaluation)."""
        if self.reference is not None:
            yield self.reference
            return
        with self.policy_and_value.policy.disable_adapter():
            yield self.policy_and_value.policy


def logprobs_from_sampling(cfg: PPOStage, *, mixed_precision: str) -> bool:
    """Whether rollouts take their log-probs from sampling (`ppo.rollout_logprobs`); auto: where the cached
    decoding gives a full pass's numbers, in fp32 (accelerate's mixed precision "no") with min_new_tokens 0."""
    if cfg.rollout_logprobs != "auto":
        return cfg.rollout_logprobs == "sampling"
    return mixed_precision == "no" and cfg.min_new_tokens == 0


@torch.no_grad()
def collect_rollout(models: Models, queries: Tensor, query_mask: Tensor, sampled: Sampled, *, cfg: PPOStage,
                    micro_batch_size: int, group: int = 1) -> Rollout:
    """Log-probs, reference log-probs and values of the sampled responses, and their reward-model scores. The
    log-probs are those recorded while sampling when `sampled` has them (`ppo.rollout_logprobs`), else recomputed
    with full forward passes at the sampling temperature (Huang et al. 2024 detail 7). With `group` > 1
    (`ppo.shared_prefix`), each group of rows shares one prompt, which runs once in the policy and reference
    passes."""
    logprobs, ref_logprobs, values = [], [], []
    width = queries.shape[1]
    sequences = torch.cat([queries, sampled.responses], dim=1)
    attention = torch.cat([query_mask.long(), sampled.response_mask.long()], dim=1)
    policy_and_value = models.policy_and_value
    for start in range(0, queries.shape[0], micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        seq, att = sequences[rows], attention[rows]
        if sampled.logprobs is None:
            logits, value = policy_and_value(seq, att, query_width=width, group=group)
            logprobs.append(maths.logprobs_from_logits(logits, seq[:, width:], temperature=cfg.temperature))
            del logits
        else:
            logprobs.append(sampled.logprobs[rows])
            value = policy_and_value.values(seq, att, query_width=width)
        values.append(value if value is not None else torch.zeros_like(logprobs[-1]))
        ref = models.reference_logits(seq, att, query_width=width, group=group)
        ref_logprobs.append(maths.logprobs_from_logits(ref, seq[:, width:], temperature=cfg.temperature))
    raw = models.scorer.raw(queries, query_mask, sampled.responses, sampled.response_mask).to(queries.device)
    normalised = models.scorer.normalise(raw, enabled=cfg.normalise_scores)
    scores = training_scores(normalised, sampled.has_eos, missing_eos_penalty=cfg.missing_eos_penalty,
                             score_clip=cfg.score_clip)
    return Rollout(queries=queries, query_mask=query_mask, responses=sampled.responses,
                   response_mask=sampled.response_mask, logprobs=torch.cat(logprobs),
                   ref_logprobs=torch.cat(ref_logprobs), values=torch.cat(values), scores=scores,
                   raw_scores=raw, has_eos=sampled.has_eos)


def permutation(size: int, *, group: int, generator: torch.Generator | None) -> Tensor:
    """A random order of `size` rows; with `group` > 1, of whole consecutive groups (each kept together, in order),
    so that every minibatch holds whole groups whose prompt can be shared. group 1 draws what it always drew."""
    order = torch.randperm(size // group, generator=generator)
    if group == 1:
        return order
    return (order[:, None] * group + torch.arange(group)).flatten()


def compute_targets(rollout: Rollout, *, cfg: PPOStage, kl_coef: float) -> Targets:
    """KL-penalised per-token rewards with the score on the last response token, then the advantages of
    `cfg.algorithm`: GAE with the value model (ppo), group-relative sequence advantages (grpo, rloo, over
    consecutive groups of samples_per_prompt responses to one prompt), or batch-normalised returns (reinforce_pp).
    """
    mask = rollout.response_mask
    kl = maths.kl_per_token(rollout.logprobs, rollout.ref_logprobs, estimator=cfg.kl_estimator) * mask
    in_reward = kl_coef if cfg.kl_penalty == "reward" else 0.0  # else the KL is a term of the loss (grpo)
    rewards, non_score = maths.penalised_rewards(rollout.scores, kl, mask, kl_coef=in_reward)
    if cfg.algorithm in ("grpo", "rloo"):
        sequence_rewards = rollout.scores + maths.masked_sum(non_score, mask, dim=1)
        if cfg.algorithm == "grpo":
            advantages = maths.group_advantages(sequence_rewards, group_size=cfg.samples_per_prompt,
                                                scale=cfg.scale_rewards)
        else:
            advantages = maths.leave_one_out_advantages(sequence_rewards, group_size=cfg.samples_per_prompt)
        advantages = maths.per_token(advantages, mask)
        return Targets(kl=kl, non_score_rewards=non_score, rewards=rewards, advantages=advantages,
                       returns=advantages)
    if cfg.whiten_rewards:
        rewards = maths.masked_whiten(rewards, mask, shift_mean=False)
    if cfg.algorithm == "reinforce_pp":  # the returns, normalised over the whole batch, are the advantages
        returns = maths.discounted_returns(rewards, mask, gamma=cfg.gamma)
        return Targets(kl=kl, non_score_rewards=non_score, rewards=rewards,
                       advantages=maths.masked_whiten(returns, mask) * mask, returns=returns)
    values = rollout.values * mask
    advantages, returns = maths.gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten_advantages:
        advantages = maths.masked_whiten(advantages, mask)
    return Targets(kl=kl, non_score_rewards=non_score, rewards=rewards, advantages=advantages * mask,
                   returns=returns)


@dataclass
class UpdateStats:
    """Means over every micro batch of one PPO step."""

    policy_loss: float
    value_loss: float  # NaN without a value model
    kl_loss: float  # the KL term of the loss (kl_penalty: loss); 0 otherwise
    policy_clipfrac: float
    value_clipfrac: float  # NaN without a value model
    approx_kl: float
    entropy: float
    ratio: float
    grad_norm: float


def ppo_update(model: nn.Module, optimizer: torch.optim.Optimizer, rollout: Rollout, targets: Targets, *,
               cfg: PPOStage, plan: BatchPlan, backward: Callable[[Tensor], None], kl_coef: float,
               clip_grad: Callable[[], float], accumulate: Callable[[], AbstractContextManager] = nullcontext,
               generator: torch.Generator | None = None) -> UpdateStats:
    """K epochs over fresh permutations of the rollout; each minibatch is one optimiser step made of
    `plan.accumulation_steps` micro batches. From accelerate, built with gradient_accumulation_steps =
    plan.accumulation_steps: `accumulate` (wraps each micro batch: gradients sync, and DeepSpeed steps, on the
    last), `backward` (divides the loss by the accumulation steps) and `clip_grad`."""
    sums: dict[str, list[float]] = {name: [] for name in UpdateStats.__dataclass_fields__}
    device = rollout.queries.device
    group = plan.prefix_group
    for epoch in range(plan.ppo_epochs):
        order = permutation(rollout.size, group=group, generator=generator).to(device)
        for mb_start in range(0, rollout.size, plan.mini_batch_size):
            mb_rows = order[mb_start:mb_start + plan.mini_batch_size]
            for start in range(0, len(mb_rows), plan.micro_batch_size):
                batch = minibatch(rollout, targets, mb_rows[start:start + plan.micro_batch_size])
                with accumulate():
                    stats = _micro_step(model, batch, cfg=cfg, backward=backward, kl_coef=kl_coef,
                                        with_entropy=epoch == 0, group=group)
                for name, value in stats.items():
                    sums[name].append(value)
            sums["grad_norm"].append(clip_grad())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    # An fp16 step skipped for overflow reports an infinite norm: the mean is over the steps taken.
    sums["grad_norm"] = [norm for norm in sums["grad_norm"] if math.isfinite(norm)] or [math.nan]
    return UpdateStats(**{name: float(sum(v) / len(v)) for name, v in sums.items()})


def _micro_step(model: nn.Module, batch, *, cfg: PPOStage, backward: Callable[[Tensor], None], kl_coef: float,
                with_entropy: bool, group: int = 1) -> dict[str, float]:
    """One forward/backward pass; the entropy (a full softmax, as costly as the output head on a small
    model) is measured in the first epoch only, where it is the entropy of the policy that sampled."""
    width = batch.query_width
    logits, values = model(batch.sequences, batch.attention_mask, query_width=width, group=group)
    mask = batch.response_mask
    logprobs = maths.logprobs_from_logits(logits, batch.sequences[:, width:], temperature=cfg.temperature)
    policy = maths.policy_loss(logprobs, batch.logprobs, batch.advantages, mask, cliprange=cfg.cliprange)
    loss, nan = policy.loss, torch.tensor(float("nan"), device=logprobs.device)
    stats = {"policy_loss": policy.loss, "value_loss": nan, "kl_loss": torch.zeros_like(nan),
             "policy_clipfrac": policy.clipfrac, "value_clipfrac": nan, "approx_kl": policy.approx_kl,
             "ratio": policy.ratio_mean}
    if values is not None:
        value = maths.value_loss(values, batch.values, batch.returns, mask, cliprange_value=cfg.cliprange_value)
        loss = loss + cfg.vf_coef * value.loss
        stats.update(value_loss=value.loss, value_clipfrac=value.clipfrac)
    if cfg.kl_penalty == "loss":  # GRPO's k3 estimate of KL(policy || reference), as a term of the loss
        kl = maths.masked_mean(maths.kl_per_token(logprobs, batch.ref_logprobs, estimator="k3"), mask)
        loss = loss + kl_coef * kl
        stats["kl_loss"] = kl
    if cfg.entropy_coef > 0:  # the bonus needs the entropy's gradient, in every epoch
        entropy = maths.masked_mean(maths.entropy_from_logits(logits, temperature=cfg.temperature), mask)
        loss = loss - cfg.entropy_coef * entropy
        if with_entropy:
            stats["entropy"] = entropy
    backward(loss)
    if with_entropy and "entropy" not in stats:
        with torch.no_grad():
            entropy = maths.entropy_from_logits(logits.detach(), temperature=cfg.temperature)
            stats["entropy"] = maths.masked_mean(entropy, mask)
    # One copy to the host per micro batch (each .item() would wait for the device on its own).
    return dict(zip(stats, torch.stack([v.detach().float() for v in stats.values()]).tolist()))
