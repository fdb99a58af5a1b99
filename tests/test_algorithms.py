"""The critic-free algorithms on our trainer (GRPO, RLOO, REINFORCE++): their targets on hand-made rollouts, the
batch checks, and end-to-end runs on the tiny task that must raise the gold score without a value model.

    .venv/bin/python -m pytest -q tests/test_algorithms.py           # -m "not slow": the fast half
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.core.rollout import Rollout
from rlhf.errors import ConfigError
from rlhf.pipeline.config import load_pipeline
from rlhf.pipeline.registry import Registry
from rlhf.stages import ppo
from rlhf.training.ppo.plan import plan_batches
from rlhf.training.ppo.steps import compute_targets

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "pipelines" / "tiny.yaml"


def settings(*overrides: str):
    pipeline, _ = load_pipeline(TINY, list(overrides))
    return pipeline.ppo


def rollout(scores: list[float], *, logprobs: torch.Tensor | None = None) -> Rollout:
    """Responses of 3 tokens (the last row stops after 2), policy equal to the reference unless `logprobs`."""
    b = len(scores)
    mask = torch.ones(b, 3, dtype=torch.bool)
    mask[-1, 2] = False
    logprobs = torch.full((b, 3), -1.0) if logprobs is None else logprobs
    return Rollout(queries=torch.ones(b, 2, dtype=torch.long), query_mask=torch.ones(b, 2),
                   responses=torch.ones(b, 3, dtype=torch.long), response_mask=mask, logprobs=logprobs,
                   ref_logprobs=torch.full((b, 3), -1.0), values=torch.zeros(b, 3),
                   scores=torch.tensor(scores), raw_scores=torch.tensor(scores),
                   has_eos=torch.ones(b, dtype=torch.bool))


def test_grpo_gives_every_token_its_sequence_advantage_within_its_group():
    cfg = settings("ppo.algorithm=grpo", "ppo.samples_per_prompt=2")
    # Groups [3, 1] and [2, 2]: (3 - 2) / std([3, 1]) = 1 / sqrt(2) and its negative; the flat group gets 0.
    targets = compute_targets(rollout([3.0, 1.0, 2.0, 2.0]), cfg=cfg, kl_coef=0.1)
    a = 1 / 2 ** 0.5
    expected = torch.tensor([[a, a, a], [-a, -a, -a], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(targets.advantages, expected, atol=1e-5)


def test_rloo_puts_the_kl_in_the_sequence_reward():
    cfg = settings("ppo.algorithm=rloo", "ppo.samples_per_prompt=2", "ppo.kl_estimator=k1")
    # The first response's policy is 0.5 nat above the reference on each of 3 tokens: KL 1.5, x kl_coef 0.2 = 0.3.
    # Sequence rewards [1 - 0.3, 1] -> leave-one-out advantages [-0.3, 0.3] on every token.
    logprobs = torch.full((2, 3), -1.0)
    logprobs[0] = -0.5
    targets = compute_targets(rollout([1.0, 1.0], logprobs=logprobs), cfg=cfg, kl_coef=0.2)
    assert torch.allclose(targets.advantages[0], torch.full((3,), -0.3))
    assert torch.allclose(targets.advantages[1, :2], torch.full((2,), 0.3)) and targets.advantages[1, 2] == 0


def test_grpo_with_the_kl_in_the_loss_leaves_it_out_of_the_reward():
    cfg = settings("ppo.algorithm=grpo", "ppo.samples_per_prompt=2", "ppo.kl_penalty=loss")
    logprobs = torch.full((2, 3), -1.0)
    logprobs[0] = -0.5
    targets = compute_targets(rollout([1.0, 1.0], logprobs=logprobs), cfg=cfg, kl_coef=0.2)
    assert torch.equal(targets.advantages, torch.zeros(2, 3))  # equal scores: no signal, whatever the KL
    assert torch.equal(targets.non_score_rewards, torch.zeros(2, 3)) and targets.kl[0].sum() > 0


def test_reinforce_pp_normalises_the_returns_over_the_batch():
    cfg = settings("ppo.algorithm=reinforce_pp")
    targets = compute_targets(rollout([2.0, 0.0, -1.0]), cfg=cfg, kl_coef=0.1)
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[-1, 2] = False
    adv = targets.advantages[mask]
    assert abs(float(adv.mean())) < 1e-5 and float(adv.std()) == pytest.approx(1.0, abs=1e-4)
    assert torch.allclose(targets.returns[0], torch.full((3,), 2.0))  # no KL (policy = reference): the score


@pytest.mark.parametrize("overrides, message", [
    (["ppo.algorithm=grpo"], r"ppo.samples_per_prompt must be at least 2, got 1"),
    (["ppo.algorithm=rloo", "ppo.samples_per_prompt=1"], r"samples_per_prompt must be at least 2"),
    (["ppo.algorithm=grpo", "ppo.samples_per_prompt=3"],
     r"ppo.rollout_batch_size \(64\) must be a multiple of ppo.samples_per_prompt \(3\)"),
])
def test_group_sizes_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan_batches(settings(*overrides), processes=1, where="tiny")


def test_groups_count_as_episodes():
    plan = plan_batches(settings("ppo.algorithm=grpo", "ppo.samples_per_prompt=4"), processes=2, where="tiny")
    assert (plan.prompts_per_step, plan.episodes_per_step) == (16, 128)
    assert "16 prompts x 4 responses" in plan.describe()


@pytest.mark.slow
@pytest.mark.parametrize("algorithm, extra", [
    ("grpo", ["ppo.samples_per_prompt=4"]),
    pytest.param("grpo", ["ppo.samples_per_prompt=4", "ppo.shared_prefix=true"], id="grpo-shared-prefix"),
    ("rloo", ["ppo.samples_per_prompt=4"]),
    ("reinforce_pp", []),
])
def test_critic_free_algorithms_raise_the_gold_score_without_a_value_model(trained_parents, algorithm, extra):
    pipeline, path = load_pipeline(TINY, [f"name=algo-{algorithm}", f"ppo.algorithm={algorithm}", *extra,
                                          f"ppo.sft_parent={trained_parents['sft']}",
                                          f"ppo.rm_parent={trained_parents['rm']}", "ppo.episodes=512",
                                          "ppo.max_eval_prompts=64", "ppo.save_steps=100"])
    entry = ppo.run(pipeline, registry=Registry(trained_parents["home"]), where=str(path))
    m = entry.metrics
    assert entry.status == "complete" and m["eval/gold"] > m["eval/sft_gold"] + 0.25, m
    assert not (Path(entry.path) / "value_model").exists()  # no value model is trained or saved
    rows = [json.loads(line) for line in (Path(entry.path) / "history.jsonl").read_text().splitlines()]
    assert "loss/value" not in rows[0] and "policy/approx_kl" in rows[0]
    assert ("objective/flat_groups" in rows[0]) == (algorithm != "reinforce_pp")
    AutoModelForCausalLM.from_pretrained(entry.path)
