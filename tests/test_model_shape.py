"""Model shapes read without loading weights (rlhf/pipeline/model_shape.py): parameter counts worked out by hand from
the tiny specs and a real config.json, and what a folder without a usable config.json says."""

from __future__ import annotations

import json

import pytest

from rlhf.pipeline.config import TinyEncoderSpec, TinyModelSpec
from rlhf.pipeline.model_shape import ShapeNotFound, encoder_shape, shape_from_config, shape_from_folder, tiny_shape

# Qwen/Qwen2.5-0.5B's config.json, as the hub has it.
QWEN_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1", "use_cache": True, "use_mrope": False, "use_sliding_window": False,
    "vocab_size": 151936,
}
TINY = tiny_shape(TinyModelSpec())  # H 64, I 256, 4 blocks, 4 heads of 16, vocabulary <= 1024, tied
QWEN = shape_from_config(QWEN_CONFIG, source="test")


def test_tiny_parameters():
    # embedding 1024 x 64 = 65,536; a block: q, k, v, o 4 x 64 x 64 = 16,384, MLP 3 x 64 x 256 = 49,152, two norms
    # 128 -> 65,664, x 4 = 262,656; final norm 64; tied head: 0. 328,256 is what the SFT stage prints.
    assert TINY.block_parameters() == 65_664
    assert TINY.parameters(head="lm") == 328_256
    assert TINY.parameters(head="score") == 328_256 + 64  # a (64 -> 1) score head, no bias


def test_qwen_parameters_from_its_config():
    # embedding 151,936 x 896 = 136,134,656; a block: q 896 x 896 + 896 = 803,712, k and v 896 x 128 + 128 =
    # 114,816 each, o 802,816, MLP 3 x 896 x 4,864 = 13,074,432, norms 1,792 -> 14,912,384, x 24 = 357,897,216;
    # final norm 896: 494,032,768, Qwen2.5-0.5B's published count.
    assert (QWEN.kv_dim, QWEN.head_dim, QWEN.qkv_bias, QWEN.tied_embeddings) == (128, 64, True, True)
    assert QWEN.block_parameters() == 14_912_384
    assert QWEN.parameters(head="lm") == 494_032_768


def test_tiny_shape_follows_its_sizes_a_real_shape_and_model_vocab_size():
    spec = TinyModelSpec(hidden_size=128, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                         vocab_size=700)
    shape = tiny_shape(spec)
    assert (shape.head_dim, shape.kv_dim, shape.vocab_size) == (16, 32, 700)
    # the embedding's rows when set, else the tokenizer's (at most vocab_size)
    assert tiny_shape(TinyModelSpec(model_vocab_size=32768)).vocab_size == 32768
    # `shape: qwen2.5-0.5b` builds random weights of exactly Qwen2.5-0.5B's size
    assert tiny_shape(TinyModelSpec(shape="qwen2.5-0.5b")).parameters(head="lm") == 494_032_768


def test_encoder_parameters():
    # BERT, H 64, I 256, 2 layers, vocabulary 2,000, 512 positions: embeddings (2,000 + 512 + 2) x 64 = 160,896 and a
    # LayerNorm 128; a layer: q, k, v, o 4 x (64 x 64 + 64) = 16,640, MLP 64 x 256 + 256 + 256 x 64 + 64 = 33,088,
    # two LayerNorms 256 -> 49,984, x 2 = 99,968; pooler 64 x 64 + 64 = 4,160; classifier 65. Total 265,217.
    shape = encoder_shape(TinyEncoderSpec())
    assert shape.block_parameters() == 49_984
    assert shape.parameters(head="score") == 265_217


def test_a_folder_without_config_or_with_a_partial_one(tmp_path):
    with pytest.raises(ShapeNotFound, match="no config.json"):
        shape_from_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ShapeNotFound, match="lacks 'num_attention_heads'"):
        shape_from_folder(tmp_path)
