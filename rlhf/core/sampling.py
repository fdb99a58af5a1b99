"""Sampling responses from the policy, cut after the first EOS."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationConfig, PreTrainedModel

from rlhf.core.maths import has_stop, response_mask


@dataclass(frozen=True)
class Sampled:
    responses: Tensor  # (B, Tr) ids, pad after the first EOS, right-padded to max_new_tokens
    response_mask: Tensor  # (B, Tr) bool: up to and including the first EOS
    has_eos: Tensor  # (B,) bool


def sampling_config(*, max_new_tokens: int, temperature: float, pad_token_id: int,
                    eos_token_id: int, min_new_tokens: int = 0) -> GenerationConfig:
    """Pure ancestral sampling at `temperature`: no top-k/top-p and none of the checkpoint's own
    generation defaults, so the sampling distribution is exactly the one the log-probs are computed for.

    `min_new_tokens`: transformers' MinNewTokensLengthLogitsProcessor sets EOS's logit to -inf until a response
    has that many tokens; equal to `max_new_tokens` it fixes every response's length (benchmarks). The responses
    then come from the policy with EOS masked, not quite the distribution PPO's log-probs describe: for
    measuring speed, not for training."""
    return GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=True,
                            temperature=temperature, top_k=0, top_p=1.0, pad_token_id=pad_token_id,
                            eos_token_id=eos_token_id, bos_token_id=None, repetition_penalty=1.0)


def response_texts(tokenizer, responses: Tensor, response_mask: Tensor) -> list[str]:
    """The text of each response (B, Tr) up to and including its first EOS, special tokens dropped."""
    return [tokenizer.decode(row[keep], skip_special_tokens=True) for row, keep in zip(responses, response_mask)]


@torch.no_grad()
def sample(policy: PreTrainedModel, queries: Tensor, query_mask: Tensor, *, config: GenerationConfig,
           micro_batch_size: int, synced: bool = False) -> Sampled:
    """Sample one response per left-padded prompt (B, Tq), `micro_batch_size` prompts per generate call.
    `synced`: every process steps until all are done (sharded models, rlhf/ppo/sharding.py); each must then
    make the same number of calls."""
    width = config.max_new_tokens
    chunks = []
    for start in range(0, queries.shape[0], micro_batch_size):
        q, m = queries[start:start + micro_batch_size], query_mask[start:start + micro_batch_size]
        out = policy.generate(input_ids=q, attention_mask=m, generation_config=config, synced_gpus=synced)
        response = out[:, q.shape[1]:]
        pad = torch.full((response.shape[0], width - response.shape[1]), config.pad_token_id,
                         dtype=response.dtype, device=response.device)
        chunks.append(torch.cat([response, pad], dim=1))
    responses = torch.cat(chunks)
    stops = [config.eos_token_id]
    mask = response_mask(responses, stop_token_ids=stops)
    responses = torch.where(mask, responses, torch.full_like(responses, config.pad_token_id))
    # Drop the columns after the longest response: every later forward pass is that much shorter.
    width = max(int(mask.sum(dim=1).max()), 1)
    responses, mask = responses[:, :width], mask[:, :width]
    return Sampled(responses=responses, response_mask=mask, has_eos=has_stop(responses, stop_token_ids=stops))
