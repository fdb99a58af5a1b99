"""PPO maths for RLHF: log-probs, masked statistics, KL estimators, rewards, GAE and the clipped losses.

Pure functions on tensors, no models and no config, so each is tested by hand in tests/test_ppo_maths.py.
Shapes: B = batch of responses, T = response tokens (right-padded), V = vocabulary.
Written by hand because no maintained library exposes these as small functions we can call from our loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3")


def logprobs_from_logits(logits: Tensor, tokens: Tensor, *, temperature: float = 1.0) -> Tensor:
    """log p(token) under softmax(logits / temperature): logits (B, T, V), tokens (B, T) -> (B, T) float32.

    Gathers the token's logit and subtracts logsumexp rather than keeping a full log_softmax copy.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    token_logits = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return token_logits - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature): (B, T, V) -> (B, T) float32.

    H = logsumexp(z) - sum_v p_v z_v, which avoids log(0) where p underflows.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of values where mask is true (mask bool or 0/1, same shape), over `dim` or everything."""
    masked = torch.where(mask.bool(), values, torch.zeros_like(values))
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of values where mask is true, over `dim` or everything; 0 (not NaN) where the mask is empty."""
    count = mask.bool().to(values.dtype)
    count = count.sum() if dim is None else count.sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: Tensor, mask: Tensor, *, unbiased: bool = True) -> Tensor:
    """Variance of all masked entries (a scalar); Bessel-corrected when `unbiased`."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = int(mask.bool().sum())
        if count < 2:
            raise ValueError(f"unbiased masked variance needs at least 2 masked entries, got {count}")
        var = var * count / (count - 1)
    return var


def masked_whiten(values: Tensor, mask: Tensor, *, shift_mean: bool = True) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries; same shape, 0 where the mask is false.

    With shift_mean=False the mean is added back, so only the scale changes (TRL does this for rewards).
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask, unbiased=True)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, *, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || ref) from tokens sampled by the policy; same shape as the inputs.

    k1 = log p - log q (unbiased, can be negative); k2 = (log p - log q)^2 / 2 (biased, low variance);
    k3 = (r - 1) - log r with r = q / p (unbiased and non-negative). Schulman, "Approximating KL divergence" (2020).
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k2":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    if estimator == "k3":
        log_ratio = ref_logprobs - logprobs  # log r
        return torch.expm1(log_ratio) - log_ratio  # expm1 keeps precision when r is close to 1
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last true entry of each row: mask (B, T) -> (B,) long. Rows with no true entry give 0.

    Callers that must tell an empty row from a one-token row check `mask.any(-1)`.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).amax(dim=-1)
    return last.clamp(min=0)


def penalised_rewards(scores: Tensor, kl: Tensor, mask: Tensor, *, kl_coef: float) -> tuple[Tensor, Tensor]:
    """Per-token rewards: scores (B,), kl (B, T), mask (B, T) -> (rewards (B, T), non_score_rewards (B, T)).

    R_t = -kl_coef * kl_t, plus the reward model's score at the last real token (Ziegler et al. 2019, eq. 2;
    Huang et al. 2024, "The N+ implementation details of RLHF with PPO"). Rows with an empty mask get no score,
    so every entry of theirs is 0.
    """
    non_score_rewards = torch.where(mask.bool(), -kl_coef * kl, torch.zeros_like(kl))
    score = torch.where(mask.bool().any(dim=-1), scores.to(kl.dtype), torch.zeros_like(scores, dtype=kl.dtype))
    last = last_token_index(mask).unsqueeze(-1)
    rewards = non_score_rewards.scatter_add(-1, last, score.unsqueeze(-1))
    return rewards, non_score_rewards


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation: rewards, values, mask (B, T) -> (advantages, returns), both (B, T).

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1}   (Schulman et al. 2016, eq. 16).
    The step after the last real token (or after T) is terminal: V = 0 and A = 0 there, and both outputs are 0
    where the mask is false. returns = advantages + values are the value targets.
    """
    keep = mask.bool()
    rewards = torch.where(keep, rewards, torch.zeros_like(rewards))
    values = torch.where(keep, values, torch.zeros_like(values))
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):  # T is a response length, small enough to loop over
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = torch.where(keep[:, t], delta + gamma * lam * next_advantage, torch.zeros_like(delta))
        next_value = values[:, t]
        advantages[:, t] = next_advantage
    return advantages, advantages + values


