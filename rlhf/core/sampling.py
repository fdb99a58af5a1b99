"""Sampling responses from the policy, cut after the first EOS."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel

from rlhf.core.maths import has_stop, response_mask
from rlhf.errors import ConfigError


@dataclass(frozen=True)
class Sampled:
    responses: Tensor  # (B, Tr) ids, pad after the first EOS, right-padded to max_new_tokens
    response_mask: Tensor  # (B, Tr) bool: up to and including the first EOS
    has_eos: Tensor  # (B,) bool
    logprobs: Tensor | None = None  # (B, Tr) float32 log p(token) under the distribution it was drawn from (0 on pads)


STATIC_WIDTH = 128  # with a static cache, prompts are left-padded to a multiple of this: few shapes to compile


def sampling_config(*, max_new_tokens: int, temperature: float, pad_token_id: int,
                    eos_token_id: int, min_new_tokens: int = 0, cache: str = "dynamic") -> GenerationConfig:
    """Pure ancestral sampling at `temperature`: no top-k/top-p (and `sample` takes none of the checkpoint's own
    generation defaults, `checkpoint_defaults_off`), so the sampling distribution is exactly the one the log-probs
    are computed for.

    `min_new_tokens`: transformers' MinNewTokensLengthLogitsProcessor sets EOS's logit to -inf until a response
    has that many tokens; equal to `max_new_tokens` it fixes every response's length (benchmarks). The responses
    then come from the policy with EOS masked, not quite the distribution PPO's log-probs describe: for
    measuring speed, not for training.

    `cache`: dynamic (the KV cache grows), or static (a fixed-size cache, for which transformers compiles the
    decoding step; `sample` then left-pads prompts to a multiple of STATIC_WIDTH so that few shapes compile)."""
    static = {"cache_implementation": "static"} if cache == "static" else {}
    return GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=True,
                            temperature=temperature, top_k=0, top_p=1.0, pad_token_id=pad_token_id,
                            eos_token_id=eos_token_id, bos_token_id=None, repetition_penalty=1.0, **static)


def pad_left(queries: Tensor, query_mask: Tensor, *, multiple: int, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad (B, Tq) prompts and their mask to the next multiple of `multiple` columns (pads masked out)."""
    extra = -queries.shape[1] % multiple
    if not extra:
        return queries, query_mask
    pad = queries.new_full((queries.shape[0], extra), pad_token_id)
    return torch.cat([pad, queries], dim=1), torch.cat([torch.zeros_like(pad, dtype=query_mask.dtype),
                                                         query_mask], dim=1)


