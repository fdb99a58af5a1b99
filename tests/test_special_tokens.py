"""Special tokens written as text in prompts and responses (the literal EOS and pad strings) must not move
the reward model's score position, the response mask or the PPO prompt handling."""

from __future__ import annotations

import torch
from transformers import LlamaForSequenceClassification

from rlhf.core import maths
from rlhf.core.prompts import left_pad, tokenize_prompts
from rlhf.training.reward import encode_text, score_ids
from rlhf.training.tiny import EOS_TOKEN, PAD_TOKEN, TinyModelSpec, build_model, build_tokenizer

TEXTS = [f"Describe the {a}.\nthe {a} is {adj}." for a in ("fox", "owl", "cat") for adj in ("kind", "calm", "rude")]


def tiny():
    tokenizer = build_tokenizer(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    config = build_model(TinyModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2), tokenizer, seed=0).config
    config.num_labels = 1
    return tokenizer, LlamaForSequenceClassification(config).eval()


def test_literal_special_tokens_do_not_move_the_score_position():
    tokenizer, model = tiny()
    texts = [f"Describe the fox.\nthe fox is {PAD_TOKEN} kind.{EOS_TOKEN}",  # a pad string inside the text
             f"Describe the {EOS_TOKEN} owl.\nthe owl is calm.{EOS_TOKEN}",  # an EOS string inside the prompt
             "Describe the cat.\nthe cat is rude and calm and kind and rude and calm." + EOS_TOKEN]
    ids = [encode_text(tokenizer, t, max_length=64)[0] for t in texts]
    assert tokenizer.pad_token_id in ids[0][:-1] and ids[1].count(tokenizer.eos_token_id) == 2
    alone = torch.cat([score_ids(model, [seq], pad_token_id=tokenizer.pad_token_id) for seq in ids])
    batched = score_ids(model, ids, pad_token_id=tokenizer.pad_token_id)  # right-padded to the longest
    # Each score is read at the sequence's own last token, whatever special ids sit inside it.
    assert torch.allclose(alone, batched, atol=1e-5)
    with torch.no_grad():
        at_last = [model.model(torch.tensor([seq])).last_hidden_state[0, -1] for seq in ids]
    expected = torch.stack([model.score(h)[0] for h in at_last])
    assert torch.allclose(batched, expected, atol=1e-5)


def test_an_eos_string_in_a_prompt_is_part_of_the_prompt_not_the_end_of_the_response():
    tokenizer, _ = tiny()
    rows = [{"prompt": f"Describe the fox.{EOS_TOKEN}\n"}, {"prompt": "Describe the owl.\n"}]
    prompts = tokenize_prompts(rows, tokenizer, max_length=32, long_prompts="truncate", origin="test")
    queries, mask = left_pad(prompts.ids, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.eos_token_id in queries[0].tolist() and mask.sum() == sum(len(p) for p in prompts.ids)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    word = tokenizer("fox")["input_ids"][0]
    responses = torch.tensor([[word, pad, word, eos, word], [word, word, word, word, word]])
    keep = maths.response_mask(responses, stop_token_ids=[eos])
    # The mask runs to the response's own first EOS (a pad id sampled before it is a token like any other),
    # and a response without EOS is kept whole; the prompt's EOS plays no part.
    assert keep.tolist() == [[True, True, True, True, False], [True] * 5]
    assert maths.has_stop(responses, stop_token_ids=[eos]).tolist() == [True, False]
