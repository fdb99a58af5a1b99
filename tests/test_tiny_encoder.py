"""The tiny BERT-style reward encoder: its own WordPiece tokenizer, seeded init, deterministic scores, save and reload.

    .venv/bin/python -m pytest -q tests/test_tiny_encoder.py
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertForSequenceClassification

from rlhf.training.tiny import (
    ENCODER_SPECIAL_TOKENS,
    TinyEncoderSpec,
    build_encoder_reward_model,
    build_encoder_tokenizer,
    build_tokenizer,
)

ANIMALS = ["fox", "goat", "horse", "bear", "rabbit", "mouse", "frog", "owl", "duck", "wolf"]
ADJECTIVES = ["brave", "kind", "sleepy", "clumsy", "tall", "gentle", "noisy", "dull", "grumpy", "happy"]
TEXTS = [f"The {animal} is {adjective}, and it says hello." for animal in ANIMALS for adjective in ADJECTIVES]
SPEC = TinyEncoderSpec()


@pytest.fixture(scope="module")
def built():
    return build_encoder_reward_model(TEXTS, SPEC, seed=0)


def scores(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """One score per text, (B,), from a right-padded batch."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]


def test_special_tokens_and_cls_sep_template(built):
    _, tokenizer = built
    assert tokenizer.convert_ids_to_tokens(tokenizer("hello")["input_ids"]) == ["[CLS]", "hello", "[SEP]"]
    assert (tokenizer.pad_token, tokenizer.cls_token, tokenizer.sep_token) == ("[PAD]", "[CLS]", "[SEP]")
    assert (tokenizer.unk_token, tokenizer.mask_token) == ("[UNK]", "[MASK]")
    assert tokenizer.eos_token is None and tokenizer.bos_token is None
    assert tokenizer.padding_side == "right"
    assert tokenizer.model_max_length == SPEC.max_position_embeddings
    # The five special tokens trained in first, so their ids are 0..4 in the order given.
    assert tokenizer.convert_tokens_to_ids(list(ENCODER_SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]


def test_lowercases_and_splits_unseen_words_into_word_pieces(built):
    _, tokenizer = built
    assert tokenizer("The FOX")["input_ids"] == tokenizer("the fox")["input_ids"]
    pieces = tokenizer.tokenize("foxes")  # "foxes" is not in TEXTS, but its letters are
    assert pieces[0] == "fox" and all(piece.startswith("##") for piece in pieces[1:])


def test_truncation_keeps_cls_and_sep_from_either_side(built):
    _, tokenizer = built
    long_text = "the fox is brave " * 200
    for side in ("right", "left"):
        tokenizer.truncation_side = side
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(long_text, truncation=True, max_length=8)["input_ids"])
        assert len(tokens) == 8 and tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    tokenizer.truncation_side = "right"


def test_differs_from_the_policy_tokenizer():
    encoder_tokenizer = build_encoder_tokenizer(TEXTS, vocab_size=SPEC.vocab_size)
    policy_tokenizer = build_tokenizer(TEXTS, vocab_size=512)
    text = "the fox is brave"
    assert encoder_tokenizer(text)["input_ids"] != policy_tokenizer(text)["input_ids"]
    assert encoder_tokenizer.get_vocab() != policy_tokenizer.get_vocab()
    assert policy_tokenizer.eos_token is not None and encoder_tokenizer.eos_token is None


def test_unknown_characters_become_unk_and_still_score(built):
    model, tokenizer = built
    text = "the zebra says ¡hola! 日本語 🦊"  # z, ¡, CJK and emoji never occur in TEXTS
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id in ids
    assert all(0 <= i < len(tokenizer) for i in ids)
    assert torch.isfinite(scores(model, tokenizer, [text])).all()


def test_save_and_reload_give_identical_scores_and_padding_does_not_change_a_score(built, tmp_path):
    model, tokenizer = built
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()

    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(reloaded, BertForSequenceClassification)
    assert reloaded.config.num_labels == 1
    assert reloaded.config.pad_token_id == reloaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    assert reloaded_tokenizer.eos_token is None
    for text in ["hello", "The Goat is GRUMPY.", "the zebra 🦊"]:
        assert reloaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]

    texts = ["the owl is sleepy", "the frog is happy, and it says hello to the grumpy old bear."]
    batch = tokenizer(texts, padding=True)
    assert batch["input_ids"][0][-1] == tokenizer.pad_token_id  # the short row really is right-padded
    before = scores(model, tokenizer, texts)
    after = scores(reloaded, reloaded_tokenizer, texts)
    # Not bit-equal: reloaded weights are views into the safetensors file at a 48-byte offset, and CPU matmul
    # kernels round differently on unaligned memory (about 1e-9 here; cloning the weights makes it exact).
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(before[0], scores(model, tokenizer, texts[:1])[0], rtol=1e-5, atol=1e-5)


def test_same_seed_same_weights_and_global_rng_untouched():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first, _ = build_encoder_reward_model(TEXTS, SPEC, seed=7)
    assert torch.equal(torch.rand(1), expected_next)

    second, _ = build_encoder_reward_model(TEXTS, SPEC, seed=7)
    other, _ = build_encoder_reward_model(TEXTS, SPEC, seed=8)
    first_state, second_state, other_state = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(first_state[name], second_state[name]) for name in first_state)
    assert not torch.equal(first_state["classifier.weight"], other_state["classifier.weight"])


def test_dropout_is_off_so_train_mode_scores_equal_eval_mode_scores(built):
    model, tokenizer = built
    model.train()
    train_scores = scores(model, tokenizer, TEXTS[:4])
    model.eval()
    torch.testing.assert_close(train_scores, scores(model, tokenizer, TEXTS[:4]), rtol=0, atol=0)


def test_pairwise_loss_backward_gives_finite_gradients():
    model, tokenizer = build_encoder_reward_model(TEXTS, SPEC, seed=0)
    model.zero_grad()
    chosen = tokenizer(TEXTS[:4], padding=True, return_tensors="pt")
    rejected = tokenizer(TEXTS[-4:], padding=True, return_tensors="pt")
    r_chosen = model(input_ids=chosen["input_ids"], attention_mask=chosen["attention_mask"]).logits[:, 0]
    r_rejected = model(input_ids=rejected["input_ids"], attention_mask=rejected["attention_mask"]).logits[:, 0]
    loss = -F.logsigmoid(r_chosen - r_rejected).mean()
    loss.backward()

    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert model.classifier.weight.grad.abs().sum() > 0


def test_default_spec_has_under_a_million_parameters(built):
    model, tokenizer = built
    assert model.config.vocab_size == len(tokenizer)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    # The full 2000-token vocabulary (a larger corpus) stays under the limit too: 2000 x 64 embeddings.
    words = ["".join(letters) for letters in itertools.product("abcdefghijklmnop", repeat=3)]
    large, large_tokenizer = build_encoder_reward_model(words, SPEC, seed=0)
    assert len(large_tokenizer) == SPEC.vocab_size
    assert sum(p.numel() for p in large.parameters()) < 1_000_000
