"""`ppo.shared_prefix`: each group's prompt runs once for the responses sampled to it. The logits and gradients must
be those of the full pass (tiny Llama and Qwen2 models, left-padded prompts of different lengths, responses of
different lengths, with and without a LoRA adapter), minibatches must keep groups whole, and the switch must be on
exactly where it can be."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from rlhf.core import maths
from rlhf.errors import ConfigError
from rlhf.pipeline.config import TinyModelSpec, load_pipeline
from rlhf.training.ppo.models import response_logits, shared_prefix_logits
from rlhf.training.ppo.plan import plan_batches
from rlhf.training.ppo.steps import permutation
from rlhf.training.tiny import build_model, build_tokenizer

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "pipelines" / "tiny.yaml"
GROUP = 3


def grouped_batch(prompt_lengths: list[int], response_lengths: list[list[int]], *, vocab: int, tq: int = 7,
                  tr: int = 6):
    """Left-padded prompts, each repeated for its group, and right-padded responses: (sequences, mask, response
    mask, query width)."""
    g = torch.Generator().manual_seed(0)
    rows, masks, response_masks = [], [], []
    for p, lengths in zip(prompt_lengths, response_lengths):
        prompt = torch.zeros(tq, dtype=torch.long)
        prompt[tq - p:] = torch.randint(1, vocab, (p,), generator=g)
        for r in lengths:
            response = torch.zeros(tr, dtype=torch.long)
            response[:r] = torch.randint(1, vocab, (r,), generator=g)
            rows.append(torch.cat([prompt, response]))
            mask = torch.zeros(tq + tr, dtype=torch.long)
            mask[tq - p:tq + r] = 1
            masks.append(mask)
            response_masks.append(mask[tq:].bool())
    return torch.stack(rows), torch.stack(masks), torch.stack(response_masks), tq


def tiny_model(architecture: str = "llama"):
    tokenizer = build_tokenizer(["the cat sat on the mat", "a dog ran far away"] * 20, vocab_size=300)
    spec = TinyModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, architecture=architecture)
    return build_model(spec, tokenizer, seed=0), len(tokenizer)


def loss_and_grads(model, sequences, mask, response_mask, width, *, group: int):
    model.zero_grad(set_to_none=True)
    logits = response_logits(model, sequences, mask, query_width=width, group=group)
    logprobs = maths.logprobs_from_logits(logits, sequences[:, width:])
    weights = torch.linspace(-1, 1, logprobs.numel()).view_as(logprobs)  # a loss every position contributes to
    loss = maths.masked_mean(logprobs * weights, response_mask)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return logits.detach(), loss.detach(), grads


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_shared_prompts_give_the_full_pass_logits_and_gradients(architecture):
    model, vocab = tiny_model(architecture)
    model.train()
    sequences, mask, response_mask, width = grouped_batch([7, 2, 4], [[6, 1, 3], [2, 2, 5], [6, 4, 1]],
                                                          vocab=vocab)
    full_logits, full_loss, full_grads = loss_and_grads(model, sequences, mask, response_mask, width, group=1)
    logits, loss, grads = loss_and_grads(model, sequences, mask, response_mask, width, group=GROUP)
    assert logits.shape == full_logits.shape
    # Only the positions that predict a response token matter (the rest are padding in either pass).
    keep = response_mask.unsqueeze(-1)
    assert torch.allclose(logits * keep, full_logits * keep, atol=1e-5)
    assert loss.abs() > 0 and torch.allclose(loss, full_loss, atol=1e-6)
    assert len(grads) == len(full_grads) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, full_grads))


def test_the_lora_reference_pass_with_the_adapter_off_is_shared_too():
    model, vocab = tiny_model()
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    sequences, mask, response_mask, width = grouped_batch([5, 3], [[2, 6, 4], [1, 3, 6]], vocab=vocab)
    with torch.no_grad():
        adapted = response_logits(peft, sequences, mask, query_width=width, group=GROUP)
        with peft.disable_adapter():
            shared = response_logits(peft, sequences, mask, query_width=width, group=GROUP)
            full = response_logits(peft, sequences, mask, query_width=width)
    keep = response_mask.unsqueeze(-1)
    assert torch.allclose(shared * keep, full * keep, atol=1e-5)
    assert not torch.allclose(adapted * keep, full * keep, atol=1e-3)  # the adapter is live outside the context


def test_rows_that_do_not_split_into_groups_are_refused():
    model, vocab = tiny_model()
    sequences, mask, _, width = grouped_batch([5, 3], [[2, 6, 4], [1, 3, 6]], vocab=vocab)
    with pytest.raises(ValueError, match="6 rows do not split into groups of 4"):
        shared_prefix_logits(model, sequences, mask, query_width=width, group=4)


def test_a_group_permutation_keeps_each_group_whole_and_in_order():
    order = permutation(12, group=3, generator=torch.Generator().manual_seed(1))
    groups = order.view(4, 3)
    assert sorted(order.tolist()) == list(range(12))
    assert all(g.tolist() == [g[0].item(), g[0].item() + 1, g[0].item() + 2] and g[0] % 3 == 0 for g in groups)
    firsts = {tuple(permutation(12, group=3, generator=torch.Generator().manual_seed(seed)).view(4, 3)[:, 0].tolist())
              for seed in range(5)}
    assert len(firsts) > 1  # the groups' order is shuffled


def test_without_groups_the_order_is_the_one_drawn_before():
    assert torch.equal(permutation(10, group=1, generator=torch.Generator().manual_seed(5)),
                       torch.randperm(10, generator=torch.Generator().manual_seed(5)))


def plan(*overrides: str):
    pipeline, _ = load_pipeline(TINY, ["ppo.algorithm=grpo", "ppo.samples_per_prompt=4", *overrides])
    return plan_batches(pipeline.ppo, processes=1, where="tiny.yaml")


def test_auto_shares_long_prompts_only_and_true_or_false_decide():
    assert plan().prefix_group == 1  # tiny: prompts of 32 tokens at most, responses of 24
    assert plan("ppo.max_prompt_length=256").prefix_group == 4
    assert "each prompt's pass shared by its 4 responses" in plan("ppo.max_prompt_length=256").describe()
    assert plan("ppo.shared_prefix=true").prefix_group == 4
    assert plan("ppo.shared_prefix=false", "ppo.max_prompt_length=256").prefix_group == 1
    assert plan("ppo.max_prompt_length=256", "ppo.gradient_checkpointing=true").prefix_group == 1  # auto steps aside
    single = load_pipeline(TINY, ["ppo.shared_prefix=true"])[0].ppo
    assert plan_batches(single, processes=1, where="tiny.yaml").prefix_group == 1  # PPO's one sample: no group


def test_true_with_something_in_the_way_names_each_thing():
    with pytest.raises(ConfigError) as err:
        plan("ppo.shared_prefix=true", "ppo.samples_per_prompt=3", "ppo.rollout_batch_size=48", "ppo.compile=true")
    text = str(err.value)
    assert "tiny.yaml: ppo.shared_prefix" in text
    assert "ppo.mini_batch_size (16) is not a multiple of ppo.samples_per_prompt (3)" in text
    assert "ppo.micro_batch_size (16)" in text and "ppo.compile is on" in text



def test_auto_steps_aside_under_sharded_weights_and_true_does_not(monkeypatch, capsys):
    from types import SimpleNamespace

    from rlhf.training.ppo import trainer

    monkeypatch.setattr(trainer, "will_shard", lambda accelerator: True)
    for setting, expected in ((None, 1), (True, 4)):
        overrides = ["ppo.max_prompt_length=256"] + ([] if setting is None else ["ppo.shared_prefix=true"])
        job = SimpleNamespace(plan=plan(*overrides), cfg=load_pipeline(TINY, ["ppo.algorithm=grpo",
                                                                            "ppo.samples_per_prompt=4",
                                                                            *overrides])[0].ppo)
        assert trainer._prefix_plan(job, accelerator=None).prefix_group == expected
    assert "shared_prefix off under sharded weights" in capsys.readouterr().out
    monkeypatch.setattr(trainer, "will_shard", lambda accelerator: False)
    assert trainer._prefix_plan(job, accelerator=None).prefix_group == 4
