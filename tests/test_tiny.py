"""The tiny model and tokenizer: lossless tokenization, a chat template TRL can mask, seeded init, save and reload.

    .venv/bin/python -m pytest -q tests/test_tiny.py
"""

import itertools
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl.chat_template_utils import is_chat_template_stop_token_trained

from rlhf.training.tiny import (
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    TinyModelSpec,
    build_model,
    build_tiny,
    build_tokenizer,
)

ANIMALS = ["fox", "goat", "horse", "bear", "rabbit", "mouse", "frog", "owl", "duck", "wolf"]
COLOURS = ["young", "grey", "spotted", "red", "black", "golden", "brown", "white"]
ADJECTIVES = ["brave", "kind", "sleepy", "clumsy", "tall", "gentle", "noisy", "dull", "grumpy", "happy"]


def corpus(n: int) -> list[str]:
    """`n` short prompt and completion texts shaped like the pipeline's tiny dataset."""
    texts = []
    combinations = itertools.cycle(itertools.product(ANIMALS, COLOURS, ADJECTIVES))
    for animal, colour, adjective in itertools.islice(combinations, n):
        texts.append(f"Describe the {colour} {animal}.\n")
        texts.append(f"the {animal} is {adjective} and kind.")
    return texts[:n]


UNSEEN_TEXTS = [
    "",
    " ",
    "  leading and trailing spaces  ",
    "\n\nnewlines\r\nand\ttabs\n",
    "naïve café, Zürich, Ελληνικά, 日本語のテキスト",
    "emoji 🦊🐐 and a family 👨‍👩‍👧 and a flag 🇫🇷",
    "code: def f(x):\n    return x ** 2  # squared",
    "a . b 's , c ? n't !",
    "\x00\x01 control bytes \x7f",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(corpus(2000), vocab_size=512)


@pytest.fixture(scope="module")
def spec():
    return TinyModelSpec()


def test_tokenizer_trains_on_5k_texts_in_under_2s_of_cpu():
    """CPU time of this process (every thread), not wall-clock time, which a busy machine stretches."""
    texts = corpus(5000)
    start = time.process_time()
    build_tokenizer(texts, vocab_size=1024)
    assert time.process_time() - start < 2.0


def test_vocab_size_too_small_for_the_byte_alphabet_is_an_error():
    with pytest.raises(ValueError, match="at least 262"):
        build_tokenizer(corpus(10), vocab_size=100)


@pytest.mark.parametrize("text", UNSEEN_TEXTS)
def test_unseen_text_round_trips_exactly(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert all(0 <= i < len(tokenizer) for i in ids)
    assert tokenizer.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_any_text_round_trips_exactly(tokenizer, text):
    # The BPE model has no unknown token: a byte missing from the vocabulary would be dropped, breaking the round trip.
    assert tokenizer.unk_token_id is None
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_special_tokens(tokenizer):
    assert tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.bos_token is None
    assert tokenizer.padding_side == "right"
    assert tokenizer.model_max_length == 512
    # Each special token, role markers included, is one token.
    for token in SPECIAL_TOKENS:
        assert len(tokenizer(token)["input_ids"]) == 1


def test_plain_encode_adds_no_special_tokens(tokenizer):
    text = "Describe the red fox.\n"
    ids = tokenizer(text)["input_ids"]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert not set(ids) & set(tokenizer.all_special_ids)


def test_prompt_and_completion_tokens_concatenate(tokenizer):
    # The dataset's prompts end in "\n", which the byte-level pre-tokenizer never merges with the next word.
    pairs = [("Describe the red fox.\n", "the fox is brave."), ("Tell me about 🦊.\n", "it is kind.")]
    for prompt, completion in pairs:
        joined = tokenizer(prompt + completion)["input_ids"]
        assert joined == tokenizer(prompt)["input_ids"] + tokenizer(completion)["input_ids"]


PROMPT = [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "Describe the red fox.\n"},
]
REPLY = [{"role": "assistant", "content": "the fox is brave."}]


def test_chat_template_renders_each_message_and_the_generation_prompt(tokenizer):
    rendered = tokenizer.apply_chat_template(PROMPT + REPLY, tokenize=False)
    assert rendered == (
        "<|system|>Answer in one line.<|end|>\n"
        "<|user|>Describe the red fox.\n<|end|>\n"
        "<|assistant|>the fox is brave.<|end|>\n"
    )
    prompt = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|end|>\n<|assistant|>")


def test_chat_template_prompt_is_a_prefix_of_prompt_and_reply(tokenizer):
    # TRL's completion-only loss takes the tokens past the rendered prompt as the completion.
    prompt = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(PROMPT + REPLY, tokenize=False)
    assert full.startswith(prompt)
    prompt_ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=False)
    full_ids = tokenizer.apply_chat_template(PROMPT + REPLY, return_dict=False)
    assert full_ids[: len(prompt_ids)] == prompt_ids


