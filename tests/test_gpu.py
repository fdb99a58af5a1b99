"""What only a CUDA GPU can show: the benchmark's real-size model in bf16, fixed-length sampling there, the device's
peak known for MFU. Skipped without a GPU; `make gpu-check` runs them first on a GPU box.

    python3 -m pytest -q -m gpu tests
"""

from __future__ import annotations

import pytest
import torch

from rlhf.core.flops import peak_bf16_flops
from rlhf.core.sampling import sample, sampling_config
from rlhf.pipeline.config import TinyModelSpec
from rlhf.training.tiny import build_model, build_tokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TEXTS = [f"At dawn a red fox crossed the river near mill {i}." for i in range(200)]


def test_this_gpu_has_a_bf16_peak_for_mfu():
    name = torch.cuda.get_device_name()
    assert peak_bf16_flops(name) is not None, f"add {name!r} to PEAK_BF16_TFLOPS in rlhf/core/flops.py"


def test_the_05b_shape_runs_a_bf16_forward_and_backward_on_the_gpu():
    tokenizer = build_tokenizer(TEXTS, vocab_size=512)
    with torch.device("cuda"):
        model = build_model(TinyModelSpec(shape="qwen2.5-0.5b"), tokenizer, seed=0)
    assert sum(p.numel() for p in model.parameters()) == 494_032_768
    ids = torch.randint(0, len(tokenizer), (4, 512), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
    assert logits.shape == (4, 512, 151936)
    logits.float().logsumexp(-1).mean().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_min_new_tokens_holds_eos_back_on_the_gpu():
    """EOS made far likelier than any other id: without min_new_tokens every response is EOS alone; with it, EOS
    comes right after min_new_tokens other tokens, and never when min_new_tokens = max_new_tokens."""
    tokenizer = build_tokenizer(TEXTS, vocab_size=512)
    with torch.device("cuda"):
        model = build_model(TinyModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1), tokenizer, seed=0)
    eos = tokenizer.eos_token_id

    def favour_eos(module, inputs, logits):
        logits[..., eos] += 50.0
        return logits

    model.lm_head.register_forward_hook(favour_eos)
    queries = torch.tensor([[tokenizer.pad_token_id, 5, 6]] * 8, device="cuda")
    mask = (queries != tokenizer.pad_token_id).long()
    lengths = {}
    for least in (0, 5, 12):
        config = sampling_config(max_new_tokens=12, min_new_tokens=least, temperature=1.0,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = sample(model, queries, mask, config=config, micro_batch_size=8)
        lengths[least] = out.response_mask.sum(dim=1).tolist()
    assert lengths == {0: [1] * 8, 5: [6] * 8, 12: [12] * 8}


def test_packed_shared_prompts_match_the_full_pass_on_the_gpu():
    """ppo.shared_prefix's packed rows (a boolean SDPA mask) at the 0.5B shape, bf16 autocast as PPO runs on a GPU:
    the logits of a group's responses as the unpacked rows give them, within bf16 rounding."""
    from rlhf.training.ppo.models import response_logits, shared_prefix_logits

    tokenizer = build_tokenizer(TEXTS, vocab_size=512)
    with torch.device("cuda"):
        model = build_model(TinyModelSpec(shape="qwen2.5-0.5b"), tokenizer, seed=0)
    g = torch.Generator(device="cuda").manual_seed(0)
    prompts = torch.randint(2, len(tokenizer), (2, 96), device="cuda", generator=g).repeat_interleave(4, dim=0)
    responses = torch.randint(2, len(tokenizer), (8, 24), device="cuda", generator=g)
    mask = torch.ones(8, 120, dtype=torch.long, device="cuda")
    mask[:4, :30] = 0  # the first group's prompt is left-padded
    mask[1::2, 100:] = 0  # every other response stops after 4 tokens
    sequences = torch.cat([prompts, responses], dim=1) * mask
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        full = response_logits(model, sequences, mask, query_width=96)
        packed = shared_prefix_logits(model, sequences, mask, query_width=96, group=4, packed=True)
    keep = mask[:, 96:].bool()
    assert (packed.float()[keep] - full.float()[keep]).abs().max() < 0.1 * full.float()[keep].abs().max()


def test_recorded_rollout_logprobs_match_a_full_pass_in_fp32_on_the_gpu():
    """ppo.rollout_logprobs sampling on CUDA in fp32 (what auto picks there with precision fp32)."""
    from rlhf.core import maths
    from rlhf.training.ppo.models import response_logits

    tokenizer = build_tokenizer(TEXTS, vocab_size=512)
    with torch.device("cuda"):
        model = build_model(TinyModelSpec(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2), tokenizer, seed=0).eval()
    queries = torch.randint(2, len(tokenizer), (8, 16), device="cuda")
    query_mask = torch.ones_like(queries)
    query_mask[:4, :5] = 0
    config = sampling_config(max_new_tokens=12, temperature=0.7, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    sampled = sample(model, queries * query_mask, query_mask, config=config, micro_batch_size=8, with_logprobs=True)
    sequences = torch.cat([queries * query_mask, sampled.responses], dim=1)
    attention = torch.cat([query_mask, sampled.response_mask.long()], dim=1)
    with torch.no_grad():
        full = maths.logprobs_from_logits(response_logits(model, sequences, attention, query_width=16),
                                          sampled.responses, temperature=0.7)
    keep = sampled.response_mask
    assert torch.allclose(sampled.logprobs[keep], full[keep], atol=1e-3)  # TF32 matmuls, if on, round more
