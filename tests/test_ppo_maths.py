"""PPO maths by hand: each expected value is worked out in the comments beside it."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf.core import maths
from rlhf.core.maths import (
    AdaptiveKLController,
    entropy_from_logits,
    gae,
    has_stop,
    kl_per_token,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    penalised_rewards,
    policy_loss,
    response_mask,
    value_loss,
)

E = math.e


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=1e-5)


# --- log-probs and entropy ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_logprobs_match_log_softmax(temperature):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=generator)
    tokens = torch.randint(0, 5, (2, 3), generator=generator)
    reference = torch.log_softmax(logits / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    close(logprobs_from_logits(logits, tokens, temperature=temperature), reference)


def test_logprobs_by_hand_with_temperature():
    # logits [2 ln 3, 0] / 2 = [ln 3, 0] -> softmax [3/4, 1/4]
    logits = torch.tensor([[[2 * math.log(3.0), 0.0], [2 * math.log(3.0), 0.0]]])
    tokens = torch.tensor([[0, 1]])
    close(logprobs_from_logits(logits, tokens, temperature=2.0), [[math.log(0.75), math.log(0.25)]])


def test_logprobs_upcast_to_float32():
    logits = torch.zeros(1, 2, 4, dtype=torch.bfloat16)
    out = logprobs_from_logits(logits, torch.tensor([[0, 3]]))
    assert out.dtype == torch.float32
    close(out, [[-math.log(4.0)] * 2])  # uniform over 4


def test_entropy():
    # uniform over V = 5 at any temperature: H = log 5
    close(entropy_from_logits(torch.full((1, 3, 5), 1.7), temperature=0.5), [[math.log(5.0)] * 3])
    # p = [3/4, 1/4]: H = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335
    close(entropy_from_logits(torch.tensor([[[math.log(3.0), 0.0]]])), [[0.562335]])


# --- masked statistics -------------------------------------------------------------------------------------------

def test_masked_sum_and_mean():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    close(masked_sum(values, mask), 3.0)  # 1 + 2
    close(masked_mean(values, mask), 1.5)  # (1 + 2) / 2
    close(masked_mean(values, mask, dim=1), [1.5, 0.0])  # the empty row gives 0, not NaN
    close(masked_mean(values, mask.bool(), dim=0), [1.0, 2.0, 0.0])  # per column; a bool mask works too


def test_masked_mean_of_empty_mask_is_zero():
    out = masked_mean(torch.tensor([[float("nan"), 2.0]]), torch.zeros(1, 2, dtype=torch.bool))
    assert out.item() == 0.0


def test_masked_var():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean 2, squared deviations 1 + 0 + 1 = 2: unbiased 2 / 2 = 1, biased 2 / 3
    close(masked_var(values, mask), 1.0)
    close(masked_var(values, mask, unbiased=False), 2 / 3)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(values, torch.tensor([[1, 0, 0, 0]]))


def test_masked_whiten_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean 2, unbiased var 1: (x - 2) / 1 on the mask, 0 off it
    close(masked_whiten(values, mask), [[-1.0, 0.0, 1.0, 0.0]])
    # shift_mean=False adds the mean back: scale only
    close(masked_whiten(values, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(-100, 100), st.booleans()), min_size=2, max_size=12))
def test_masked_whiten_invariants(entries):
    values = torch.tensor([[v for v, _ in entries]], dtype=torch.float64)
    mask = torch.tensor([[m for _, m in entries]])
    kept = values[mask]
    if kept.numel() < 2 or kept.var() < 1e-3:
        return  # whitening needs two distinct values; 1e-8 dominates a near-zero variance
    whitened = masked_whiten(values, mask)
    assert torch.all(whitened[~mask] == 0)
    close(whitened[mask].mean(), 0.0, atol=1e-6)
    close(whitened[mask].var(), 1.0, atol=1e-4)
    close(masked_whiten(values, mask, shift_mean=False)[mask].mean(), kept.mean().item(), atol=1e-6)


# --- KL estimators -----------------------------------------------------------------------------------------------

def test_kl_estimators_by_hand():
    logprobs = torch.tensor([math.log(0.5), math.log(0.25)])
    ref_logprobs = torch.tensor([math.log(0.25), math.log(0.5)])
    # k1 = log p - log q: log 2, -log 2
    close(kl_per_token(logprobs, ref_logprobs, estimator="k1"), [math.log(2), -math.log(2)])
    # k2 = (log 2)^2 / 2 both ways
    close(kl_per_token(logprobs, ref_logprobs, estimator="k2"), [0.5 * math.log(2) ** 2] * 2)
    # k3 with r = q / p: r = 1/2 -> -1/2 + log 2 = 0.193147; r = 2 -> 1 - log 2 = 0.306853
    close(kl_per_token(logprobs, ref_logprobs, estimator="k3"), [math.log(2) - 0.5, 1 - math.log(2)])


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_is_exactly_zero_when_policies_agree(estimator):
    logprobs = torch.tensor([[-0.1, -2.3, -7.0]])
    assert torch.equal(kl_per_token(logprobs, logprobs.clone(), estimator=estimator), torch.zeros(1, 3))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(-20, 0), st.floats(-20, 0)), min_size=1, max_size=8))
def test_k3_is_non_negative(pairs):
    logprobs, ref_logprobs = torch.tensor(pairs, dtype=torch.float64).T
    assert torch.all(kl_per_token(logprobs, ref_logprobs, estimator="k3") >= 0)


def test_unknown_kl_estimator_names_the_allowed_ones():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_per_token(torch.zeros(2), torch.zeros(2), estimator="k4")


# --- rewards -----------------------------------------------------------------------------------------------------

def test_last_token_index():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    assert last_token_index(mask).tolist() == [1, 2, 0]  # the empty row gives 0


def test_penalised_rewards_put_the_score_on_the_last_real_token():
    scores = torch.tensor([2.0, 5.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards, non_score = penalised_rewards(scores, kl, mask, kl_coef=0.5)
    # -0.5 * kl on the mask, 0 off it
    close(non_score, [[-0.05, -0.1, 0.0], [-0.05, -0.1, -0.15]])
    # row 0 ends at t=1: -0.1 + 2 = 1.9; row 1 ends at t=2: -0.15 + 5 = 4.85
    close(rewards, [[-0.05, 1.9, 0.0], [-0.05, -0.1, 4.85]])


def test_penalised_rewards_skip_the_score_of_an_empty_row():
    rewards, _ = penalised_rewards(torch.tensor([3.0]), torch.ones(1, 3), torch.zeros(1, 3), kl_coef=0.1)
    close(rewards, [[0.0, 0.0, 0.0]])


# --- GAE ---------------------------------------------------------------------------------------------------------

def test_gae_with_gamma_and_lam_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    # reward-to-go [6, 5, 3]; minus values -> [5.5, 4, 1.5]
    close(returns, [[6.0, 5.0, 3.0]])
    close(advantages, [[5.5, 4.0, 1.5]])


def test_gae_by_hand_with_discounting_and_padding():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 9.0], [0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 7.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    advantages, returns = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    # row 0, t=3 is padding (A = 0, V = 0 after the last token); gamma * lam = 0.25
    #   t=2: delta = 3 + 0.5*0 - 1.5 = 1.5;   A = 1.5
    #   t=1: delta = 2 + 0.5*1.5 - 1 = 1.75;  A = 1.75 + 0.25*1.5 = 2.125
    #   t=0: delta = 1 + 0.5*1 - 0.5 = 1.0;   A = 1.0 + 0.25*2.125 = 1.53125
    # row 1, values 0 so delta = r: A = [0.25^3, 0.25^2, 0.25, 1]
    close(advantages, [[1.53125, 2.125, 1.5, 0.0], [0.015625, 0.0625, 0.25, 1.0]])
    # returns = A + V, and 0 where padded
    close(returns, [[2.03125, 3.125, 3.0, 0.0], [0.015625, 0.0625, 0.25, 1.0]])


# --- losses ------------------------------------------------------------------------------------------------------

def test_policy_loss_at_the_rollout_policy():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]])
    advantages = torch.tensor([[1.0, -2.0, 4.0]])
    out = policy_loss(logprobs, logprobs.clone(), advantages, torch.tensor([[1, 1, 0]]), cliprange=0.2)
    # ratio = 1 everywhere, so loss = -mean(A) over the mask = -(1 - 2) / 2 = 0.5
    close(out.loss, 0.5)
    close(out.clipfrac, 0.0)
    close(out.approx_kl, 0.0)
    close(out.ratio_mean, 1.0)


def test_policy_loss_clips_a_ratio_of_e():
    old_logprobs = torch.tensor([[-2.0, -2.0]])
    logprobs = (old_logprobs + 1.0).requires_grad_()  # log ratio 1, so ratio = e
    advantages = torch.tensor([[1.0, -1.0]])
    out = policy_loss(logprobs, old_logprobs, advantages, torch.ones(1, 2), cliprange=0.2)
    # A = +1: max(-e, -1.2) = -1.2 (clipped); A = -1: max(e, 1.2) = e (not clipped)
    close(out.loss, (-1.2 + E) / 2)
    close(out.clipfrac, 0.5)
    close(out.approx_kl, 0.5)  # 0.5 * 1^2
    close(out.ratio_mean, E)
    # the clipped token gets no gradient; the other gets d(ratio)/d(logprob) / 2 = e / 2
    out.loss.backward()
    close(logprobs.grad, [[0.0, E / 2]])


def test_value_loss_by_hand():
    old_values = torch.tensor([[1.0, 1.0, 1.0]])
    values = torch.tensor([[2.0, 1.25, 3.0]])
    returns = torch.tensor([[3.0, 0.0, 1.5]])
    out = value_loss(values, old_values, returns, torch.ones(1, 3), cliprange_value=0.5)
    # clipped values [1.5, 1.25, 1.5]
    # unclipped errors [1, 1.5625, 2.25]; clipped errors [2.25, 1.5625, 0]; max [2.25, 1.5625, 2.25]
    # loss = 0.5 * 6.0625 / 3; only t=0 has clipped > unclipped
    close(out.loss, 0.5 * 6.0625 / 3)
    close(out.clipfrac, 1 / 3)


# --- response masks ----------------------------------------------------------------------------------------------

def test_response_mask_and_has_stop():
    responses = torch.tensor([[5, 2, 7, 2], [2, 5, 5, 5], [5, 6, 7, 8], [5, 9, 2, 1]])
    # stop in the middle (kept, rest dropped; a second stop is ignored), at t=0, absent, and a second stop id
    expected = [[True, True, False, False], [True, False, False, False], [True] * 4, [True, True, False, False]]
    assert response_mask(responses, stop_token_ids=[2, 9]).tolist() == expected
    assert has_stop(responses, stop_token_ids=(2, 9)).tolist() == [True, True, False, True]


def test_response_mask_needs_a_stop_token():
    with pytest.raises(ValueError, match="stop_token_ids is empty"):
        response_mask(torch.zeros(1, 3, dtype=torch.long), stop_token_ids=[])


# --- adaptive KL -------------------------------------------------------------------------------------------------

def test_kl_controller_is_fixed_without_a_target():
    controller = AdaptiveKLController(value=0.1, target=None, horizon=100)
    controller.update(5.0, n_steps=10)
    assert controller.value == 0.1


def test_kl_controller_adapts_and_clips_at_twenty_percent():
    controller = AdaptiveKLController(value=0.1, target=6.0, horizon=100)
    controller.update(6.6, n_steps=10)  # error 6.6/6 - 1 = 0.1: beta *= 1 + 0.1 * 10/100
    assert controller.value == pytest.approx(0.101)
    controller = AdaptiveKLController(value=0.1, target=6.0, horizon=100)
    controller.update(60.0, n_steps=100)  # error 9 clipped to 0.2: beta *= 1.2
    assert controller.value == pytest.approx(0.12)
    controller.update(0.0, n_steps=50)  # error -1 clipped to -0.2: beta *= 1 - 0.2 * 0.5
    assert controller.value == pytest.approx(0.108)


def test_kl_controller_state_round_trip():
    controller = AdaptiveKLController(value=0.2, target=6.0, horizon=1000)
    controller.update(7.0, n_steps=64)
    restored = AdaptiveKLController(value=0.05, target=None, horizon=1)
    restored.load_state_dict(controller.state_dict())
    assert restored == controller
    with pytest.raises(KeyError, match="horizon"):
        restored.load_state_dict({"value": 0.1, "target": 6.0})
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(value=0.1, target=6.0, horizon=0)


# -- critic-free estimators (GRPO, RLOO, REINFORCE++) ---------------------------------------------------------------


def test_group_advantages_by_hand():
    # Two groups of 3. Group 1: [1, 2, 3], mean 2, sample std 1 -> [-1, 0, 1]. Group 2: [4, 4, 7], mean 5,
    # sample std sqrt((1 + 1 + 4) / 2) = sqrt(3) -> [-1, -1, 2] / sqrt(3).
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 7.0])
    got = maths.group_advantages(rewards, group_size=3, scale=True, eps=0.0)
    expected = torch.tensor([-1.0, 0.0, 1.0, -1 / 3 ** 0.5, -1 / 3 ** 0.5, 2 / 3 ** 0.5])
    assert torch.allclose(got, expected)
    unscaled = maths.group_advantages(rewards, group_size=3, scale=False)
    assert torch.allclose(unscaled, torch.tensor([-1.0, 0.0, 1.0, -1.0, -1.0, 2.0]))


def test_group_advantages_of_a_flat_group_are_zero_not_nan():
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0, 2.0, 3.0, 4.0])
    got = maths.group_advantages(rewards, group_size=4, scale=True)
    assert torch.equal(got[:4], torch.zeros(4)) and torch.isfinite(got).all()
    assert maths.flat_groups(rewards, group_size=4) == 1
    assert maths.flat_groups(rewards, group_size=2) == 2  # [0.5, 0.5] twice; [1, 2] and [3, 4] carry signal


def test_leave_one_out_advantages_by_hand():
    # Group [1, 2, 6]: 1 - (2 + 6) / 2 = -3; 2 - (1 + 6) / 2 = -1.5; 6 - (1 + 2) / 2 = 4.5.
    # Group [0, 4]: 0 - 4 = -4; 4 - 0 = 4.
    got = maths.leave_one_out_advantages(torch.tensor([1.0, 2.0, 6.0]), group_size=3)
    assert torch.allclose(got, torch.tensor([-3.0, -1.5, 4.5]))
    assert torch.allclose(maths.leave_one_out_advantages(torch.tensor([0.0, 4.0]), group_size=2),
                          torch.tensor([-4.0, 4.0]))
    rewards = torch.tensor([1.0, 2.0, 6.0])  # = G / (G - 1) x (r - mean): 3/2 x [-2, -1, 3]
    assert torch.allclose(maths.leave_one_out_advantages(rewards, group_size=3), 1.5 * (rewards - rewards.mean()))


def test_discounted_returns_by_hand():
    # Row 1, gamma 0.5, rewards [1, 2, 4]: G2 = 4, G1 = 2 + 0.5 x 4 = 4, G0 = 1 + 0.5 x 4 = 3.
    # Row 2 stops after two tokens: rewards [1, 3, (9 masked)] -> G1 = 3, G0 = 1 + 1.5 = 2.5, and 0 after.
    rewards = torch.tensor([[1.0, 2.0, 4.0], [1.0, 3.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    got = maths.discounted_returns(rewards, mask, gamma=0.5)
    assert torch.allclose(got, torch.tensor([[3.0, 4.0, 4.0], [2.5, 3.0, 0.0]]))


def test_reinforce_pp_returns_of_penalised_rewards_are_the_gae_of_a_zero_critic():
    """With gamma = 1 and lam = 1, GAE against zero values is the reward-to-go: REINFORCE++ is PPO's targets
    without the critic."""
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    rewards, _ = maths.penalised_rewards(torch.tensor([1.0, -2.0]), torch.rand(2, 4), mask, kl_coef=0.1)
    advantages, _ = maths.gae(rewards, torch.zeros(2, 4), mask, gamma=1.0, lam=1.0)
    assert torch.allclose(maths.discounted_returns(rewards, mask, gamma=1.0), advantages)


def test_per_token_spreads_a_sequence_value_over_its_response():
    got = maths.per_token(torch.tensor([2.0, -1.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert torch.equal(got, torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))