def test_chat_template_assistant_mask_covers_the_reply_and_its_end_marker(tokenizer):
    out = tokenizer.apply_chat_template(
        PROMPT + REPLY + [{"role": "user", "content": "And the owl?"}],
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(masked) == "the fox is brave.<|end|>"
    # TRL warns when the end-of-turn token falls outside the mask, as the model would never learn to stop.
    assert is_chat_template_stop_token_trained(tokenizer)


def test_chat_template_rejects_an_unknown_role(tokenizer):
    with pytest.raises(Exception, match="role must be system, user or assistant"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "42"}], tokenize=False)


def test_tokenizer_saves_and_loads(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (loaded.pad_token, loaded.eos_token, loaded.bos_token) == (PAD_TOKEN, EOS_TOKEN, None)
    assert loaded.chat_template == tokenizer.chat_template
    assert (loaded.padding_side, loaded.model_max_length) == ("right", 512)
    assert len(loaded) == len(tokenizer)
    for text in UNSEEN_TEXTS:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_same_seed_gives_same_weights_and_leaves_the_global_rng_alone(tokenizer, spec):
    rng_state = torch.get_rng_state()
    first = build_model(spec, tokenizer, seed=0).state_dict()
    again = build_model(spec, tokenizer, seed=0).state_dict()
    other = build_model(spec, tokenizer, seed=1).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_default_model_is_small_and_matches_the_tokenizer(tokenizer, spec):
    model = build_model(spec, tokenizer, seed=0)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert model.config.vocab_size == len(tokenizer)
    assert (model.config.pad_token_id, model.config.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("initializer_range", [None, 0.05, 0.125])
def test_initializer_range_sets_the_spread_of_the_initial_weights(tokenizer, initializer_range):
    model = build_model(TinyModelSpec(initializer_range=initializer_range), tokenizer, seed=0)
    wanted = 0.02 if initializer_range is None else initializer_range  # unset: transformers' default
    assert model.config.initializer_range == pytest.approx(wanted)
    for weight in (model.model.embed_tokens.weight, model.model.layers[0].self_attn.q_proj.weight,
                   model.model.layers[-1].mlp.down_proj.weight):
        assert weight.std().item() == pytest.approx(wanted, rel=0.1)


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_init_range_widens_only_the_token_embeddings(tokenizer, tied):
    spec = TinyModelSpec(initializer_range=0.05, embedding_init_range=0.3, tie_word_embeddings=tied)
    model = build_model(spec, tokenizer, seed=0)
    embeddings = model.model.embed_tokens
    rows = torch.ones(embeddings.num_embeddings, dtype=torch.bool)
    rows[embeddings.padding_idx] = False
    assert embeddings.weight[rows].std().item() == pytest.approx(0.3, rel=0.1)
    assert not embeddings.weight[embeddings.padding_idx].any()  # the pad row stays zero
    assert model.model.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(0.05, rel=0.1)
    head = model.lm_head.weight
    assert (head is embeddings.weight) if tied else head.std().item() == pytest.approx(0.05, rel=0.1)
    again = build_model(spec, tokenizer, seed=0)  # still deterministic for the seed
    assert torch.equal(again.model.embed_tokens.weight, embeddings.weight)


def test_output_init_range_widens_only_an_untied_head(tokenizer, tmp_path):
    spec = TinyModelSpec(initializer_range=0.05, output_init_range=0.3, tie_word_embeddings=False)
    model = build_model(spec, tokenizer, seed=0)
    assert model.lm_head.weight.std().item() == pytest.approx(0.3, rel=0.1)
    embeddings = model.model.embed_tokens.weight
    assert embeddings.std().item() == pytest.approx(0.05, rel=0.1)  # the inputs keep the model's spread
    assert torch.equal(build_model(spec, tokenizer, seed=0).lm_head.weight, model.lm_head.weight)
    model.save_pretrained(tmp_path)  # the head is saved as its own tensor and loads back
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path).lm_head.weight, model.lm_head.weight)


def test_forward_and_backward(tokenizer, spec):
    model = build_model(spec, tokenizer, seed=0)
    batch = tokenizer(["Describe the red fox.\n", "the fox is brave and kind."], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_model_saves_and_loads_as_causal_lm_and_as_reward_model(tmp_path):
    model, tokenizer = build_tiny(corpus(500), TinyModelSpec(num_hidden_layers=2), seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    batch = tokenizer(["the fox is brave.", "a"], padding=True, return_tensors="pt")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, model(**batch).logits)

    # The score head is new; pad_token_id in the config lets it read each row's last real token,
    # so a right-padded row scores the same as the row alone.
    reward_model = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1).eval()
    assert reward_model.config.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        scores = reward_model(**batch).logits  # (2, 1)
        alone = reward_model(**tokenizer(["a"], return_tensors="pt")).logits
    assert scores.shape == (2, 1)
    assert torch.allclose(scores[1], alone[0], atol=1e-5)