def group_advantages(rewards: Tensor, *, group_size: int, scale: bool, eps: float = 1e-6) -> Tensor:
    """GRPO's outcome advantages (Shao et al. 2024, DeepSeekMath, section 4.1.2): rewards (B,) of B / G groups of
    G consecutive responses to one prompt -> (B,) advantages (r - mean of the group) / (std of the group + eps),
    or r - mean of the group without `scale` (Liu et al. 2025, "Understanding R1-Zero-like training": the std
    weights prompts by how easy they are). The std is the sample std (n - 1), as in TRL's GRPOTrainer."""
    grouped = rewards.reshape(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def leave_one_out_advantages(rewards: Tensor, *, group_size: int) -> Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024, "Back to basics", eq. 5): each response's reward minus the mean
    reward of the other G - 1 responses to the same prompt; rewards (B,) in groups of G consecutive rows -> (B,).
    Equal to G / (G - 1) x (r - mean of the group)."""
    grouped = rewards.reshape(-1, group_size)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(-1)


def flat_groups(rewards: Tensor, *, group_size: int) -> int:
    """Groups whose responses all got the same reward: their group-relative advantages are all zero, so they
    teach nothing this step."""
    grouped = rewards.reshape(-1, group_size)
    return int((grouped.amax(dim=1) == grouped.amin(dim=1)).sum())


def discounted_returns(rewards: Tensor, mask: Tensor, *, gamma: float) -> Tensor:
    """Returns G_t = sum over s >= t of gamma^(s - t) r_s within the response: rewards, mask (B, T) -> (B, T), 0
    outside the mask. REINFORCE++ (Hu 2025) uses the returns of the KL-penalised per-token rewards, with no
    critic, as advantages once normalised over the whole batch."""
    keep = mask.bool()
    rewards = torch.where(keep, rewards, torch.zeros_like(rewards))
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(keep[:, t], rewards[:, t] + gamma * running, torch.zeros_like(running))
        returns[:, t] = running
    return returns


def per_token(sequence_values: Tensor, mask: Tensor) -> Tensor:
    """A value per sequence (B,) on every token of its response (B, T), 0 outside the mask."""
    return torch.where(mask.bool(), sequence_values.unsqueeze(-1).to(torch.float32), torch.zeros(mask.shape,
                                                                                                  device=mask.device))


@dataclass(frozen=True)
class PolicyLossOut:
    """Clipped policy loss and its diagnostics; the diagnostics are detached scalars for logging."""

    loss: Tensor  # scalar, differentiable
    clipfrac: Tensor  # fraction of tokens where the clipped objective was the one used
    approx_kl: Tensor  # mean (log pi - log pi_old)^2 / 2 between the rollout policy and now
    ratio_mean: Tensor  # mean pi / pi_old


@dataclass(frozen=True)
class ValueLossOut:
    """Clipped value loss and the fraction of tokens where clipping decided it."""

    loss: Tensor  # scalar, differentiable
    clipfrac: Tensor  # detached scalar


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                cliprange: float) -> PolicyLossOut:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), negated to minimise; all inputs (B, T).

    Token-level mean over the mask, as in TRL and Huang et al. 2024 ("The N+ implementation details of RLHF
    with PPO").
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(ratio.dtype), mask)
        approx_kl = masked_mean(0.5 * log_ratio ** 2, mask)
        ratio_mean = masked_mean(ratio, mask)
    return PolicyLossOut(loss=loss, clipfrac=clipfrac, approx_kl=approx_kl, ratio_mean=ratio_mean)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *,
               cliprange_value: float) -> ValueLossOut:
    """Clipped value loss, 0.5 * max((V - R)^2, (V_clip - R)^2) over the mask; all inputs (B, T).

    V_clip keeps the new value within cliprange_value of the rollout's (OpenAI baselines; Huang et al. 2024).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_error > unclipped_error).to(values.dtype), mask)
    return ValueLossOut(loss=loss, clipfrac=clipfrac)


def _is_stop(responses: Tensor, stop_token_ids: list[int] | tuple[int, ...]) -> Tensor:
    if len(stop_token_ids) == 0:
        raise ValueError("stop_token_ids is empty; pass at least the tokenizer's eos_token_id")
    return torch.isin(responses, torch.tensor(list(stop_token_ids), device=responses.device))


def response_mask(responses: Tensor, *, stop_token_ids: list[int] | tuple[int, ...]) -> Tensor:
    """Real tokens of sampled responses: (B, T) ids -> (B, T) bool, true up to and including the first stop token.

    Rows without a stop token are all true (truncated at T).
    """
    is_stop = _is_stop(responses, stop_token_ids)
    stops_before = torch.cumsum(is_stop.long(), dim=-1) - is_stop.long()
    return stops_before == 0


def has_stop(responses: Tensor, *, stop_token_ids: list[int] | tuple[int, ...]) -> Tensor:
    """Whether each sampled response contains a stop token: (B, T) ids -> (B,) bool."""
    return _is_stop(responses, stop_token_ids).any(dim=-1)


@dataclass
class AdaptiveKLController:
    """The KL coefficient beta, adapted towards a target KL (Ziegler et al. 2019, sec. 2.2).

    With target=None it is a fixed coefficient.
    """

    value: float  # current kl_coef
    target: float | None  # target KL per response, in nats; None keeps value fixed
    horizon: int  # samples over which a KL error of 20% or more changes beta by 20%

    def __post_init__(self) -> None:
        if self.horizon <= 0:
            raise ValueError(f"AdaptiveKLController.horizon must be positive, got {self.horizon}")

    def update(self, current_kl: float, n_steps: int) -> None:
        """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)."""
        if self.target is None:
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        missing = {"value", "target", "horizon"} - set(state)
        if missing:
            raise KeyError(f"KL controller state lacks {sorted(missing)}; got keys {sorted(state)}")
        self.value, self.target, self.horizon = float(state["value"]), state["target"], int(state["horizon"])
