"""Model FLOPs of a decoder-only transformer and model FLOPs utilisation (MFU): plain arithmetic, no tensors.

    shape = DecoderShape(layers=24, hidden=896, heads=14, kv_heads=2, intermediate=4864, vocab=151936)
    per_token = training_flops_per_token(shape, context=565)     # forward + backward of one trained token
    mfu(flops_per_s=tokens_per_s * per_token, peak_flops_per_s=peak_bf16_flops("NVIDIA H200"))

Counting conventions (Kaplan et al. 2020, section 2.1; PaLM, Chowdhery et al. 2022, appendix B), the ones MFU
figures in papers and in nanoGPT/nanochat use, so that ours compare with theirs:
- a product of (m x k) and (k x n) matrices is 2mkn FLOPs; norms, activations, softmax, rotary and biases are left
  out (well under 1% at these sizes);
- forward, per token: 2 x (weights in matrix products) + 4 x layers x (heads x head_dim) x context, the second
  term being the attention scores and their weighted sum over `context` keys. For a training sequence of T tokens
  the context is T (PaLM counts all T keys, not the ~T/2 a causal mask leaves);
- backward = 2 x forward, so training = 3 x forward. Recomputed activations (gradient checkpointing) are not
  counted: MFU counts the model's FLOPs, not the hardware's;
- the LM head (hidden x vocab) is a matrix product for every token, counted even when tied to the embeddings
  (whose lookup is free): at Qwen2.5-0.5B's shape it is 28% of the weights' FLOPs.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderShape:
    """The sizes that set a decoder's FLOPs."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int | None = None  # None: hidden // heads
    gated_mlp: bool = True  # SwiGLU (gate, up, down: 3 matrices) as Llama and Qwen2; False: 2 matrices (BERT, GPT-2)
    lm_head: bool = True  # False for a one-score head (reward and value models): hidden x 1, left out

    @property
    def attention_width(self) -> int:
        """heads x head_dim: the width of the queries (and of the attention output)."""
        return self.heads * (self.head_dim or self.hidden // self.heads)


def shape_from_config(config, *, lm_head: bool) -> DecoderShape:
    """The shape of a transformers model config (read by attribute name: LlamaConfig, Qwen2Config, BertConfig, ...)."""
    heads = config.num_attention_heads
    return DecoderShape(layers=config.num_hidden_layers, hidden=config.hidden_size, heads=heads,
                        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                        intermediate=config.intermediate_size, vocab=config.vocab_size,
                        head_dim=getattr(config, "head_dim", None),
                        gated_mlp=getattr(config, "model_type", "") not in _UNGATED_MODEL_TYPES, lm_head=lm_head)


_UNGATED_MODEL_TYPES = ("bert", "roberta", "distilbert", "gpt2", "gpt_neox", "opt")


def matmul_weights(shape: DecoderShape) -> int:
    """Weights that take part in a matrix product for every token (each costs 2 FLOPs per token forward)."""
    head_dim = shape.attention_width // shape.heads
    attention = (shape.hidden * shape.attention_width  # q
                 + 2 * shape.hidden * shape.kv_heads * head_dim  # k, v
                 + shape.attention_width * shape.hidden)  # o
    mlp = (3 if shape.gated_mlp else 2) * shape.hidden * shape.intermediate
    head = shape.hidden * shape.vocab if shape.lm_head else 0
    return shape.layers * (attention + mlp) + head


def attention_flops_per_token(shape: DecoderShape, *, context: int) -> int:
    """Scores (q.k) and weighted sum (p.v) of one query over `context` keys, in every layer."""
    return 4 * shape.layers * shape.attention_width * context


def forward_flops_per_token(shape: DecoderShape, *, context: int) -> int:
    """One token's forward pass attending to `context` keys (a sequence's length, for scoring)."""
    return 2 * matmul_weights(shape) + attention_flops_per_token(shape, context=context)


def training_flops_per_token(shape: DecoderShape, *, context: int) -> int:
    """Forward and backward (twice the forward) of one token of a `context`-token training sequence."""
    return 3 * forward_flops_per_token(shape, context=context)


def generation_flops_per_token(shape: DecoderShape, *, cache_length: int) -> int:
    """One decoding step with a KV cache of `cache_length` tokens: the new token attends to those and itself."""
    return forward_flops_per_token(shape, context=cache_length + 1)


def generation_flops(shape: DecoderShape, *, prompt_length: int, new_tokens: int) -> int:
    """Sampling `new_tokens` after a `prompt_length`-token prompt, one sequence: the prompt's forward pass
    (whose last position gives the first new token), then new_tokens - 1 decoding steps, the i-th of which
    attends to prompt_length + i keys."""
    prefill = prompt_length * forward_flops_per_token(shape, context=prompt_length)
    steps = max(new_tokens - 1, 0)
    keys = steps * prompt_length + steps * (steps + 1) // 2  # sum over i = 1..steps of (prompt_length + i)
    decode = steps * 2 * matmul_weights(shape) + 4 * shape.layers * shape.attention_width * keys
    return prefill + decode


def group_forward_flops(shape: DecoderShape, *, prompt: int, response: int, group: int, packed: bool) -> int:
    """One forward pass over a prompt of `prompt` tokens and `group` responses of `response` tokens sampled to it,
    head left out (both layouts compute the same logits): `group` padded rows of prompt + response tokens, or
    (`packed`, rlhf/core/packing.py) one row holding the prompt once and every response after it, whose custom
    attention mask makes each of its prompt + group x response tokens score against all of them."""
    body = dataclasses.replace(shape, lm_head=False)
    if packed:
        width = prompt + group * response
        return width * forward_flops_per_token(body, context=width)
    return group * (prompt + response) * forward_flops_per_token(body, context=prompt + response)


def mfu(*, flops_per_s: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: the model's FLOPs per second over the device's peak (the sum over devices)."""
    return flops_per_s / peak_flops_per_s


# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s, each from the vendor's datasheet or architecture
# whitepaper (sparse figures halved). Matched against torch.cuda.get_device_name() in order: specific names first.
# On one H200 here an 8192^3 bf16 product ran at 769-798 TFLOP/s (/work/.library/device/KINDS.md, 2026-11).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bH100\b.*\bPCIe\b", 756.0),  # H100 datasheet, PCIe: 1,513 sparse
    (r"\bH100\b.*\bNVL\b", 835.0),  # H100 NVL datasheet: 1,671 sparse
    (r"\bH200\b.*\bNVL\b", 835.0),  # H200 datasheet, NVL: 1,671 sparse
    (r"\bGH200\b", 989.0),  # GH200 datasheet: 1,979 sparse (the H100 SXM's Hopper GPU)
    (r"\bH200\b", 989.0),  # H200 datasheet, SXM: 1,979 sparse
    (r"\bH100\b", 989.0),  # H100 datasheet, SXM ("NVIDIA H100 80GB HBM3"): 1,979 sparse
    (r"\bA100\b", 312.0),  # A100 datasheet (SXM and PCIe): 624 sparse
    (r"\bL40S\b", 362.0),  # L40S datasheet: 362.05 dense, 733 sparse
    (r"\bL40\b", 181.0),  # L40 datasheet: 181.05 dense, 362.1 sparse
    (r"\bL4\b", 121.0),  # L4 datasheet: 242 sparse
    (r"\bA10G\b", 125.0),  # AWS's variant of the A10, no datasheet of its own: the A10's figure
    (r"\bA10\b", 125.0),  # A10 datasheet: 250 sparse
    (r"\bRTX 4090\b", 165.2),  # Ada (AD102) whitepaper, bf16 with fp32 accumulate: 330.4 sparse
    (r"\bRTX 3090\b", 71.0),  # Ampere GA102 whitepaper, bf16 with fp32 accumulate: 142 sparse
)


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak in FLOP/s of the device `torch.cuda.get_device_name()` names; None when unknown."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops * 1e12
    return None
