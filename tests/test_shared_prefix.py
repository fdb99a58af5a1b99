"""`ppo.shared_prefix`: each group's prompt runs once for the responses sampled to it, packed behind it in one row
(SDPA) or handed to the responses' pass as a cache. Either way the logits and gradients must be those of the full pass
(tiny Llama and Qwen2 models, left-padded prompts of different lengths, responses of different lengths, with and
without a LoRA adapter), the packed layout must be the hand-worked one, minibatches must keep groups whole, and the
switch must be on exactly where it can be."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig

from rlhf.core import maths
from rlhf.core.packing import pack_groups, unpack_logits
from rlhf.errors import ConfigError
from rlhf.pipeline.config import TinyModelSpec, load_pipeline
from rlhf.training.ppo.models import packs_groups, response_logits, shared_prefix_logits
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


def loss_and_grads(model, sequences, mask, response_mask, width, *, group: int, packed: bool | None = None):
    model.zero_grad(set_to_none=True)
    if group == 1:
        logits = response_logits(model, sequences, mask, query_width=width)
    else:
        logits = shared_prefix_logits(model, sequences, mask, query_width=width, group=group, packed=packed)
    logprobs = maths.logprobs_from_logits(logits, sequences[:, width:])
    weights = torch.linspace(-1, 1, logprobs.numel()).view_as(logprobs)  # a loss every position contributes to
    loss = maths.masked_mean(logprobs * weights, response_mask)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return logits.detach(), loss.detach(), grads


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "cached"])
@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_shared_prompts_give_the_full_pass_logits_and_gradients(architecture, packed):
    model, vocab = tiny_model(architecture)
    model.train()
    assert packs_groups(model)  # tiny models run on SDPA: auto packs
    sequences, mask, response_mask, width = grouped_batch([7, 2, 4], [[6, 1, 3], [2, 2, 5], [6, 4, 1]],
                                                          vocab=vocab)
    full_logits, full_loss, full_grads = loss_and_grads(model, sequences, mask, response_mask, width, group=1)
    logits, loss, grads = loss_and_grads(model, sequences, mask, response_mask, width, group=GROUP, packed=packed)
    assert logits.shape == full_logits.shape
    # Only the positions that predict a response token matter (the rest are padding in either pass).
    keep = response_mask.unsqueeze(-1)
    assert torch.allclose(logits * keep, full_logits * keep, atol=1e-5)
    assert loss.abs() > 0 and torch.allclose(loss, full_loss, atol=1e-6)
    assert len(grads) == len(full_grads) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, full_grads))


@pytest.mark.parametrize("architecture", ["mistral", "qwen2"])
def test_sliding_window_models_are_not_packed_and_still_share_their_prompts(architecture):
    """transformers hands a 4D mask to every layer as it is, so a sliding-window layer would lose its window in the
    packed pass: such models take the cached way, which keeps it. A window of 4 tokens, sequences of 13."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, pad_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(0)
    if architecture == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=4, **shape))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=0, **shape))
    model.eval()
    assert not packs_groups(model)
    sequences, mask, response_mask, width = grouped_batch([7, 2, 4], [[6, 1, 3], [2, 2, 5], [6, 4, 1]], vocab=300)
    keep = response_mask.unsqueeze(-1)
    with torch.no_grad():
        full = response_logits(model, sequences, mask, query_width=width)
        shared = shared_prefix_logits(model, sequences, mask, query_width=width, group=GROUP)  # auto: cached
        packed = shared_prefix_logits(model, sequences, mask, query_width=width, group=GROUP, packed=True)
    assert torch.allclose(shared * keep, full * keep, atol=1e-5)
    assert not torch.allclose(packed * keep, full * keep, atol=1e-3)  # what packing would have got wrong


def test_the_packed_mask_runs_under_bf16_autocast():
    """GPU runs score and update under bf16 autocast: SDPA then gets bf16 queries with the boolean mask."""
    model, vocab = tiny_model()
    sequences, mask, response_mask, width = grouped_batch([7, 2, 4], [[6, 1, 3], [2, 2, 5], [6, 4, 1]],
                                                          vocab=vocab)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = response_logits(model, sequences, mask, query_width=width)
        packed = shared_prefix_logits(model, sequences, mask, query_width=width, group=GROUP, packed=True)
    keep = response_mask.unsqueeze(-1)
    assert packed.dtype == torch.bfloat16
    assert torch.allclose(packed.float() * keep, full.float() * keep, atol=2e-2)  # bf16 rounding (~2e-3 measured)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "cached"])
