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