class SampledLogprobs(LogitsProcessor):
    """Divides the scores by the sampling temperature and records the log-probability of every sampled token
    under the distribution it was drawn from, so that the rollout needs no second forward pass for it
    (`ppo.rollout_logprobs`).

    `sample` hands it the temperature and sets the generation config's to 1: transformers runs its own processors
    (min_new_tokens) first, custom ones next and its sampling warpers (temperature, top-k, top-p) last, so with
    none of those this processor's scores are the ones `softmax` turns into the sampling probabilities. The token
    drawn from a step's scores is the last column of the `input_ids` of the next call; the step's log-softmax is
    kept until then (one (B, V) tensor), and `finish` reads the last token's from the returned responses."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.steps: list[Tensor] = []
        self.previous: Tensor | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        scores = scores / self.temperature
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, responses: Tensor) -> Tensor:
        """(B, Tr) log-probabilities of the `responses` generate returned (it may undo steps it ran ahead)."""
        width = responses.shape[1]
        if len(self.steps) < width and self.previous is not None:
            self.steps.append(self.previous.gather(1, responses[:, len(self.steps):len(self.steps) + 1]).squeeze(1))
        if len(self.steps) < width:
            raise RuntimeError(f"SampledLogprobs: {len(self.steps)} steps recorded for {width} response tokens")
        self.previous = None
        return torch.stack(self.steps[:width], dim=1)


@contextlib.contextmanager
def checkpoint_defaults_off(policy: PreTrainedModel):
    """While it is open, `policy.generate` takes nothing from the checkpoint's generation_config.json.

    `generate` fills every field the config it is given leaves unset (None) from the model's own generation config:
    a repetition penalty, banned n-grams, suppressed tokens or a min-p cut-off there would change what is sampled
    from, so that PPO's samples would no longer come from the policy whose log-probabilities it computes. Setting
    each such field to a neutral value cannot block the fields whose neutral value is None itself; swapping in a
    fresh GenerationConfig (the library's neutral defaults) for the call does. For a PEFT model the config read is
    its base model's."""
    owner = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    saved = owner.generation_config
    owner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        owner.generation_config = saved


def response_texts(tokenizer, responses: Tensor, response_mask: Tensor) -> list[str]:
    """The text of each response (B, Tr) up to and including its first EOS, special tokens dropped."""
    return [tokenizer.decode(row[keep], skip_special_tokens=True) for row, keep in zip(responses, response_mask)]


@torch.no_grad()
def sample(policy: PreTrainedModel, queries: Tensor, query_mask: Tensor, *, config: GenerationConfig,
           micro_batch_size: int, synced: bool = False, with_logprobs: bool = False) -> Sampled:
    """Sample one response per left-padded prompt (B, Tq), `micro_batch_size` prompts per generate call.
    `synced`: every process steps until all are done (sharded models, rlhf/ppo/sharding.py); each must then
    make the same number of calls. `with_logprobs`: also each token's log-probability as it was sampled
    (`SampledLogprobs`), 0 past the first EOS.

    With a dynamic cache, modules compiled for training (`compile`) run eagerly here: each new cache length would
    otherwise be a new shape to compile. With a static cache, transformers compiles the decoding step itself."""
    width = config.max_new_tokens
    static = config.cache_implementation == "static"
    if static and synced:
        raise ConfigError("a static KV cache cannot be used with sharded (ZeRO-3 or FSDP) generation; "
                         "set ppo.generation_cache: dynamic")
    if static:
        queries, query_mask = pad_left(queries, query_mask, multiple=STATIC_WIDTH, pad_token_id=config.pad_token_id)
    chunks, logprob_chunks = [], []
    if with_logprobs:
        temperature, config = config.temperature, copy.deepcopy(config)
        config.temperature = 1.0  # SampledLogprobs divides by it, as the last processor that changes the scores
    for start in range(0, queries.shape[0], micro_batch_size):
        q, m = queries[start:start + micro_batch_size], query_mask[start:start + micro_batch_size]
        recorder = SampledLogprobs(temperature) if with_logprobs else None
        with contextlib.nullcontext() if static else torch.compiler.set_stance("force_eager"), \
                checkpoint_defaults_off(policy):
            out = policy.generate(input_ids=q, attention_mask=m, generation_config=config, synced_gpus=synced,
                                  logits_processor=LogitsProcessorList([recorder] if recorder else []))
        response = out[:, q.shape[1]:]
        missing = width - response.shape[1]
        if recorder is not None:
            logprob_chunks.append(torch.nn.functional.pad(recorder.finish(response), (0, missing)))
        pad = torch.full((response.shape[0], missing), config.pad_token_id,
                         dtype=response.dtype, device=response.device)
        chunks.append(torch.cat([response, pad], dim=1))
    responses = torch.cat(chunks)
    stops = [config.eos_token_id]
    mask = response_mask(responses, stop_token_ids=stops)
    responses = torch.where(mask, responses, torch.full_like(responses, config.pad_token_id))
    # Drop the columns after the longest response: every later forward pass is that much shorter.
    width = max(int(mask.sum(dim=1).max()), 1)
    responses, mask = responses[:, :width], mask[:, :width]
    logprobs = None
    if with_logprobs:  # past the first EOS generate fed pads whose log-probability may be -inf: 0 there
        logprobs = torch.cat(logprob_chunks)[:, :width].masked_fill(~mask, 0.0)
    return Sampled(responses=responses, response_mask=mask, has_eos=has_stop(responses, stop_token_ids=stops),
                   logprobs=logprobs)
