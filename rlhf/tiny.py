"""The tiny model: a small Llama-style causal LM and a byte-level BPE tokenizer trained on the pipeline's own texts.

A pipeline file that says `model: tiny` gets these instead of a hub checkpoint, so the tests and the default CPU
pipeline run offline in seconds. The weights are random (seeded); the tokenizer is trained on the dataset texts, and
being byte-level it can still encode any text, seen or not, without an unknown token.

    model, tokenizer = build_tiny(texts, TinyModelSpec(), seed=0)
    model.save_pretrained(folder); tokenizer.save_pretrained(folder)   # loads back with the Auto* classes
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast


@dataclass
class TinyModelSpec:
    """Size of the tiny Llama-style model; the defaults give about 0.3M parameters."""

    vocab_size: int = 1024
    """target BPE vocabulary size, special tokens included (a small corpus may yield fewer merges)"""
    hidden_size: int = 64
    """width of the residual stream"""
    intermediate_size: int = 256
    """width of the SwiGLU MLP"""
    num_hidden_layers: int = 4
    """number of decoder layers"""
    num_attention_heads: int = 4
    """number of query heads; must divide hidden_size"""
    num_key_value_heads: int = 4
    """number of key/value heads (fewer than query heads gives grouped-query attention)"""
    max_position_embeddings: int = 512
    """longest sequence in tokens; also the tokenizer's model_max_length"""


PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|eos|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# No BOS: the tokenizer adds nothing to plain text, so prompt and completion token ids concatenate cleanly.
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, *ROLE_TOKENS)

# Each message is `<|role|>content<|end|>\n`. The assistant's content and `<|end|>` sit inside
# `{% generation %}` so TRL's assistant-only loss trains the model to emit `<|end|>`; the pipeline appends EOS itself.
# Rendering the prompt with add_generation_prompt=True is a string prefix of rendering prompt + reply.
CHAT_TEMPLATE = """\
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {{- '<|system|>' + message['content'] + '<|end|>' + '\\n' }}
    {%- elif message['role'] == 'user' %}
        {{- '<|user|>' + message['content'] + '<|end|>' + '\\n' }}
    {%- elif message['role'] == 'assistant' %}
        {{- '<|assistant|>' }}
        {%- generation %}{{- message['content'] + '<|end|>' }}{%- endgeneration %}
        {{- '\\n' }}
    {%- else %}
        {{- raise_exception('tiny chat template: role must be system, user or assistant, got ' + message['role']) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>' }}
{%- endif %}
"""

_BYTE_ALPHABET_SIZE = 256


def build_tokenizer(
    texts: Iterable[str], *, vocab_size: int, model_max_length: int = 512
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it for transformers and TRL.

    Every one of the 256 bytes is in the initial alphabet, so any string encodes without an unknown token and
    decodes back exactly. Plain text gets no special tokens added; padding is on the right with `<|pad|>`.
    """
    smallest = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < smallest:
        raise ValueError(
            f"tiny tokenizer: vocab_size={vocab_size} is too small; it must hold the {_BYTE_ALPHABET_SIZE} byte "
            f"tokens and {len(SPECIAL_TOKENS)} special tokens, so at least {smallest}"
        )

    backend = Tokenizer(models.BPE())
    # add_prefix_space=False: a leading space is never invented, so decode(encode(text)) == text.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        extra_special_tokens=list(ROLE_TOKENS),
        model_max_length=model_max_length,
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerBase, *, seed: int) -> LlamaForCausalLM:
    """A randomly initialised Llama-style causal LM sized by `spec`, with the vocabulary and special ids of `tokenizer`.

    The same seed gives the same weights. The global torch RNG is left as it was.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        # pad_token_id lets a sequence-classification head loaded from this folder find each row's last real token.
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        attention_dropout=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def build_tiny(
    texts: Iterable[str], spec: TinyModelSpec, *, seed: int
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Tokenizer trained on `texts`, then a model sized by `spec` on top of it."""
    tokenizer = build_tokenizer(texts, vocab_size=spec.vocab_size, model_max_length=spec.max_position_embeddings)
    model = build_model(spec, tokenizer, seed=seed)
    return model, tokenizer
