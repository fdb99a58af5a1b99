"""The tiny model: a small Llama-style causal LM and a byte-level BPE tokenizer trained on the pipeline's own texts.

A pipeline file that says `model: tiny` gets these instead of a hub checkpoint, so the tests and the default CPU
pipeline run offline in seconds. The weights are random (seeded); the tokenizer is trained on the dataset texts, and
being byte-level it can still encode any text, seen or not, without an unknown token.

    model, tokenizer = build_tiny(texts, TinyModelSpec(), seed=0)
    model.save_pretrained(folder); tokenizer.save_pretrained(folder)   # loads back with the Auto* classes

`TinyModelSpec(shape="qwen2.5-0.5b")` builds a Qwen2 model of exactly Qwen2.5-0.5B's size (its 151,936-row
vocabulary too) on the same small tokenizer: a benchmark of real-size compute that needs no hub
(pipelines/gpu-bench.yaml).

A reward model may use another architecture and tokenizer than the policy: `build_encoder_reward_model` gives a
tiny BERT-style encoder with a one-score head and its own WordPiece tokenizer (closed vocabulary: a word with a
character the texts never had becomes [UNK]).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rlhf.pipeline.config import TinyEncoderSpec, TinyModelSpec

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


def build_model(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerBase, *,
                seed: int) -> LlamaForCausalLM | Qwen2ForCausalLM:
    """A randomly initialised causal LM sized by `spec` (its `shape` written out), with the special ids of
    `tokenizer` and its vocabulary, or `model_vocab_size` rows (the ids past the tokenizer's are never produced
    by it, as in Qwen2.5's own 151,936 rows for 151,665 tokens).

    The same seed gives the same weights. The global torch RNG is left as it was.
    """
    spec = spec.resolved()
    vocab_size = spec.model_vocab_size or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(f"tiny model: model_vocab_size {vocab_size} is smaller than the tokenizer's "
                         f"{len(tokenizer)} tokens")
    config_class, model_class = (Qwen2Config, Qwen2ForCausalLM) if spec.architecture == "qwen2" else (
        LlamaConfig, LlamaForCausalLM)
    init = {} if spec.initializer_range is None else {"initializer_range": spec.initializer_range}
    rope = {} if spec.rope_theta is None else {"rope_parameters": {"rope_type": "default",
                                                                   "rope_theta": spec.rope_theta}}
    config = config_class(
        vocab_size=vocab_size,
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
        tie_word_embeddings=spec.tie_word_embeddings,
        attention_dropout=0.0,
        **init,
        **rope,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
        if spec.embedding_init_range is not None:
            _respread_embeddings(model, spec.embedding_init_range)
        if spec.output_init_range is not None:  # untied (validated): the head is its own matrix
            with torch.no_grad():
                model.get_output_embeddings().weight.normal_(mean=0.0, std=spec.output_init_range)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def _respread_embeddings(model: LlamaForCausalLM | Qwen2ForCausalLM, std: float) -> None:
    """Redraw the token embeddings at spread `std` (the pad row stays zero, as transformers leaves it)."""
    embeddings = model.get_input_embeddings()
    with torch.no_grad():
        embeddings.weight.normal_(mean=0.0, std=std)
        if embeddings.padding_idx is not None:
            embeddings.weight[embeddings.padding_idx].zero_()


def build_tiny(
    texts: Iterable[str], spec: TinyModelSpec, *, seed: int
) -> tuple[LlamaForCausalLM | Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """Tokenizer trained on `texts`, then a model sized by `spec` on top of it."""
    tokenizer = build_tokenizer(texts, vocab_size=spec.vocab_size, model_max_length=spec.max_position_embeddings)
    model = build_model(spec, tokenizer, seed=seed)
    return model, tokenizer


ENCODER_UNK_TOKEN = "[UNK]"
ENCODER_PAD_TOKEN = "[PAD]"
ENCODER_CLS_TOKEN = "[CLS]"
ENCODER_SEP_TOKEN = "[SEP]"
ENCODER_MASK_TOKEN = "[MASK]"
ENCODER_SPECIAL_TOKENS = (
    ENCODER_UNK_TOKEN, ENCODER_PAD_TOKEN, ENCODER_CLS_TOKEN, ENCODER_SEP_TOKEN, ENCODER_MASK_TOKEN
)


def build_encoder_tokenizer(
    texts: Iterable[str], *, vocab_size: int, model_max_length: int = 512
) -> PreTrainedTokenizerFast:
    """Train a lowercasing WordPiece tokenizer on `texts`, BERT style: every encoding is `[CLS] ... [SEP]`.

    The vocabulary is closed: a word with a character never seen in `texts` becomes [UNK]. There is no EOS
    token, unlike the policy tokenizer. Padding is on the right with [PAD].
    """
    backend = Tokenizer(models.WordPiece(unk_token=ENCODER_UNK_TOKEN))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(ENCODER_SPECIAL_TOKENS), show_progress=False
    )
    backend.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = backend.token_to_id(ENCODER_CLS_TOKEN), backend.token_to_id(ENCODER_SEP_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{ENCODER_CLS_TOKEN} $A {ENCODER_SEP_TOKEN}",
        pair=f"{ENCODER_CLS_TOKEN} $A {ENCODER_SEP_TOKEN} $B:1 {ENCODER_SEP_TOKEN}:1",
        special_tokens=[(ENCODER_CLS_TOKEN, cls_id), (ENCODER_SEP_TOKEN, sep_id)],
    )

    # Not BertTokenizerFast: in transformers 5 it reloads by rebuilding its backend from the vocabulary and its
    # own defaults, ignoring the saved normalizer; the generic class reloads tokenizer.json exactly as built.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=ENCODER_UNK_TOKEN,
        pad_token=ENCODER_PAD_TOKEN,
        cls_token=ENCODER_CLS_TOKEN,
        sep_token=ENCODER_SEP_TOKEN,
        mask_token=ENCODER_MASK_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
    )


def build_encoder_reward_model(
    texts: Iterable[str], spec: TinyEncoderSpec, *, seed: int
) -> tuple[BertForSequenceClassification, PreTrainedTokenizerFast]:
    """WordPiece tokenizer trained on `texts`, then a randomly initialised BERT-style encoder with a one-score head.

    The score is read from the [CLS] position, so batches must be padded on the right (BERT's absolute positions
    do not skip left padding). Dropout is off so scores are deterministic. The same seed gives the same weights;
    the global torch RNG is left as it was.
    """
    tokenizer = build_encoder_tokenizer(
        texts, vocab_size=spec.vocab_size, model_max_length=spec.max_position_embeddings
    )
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    return model, tokenizer
