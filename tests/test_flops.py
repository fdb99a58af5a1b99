"""FLOPs and MFU arithmetic (rlhf/core/flops.py), every expected number worked out by hand in the comments.

    .venv/bin/python -m pytest -q tests/test_flops.py
"""

from __future__ import annotations

import pytest

from rlhf.core.flops import (
    DecoderShape,
    attention_flops_per_token,
    forward_flops_per_token,
    generation_flops,
    generation_flops_per_token,
    group_forward_flops,
    matmul_weights,
    mfu,
    peak_bf16_flops,
    shape_from_config,
    training_flops_per_token,
)

# 2 layers, hidden 8, 2 heads of 4, 1 KV head, SwiGLU of 16, 10-entry vocabulary.
SMALL = DecoderShape(layers=2, hidden=8, heads=2, kv_heads=1, intermediate=16, vocab=10)
QWEN_05B = DecoderShape(layers=24, hidden=896, heads=14, kv_heads=2, intermediate=4864, vocab=151936)


def test_matmul_weights_by_hand():
    # per layer: q 8x8 = 64, k and v 8x(1 head x 4) = 32 each, o 8x8 = 64 -> 192; MLP 3 x 8 x 16 = 384
    # 2 layers x 576 = 1152, plus the LM head 8 x 10 = 80 -> 1232
    assert matmul_weights(SMALL) == 1232
    # a one-score head (reward or value model) leaves the LM head out: 1152
    assert matmul_weights(DecoderShape(**{**SMALL.__dict__, "lm_head": False})) == 1152
    # an ungated MLP has 2 matrices: 2 x 8 x 16 = 256 per layer -> 2 x (192 + 256) + 80 = 976
    assert matmul_weights(DecoderShape(**{**SMALL.__dict__, "gated_mlp": False})) == 976


def test_qwen_05b_matmul_weights_are_its_parameters_less_biases_and_norms():
    # Qwen2.5-0.5B has 494,032,768 parameters; the q/k/v biases are 24 x (896 + 128 + 128) = 27,648 and the
    # RMSNorm weights 24 x 2 x 896 + 896 = 43,904; the tied embedding counts once, as the LM head.
    assert matmul_weights(QWEN_05B) == 494_032_768 - 27_648 - 43_904


def test_forward_and_training_flops_by_hand():
    # attention over 5 keys: 4 x 2 layers x (2 heads x 4) x 5 = 320
    assert attention_flops_per_token(SMALL, context=5) == 320
    # forward: 2 x 1232 + 320 = 2784; training: 3 x 2784 = 8352
    assert forward_flops_per_token(SMALL, context=5) == 2784
    assert training_flops_per_token(SMALL, context=5) == 8352


def test_generation_flops_by_hand():
    # one decoding step with 4 cached tokens attends to 5 keys: the forward of a token at context 5, 2784
    assert generation_flops_per_token(SMALL, cache_length=4) == 2784
    # prompt of 3, 3 new tokens: prefill 3 x (2464 + 4 x 2 x 8 x 3 = 192) = 3 x 2656 = 7968;
    # 2 decoding steps attending to 4 and 5 keys: 2 x 2464 + 64 x (4 + 5) = 4928 + 576 = 5504; total 13472
    assert generation_flops(SMALL, prompt_length=3, new_tokens=3) == 13472
    # one new token is the prefill alone
    assert generation_flops(SMALL, prompt_length=3, new_tokens=1) == 7968


def test_qwen_05b_training_flops_at_565_tokens():
    # 6 x 493,961,216 = 2,963,767,296 for the weights; attention 3 x 4 x 24 x 896 x 565 = 145,797,120
    assert training_flops_per_token(QWEN_05B, context=565) == 2_963_767_296 + 145_797_120


def test_mfu_is_achieved_over_peak():
    # 10,000 tokens/s x 3 GFLOP/token = 30 TFLOP/s on a 989 TFLOP/s peak: 3.03%
    assert mfu(flops_per_s=10_000 * 3e9, peak_flops_per_s=989e12) == pytest.approx(0.030334, rel=1e-4)


@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H200", 989), ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
    ("NVIDIA GH200 480GB", 989), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312),
    ("NVIDIA L40S", 362), ("NVIDIA L40", 181), ("NVIDIA L4", 121), ("NVIDIA A10G", 125), ("NVIDIA A10", 125),
    ("NVIDIA GeForce RTX 4090", 165.2), ("NVIDIA GeForce RTX 3090", 71),
])
def test_peaks_match_device_names(name, tflops):
    assert peak_bf16_flops(name) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name", ["Tesla T4", "Tesla V100-SXM2-16GB", "cpu", ""])
def test_devices_without_a_known_bf16_peak_give_none(name):
    assert peak_bf16_flops(name) is None


def test_shape_from_a_transformers_config():
    from transformers import BertConfig, Qwen2Config

    qwen = Qwen2Config(num_hidden_layers=24, hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                       intermediate_size=4864, vocab_size=151936)
    assert shape_from_config(qwen, lm_head=True) == QWEN_05B
    bert = shape_from_config(BertConfig(), lm_head=False)
    assert (bert.kv_heads, bert.gated_mlp, bert.lm_head) == (12, False, False)


def test_group_forward_flops_by_hand():
    # SMALL without its head: 2 x 576 = 1152 weights, 2 x 1152 = 2304 FLOPs a token, plus 64 per key attended.
    # Prompt 3, 2 responses of 2: packed, one row of 7 tokens over 7 keys: 7 x (2304 + 448) = 19,264;
    # as rows, 2 x 5 tokens over 5 keys: 10 x (2304 + 320) = 26,240.
    assert group_forward_flops(SMALL, prompt=3, response=2, group=2, packed=True) == 19_264
    assert group_forward_flops(SMALL, prompt=3, response=2, group=2, packed=False) == 26_240
    # Prompt 1, 4 responses of 10: packed 41 x (2304 + 2624) = 202,048 against rows' 44 x (2304 + 704) = 132,352.
    assert group_forward_flops(SMALL, prompt=1, response=10, group=4, packed=True) == 202_048
    assert group_forward_flops(SMALL, prompt=1, response=10, group=4, packed=False) == 132_352


@pytest.mark.parametrize("prompt, response, group, packing_pays", [(512, 53, 4, True), (256, 24, 4, True),
                                                                    (256, 1024, 8, False), (128, 512, 16, False)])
def test_packing_pays_for_long_prompts_and_short_responses_at_qwen_05b(prompt, response, group, packing_pays):
    sizes = dict(prompt=prompt, response=response, group=group)
    packed = group_forward_flops(QWEN_05B, **sizes, packed=True)
    assert (packed < group_forward_flops(QWEN_05B, **sizes, packed=False)) == packing_pays