def test_the_lora_reference_pass_with_the_adapter_off_is_shared_too(packed):
    model, vocab = tiny_model()
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    sequences, mask, response_mask, width = grouped_batch([5, 3], [[2, 6, 4], [1, 3, 6]], vocab=vocab)
    with torch.no_grad():
        adapted = shared_prefix_logits(peft, sequences, mask, query_width=width, group=GROUP, packed=packed)
        with peft.disable_adapter():
            shared = shared_prefix_logits(peft, sequences, mask, query_width=width, group=GROUP, packed=packed)
            full = response_logits(peft, sequences, mask, query_width=width)
    keep = response_mask.unsqueeze(-1)
    assert torch.allclose(shared * keep, full * keep, atol=1e-5)
    assert not torch.allclose(adapted * keep, full * keep, atol=1e-3)  # the adapter is live outside the context


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "cached"])
def test_rows_that_do_not_split_into_groups_are_refused(packed):
    model, vocab = tiny_model()
    sequences, mask, _, width = grouped_batch([5, 3], [[2, 6, 4], [1, 3, 6]], vocab=vocab)
    with pytest.raises(ValueError, match="6 rows do not split into groups of 4"):
        shared_prefix_logits(model, sequences, mask, query_width=width, group=4, packed=packed)


def test_a_packed_group_is_the_hand_worked_layout():
    # One group of 2: a prompt [pad, a, b] (a left pad), responses [c, d] and [e, pad].
    pad, a, b, c, d, e = 0, 11, 12, 13, 14, 15
    sequences = torch.tensor([[pad, a, b, c, d], [pad, a, b, e, pad]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    packed = pack_groups(sequences, mask, query_width=3, group=2)
    assert packed.input_ids.tolist() == [[pad, a, b, c, d, e, pad]]
    # the prompt's real tokens at 0, 1; each slot restarts at 2
    assert packed.position_ids.tolist() == [[0, 0, 1, 2, 3, 2, 3]]
    expected = [  # key:  pad a  b  c  d  e  pad     query:
        [1, 0, 0, 0, 0, 0, 0],  # prompt pad: itself only (no row of the mask is empty)
        [0, 1, 0, 0, 0, 0, 0],  # a
        [0, 1, 1, 0, 0, 0, 0],  # b
        [0, 1, 1, 1, 0, 0, 0],  # c: the prompt, then its own slot
        [0, 1, 1, 1, 1, 0, 0],  # d
        [0, 1, 1, 0, 0, 1, 0],  # e: the prompt and its own slot, not c or d
        [0, 1, 1, 0, 0, 1, 1],  # slot pad: what e sees, and itself
    ]
    assert packed.attention_mask.shape == (1, 1, 7, 7)
    assert packed.attention_mask[0, 0].long().tolist() == expected
    # The last 1 + 2 x 2 positions come back as each row's 2 predicting positions: the prompt's last (b) predicts
    # both first tokens, c predicts d, e predicts the pad.
    assert packed.logits_to_keep == 5
    logits = torch.tensor([12.0, 13.0, 14.0, 15.0, 0.0]).view(1, 5, 1)  # positions b, c, d, e, pad
    assert unpack_logits(logits, packed).squeeze(-1).tolist() == [[12.0, 13.0], [12.0, 15.0]]


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


def test_auto_shares_where_nothing_is_in_the_way_and_true_or_false_decide():
    assert plan().prefix_group == 4  # tiny: prompts of 32 tokens at most, responses of 24
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



def test_auto_steps_aside_under_sharded_weights_or_unpacked_short_prompts_and_true_does_not(monkeypatch, capsys):
    from types import SimpleNamespace

    from rlhf.training.ppo import trainer

    def job(*overrides):
        return SimpleNamespace(plan=plan(*overrides), cfg=load_pipeline(TINY, ["ppo.algorithm=grpo",
                                                                             "ppo.samples_per_prompt=4",
                                                                             *overrides])[0].ppo)

    def policy(attention):
        config = LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                             vocab_size=1024)
        config._attn_implementation = attention
        return SimpleNamespace(config=config)

    monkeypatch.setattr(trainer, "will_shard", lambda accelerator: True)
    assert trainer._prefix_plan(job(), None, policy("sdpa")).prefix_group == 1
    assert trainer._prefix_plan(job("ppo.shared_prefix=true"), None, policy("sdpa")).prefix_group == 4
    assert "shared_prefix off under sharded weights" in capsys.readouterr().out
    monkeypatch.setattr(trainer, "will_shard", lambda accelerator: False)
    assert trainer._prefix_plan(job(), None, policy("sdpa")).prefix_group == 4
    # Without SDPA the cached way's second pass does not pay for short prompts (tiny: 32 against 24 new tokens).
    assert trainer._prefix_plan(job(), None, policy("eager")).prefix_group == 1
    assert "shared_prefix off for short prompts on eager attention" in capsys.readouterr().out
    assert trainer._prefix_plan(job("ppo.max_prompt_length=256"), None, policy("eager")).prefix_group == 4
    assert trainer._prefix_plan(job("ppo.shared_prefix=true"), None, policy("eager")).prefix_group == 4
    # Packed, long responses in a large group: the packed row's attention spans every slot and costs more than the
    # prompt passes it saves (tiny: 32 prompt tokens, 8 x 256 new ones); true packs anyway.
    long = ("ppo.samples_per_prompt=8", "ppo.max_new_tokens=256")
    assert trainer._prefix_plan(job(*long), None, policy("sdpa")).prefix_group == 1
    assert "shared_prefix off for long responses: a packed group of 8 x 256 new tokens" in capsys.readouterr().out
    assert trainer._prefix_plan(job(*long, "ppo.shared_prefix=true"), None, policy("sdpa")).prefix_group == 8
