"""Micro batches cut to the columns their rows use (rlhf/core/rollout.py `minibatch`): which columns go, by hand,
and that a real model's PPO loss and gradients on the cut batch equal those on the rollout-wide one."""

from __future__ import annotations

import torch

from rlhf.core import maths
from rlhf.core.rollout import Rollout, Targets, minibatch
from rlhf.pipeline.config import TinyModelSpec
from rlhf.training.ppo.models import response_logits
from rlhf.training.tiny import build_model, build_tokenizer

PAD = 0


def rollout(prompt_lengths: list[int], response_lengths: list[int], *, tq: int = 6, tr: int = 5,
            vocab: int = 50) -> tuple[Rollout, Targets]:
    """Left-padded prompts and right-padded responses of the given lengths, random ids and targets."""
    g = torch.Generator().manual_seed(0)
    b = len(prompt_lengths)
    queries = torch.full((b, tq), PAD)
    query_mask = torch.zeros(b, tq, dtype=torch.long)
    responses = torch.full((b, tr), PAD)
    response_mask = torch.zeros(b, tr, dtype=torch.bool)
    for row, (p, r) in enumerate(zip(prompt_lengths, response_lengths)):
        queries[row, tq - p:] = torch.randint(1, vocab, (p,), generator=g)
        query_mask[row, tq - p:] = 1
        responses[row, :r] = torch.randint(1, vocab, (r,), generator=g)
        response_mask[row, :r] = True
    noise = lambda: torch.randn(b, tr, generator=g) * response_mask  # noqa: E731
    data = Rollout(queries=queries, query_mask=query_mask, responses=responses, response_mask=response_mask,
                   logprobs=-noise().abs() - 1, ref_logprobs=-noise().abs() - 1, values=noise(),
                   scores=torch.zeros(b), raw_scores=torch.zeros(b), has_eos=torch.ones(b, dtype=torch.bool))
    targets = Targets(kl=noise(), non_score_rewards=noise(), rewards=noise(), advantages=noise(), returns=noise())
    return data, targets


def test_a_micro_batch_keeps_only_the_columns_its_rows_use():
    data, targets = rollout([6, 2, 3, 4], [5, 1, 2, 3])  # the rollout: prompts up to 6, responses up to 5
    batch = minibatch(data, targets, torch.tensor([1, 2]))  # prompts 2 and 3 tokens, responses 1 and 2
    assert batch.query_width == 3 and batch.sequences.shape == (2, 5)  # 3 prompt columns, 2 response columns
    assert torch.equal(batch.sequences, data.sequences[[1, 2]][:, 3:8])
    assert torch.equal(batch.attention_mask, torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]]))
    for name in ("response_mask", "logprobs", "ref_logprobs", "values"):
        assert torch.equal(getattr(batch, name), getattr(data, name)[[1, 2]][:, :2]), name
    for name in ("advantages", "returns"):
        assert torch.equal(getattr(batch, name), getattr(targets, name)[[1, 2]][:, :2]), name
    whole = minibatch(data, targets, torch.tensor([0, 3]))  # a row using every column: nothing is cut
    assert whole.query_width == 6 and whole.sequences.shape == (2, 11)


def test_the_cut_batch_gives_the_same_loss_and_gradients_as_the_rollout_wide_one():
    tokenizer = build_tokenizer(["the cat sat on the mat", "a dog ran"] * 20, vocab_size=300)
    spec = TinyModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2)
    model = build_model(spec, tokenizer, seed=0)
    data, targets = rollout([6, 2, 3, 4], [5, 1, 2, 3], vocab=len(tokenizer))
    rows = torch.tensor([1, 2, 3])
    cut = minibatch(data, targets, rows)
    full = dict(sequences=data.sequences[rows], attention_mask=data.attention_mask[rows],
                response_mask=data.response_mask[rows], logprobs=data.logprobs[rows],
                advantages=targets.advantages[rows], query_width=data.queries.shape[1])
    assert cut.sequences.shape[1] < full["sequences"].shape[1]

    def loss_and_grads(sequences, attention_mask, response_mask, logprobs, advantages, query_width):
        model.zero_grad(set_to_none=True)
        logits = response_logits(model, sequences, attention_mask, query_width=query_width)
        new = maths.logprobs_from_logits(logits, sequences[:, query_width:])
        loss = maths.policy_loss(new, logprobs, advantages, response_mask, cliprange=0.2).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = loss_and_grads(cut.sequences, cut.attention_mask, cut.response_mask, cut.logprobs,
                                 cut.advantages, cut.query_width)
    full_loss, full_grads = loss_and_grads(**full)
    assert loss.abs() > 0 and torch.allclose(loss, full_loss, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, full_grads))
