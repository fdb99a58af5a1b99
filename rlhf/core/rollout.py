"""What one PPO step collects: the sampled batch and the training targets derived from it.

B is the rollout batch, Tq the (left-padded) prompt width, Tr the response width (max_new_tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property

import torch
from torch import Tensor


def _check_shapes(obj: object, expected: dict[str, tuple[int, ...]]) -> None:
    for name, shape in expected.items():
        actual = tuple(getattr(obj, name).shape)
        if actual != shape:
            raise ValueError(f"{type(obj).__name__}.{name} has shape {actual}, expected {shape}")


@dataclass(frozen=True)
class Rollout:
    """Sampled responses and everything the models said about them, before any update."""

    queries: Tensor  # (B, Tq) prompt ids, left-padded with pad
    query_mask: Tensor  # (B, Tq) 1 on real prompt tokens
    responses: Tensor  # (B, Tr) sampled ids; pad after the first EOS
    response_mask: Tensor  # (B, Tr) bool: up to and including the first EOS
    logprobs: Tensor  # (B, Tr) policy log-probs at the sampling temperature
    ref_logprobs: Tensor  # (B, Tr) reference-policy log-probs, same temperature
    values: Tensor  # (B, Tr) value estimates before each response token (zeros without a value model)
    scores: Tensor  # (B,) reward used for training: normalised, clipped, EOS penalty applied
    raw_scores: Tensor  # (B,) reward-model output
    has_eos: Tensor  # (B,) bool: the response ended with EOS within max_new_tokens

    def __post_init__(self) -> None:
        b, tq = self.queries.shape
        tr = self.responses.shape[1]
        _check_shapes(self, {"query_mask": (b, tq), "response_mask": (b, tr), "logprobs": (b, tr),
                             "ref_logprobs": (b, tr), "values": (b, tr), "scores": (b,), "raw_scores": (b,),
                             "has_eos": (b,)})

    @property
    def size(self) -> int:
        return self.queries.shape[0]

    # Cached: every micro batch of every PPO epoch slices these.
    @cached_property
    def sequences(self) -> Tensor:  # (B, Tq + Tr)
        return torch.cat([self.queries, self.responses], dim=1)

    @cached_property
    def attention_mask(self) -> Tensor:  # (B, Tq + Tr)
        return torch.cat([self.query_mask.long(), self.response_mask.long()], dim=1)


@dataclass(frozen=True)
class Targets:
    """Per-token training targets computed from a rollout (all (B, Tr), zero outside the response mask)."""

    kl: Tensor  # per-token KL estimate to the reference
    non_score_rewards: Tensor  # -kl_coef * kl
    rewards: Tensor  # non-score rewards plus the score at the last response token
    advantages: Tensor  # GAE, whitened if configured; or a critic-free estimator's
    returns: Tensor  # advantages (before whitening) + values: the value targets (critic-free: the advantages)

    def __post_init__(self) -> None:
        shape = tuple(self.kl.shape)
        _check_shapes(self, {f.name: shape for f in fields(self)})


@dataclass(frozen=True)
class MiniBatch:
    """The slice of a rollout and its targets that one optimiser step (or micro step) trains on."""

    sequences: Tensor  # (b, Tq + Tr)
    attention_mask: Tensor  # (b, Tq + Tr)
    response_mask: Tensor  # (b, Tr)
    logprobs: Tensor  # (b, Tr) old log-probs, from the rollout
    ref_logprobs: Tensor  # (b, Tr) the reference's, for a KL term in the loss
    values: Tensor  # (b, Tr) old values
    advantages: Tensor  # (b, Tr)
    returns: Tensor  # (b, Tr)
    query_width: int  # Tq: responses start at this column of `sequences`


def minibatch(rollout: Rollout, targets: Targets, index: Tensor) -> MiniBatch:
    """Rows `index` of the rollout and its targets, without the columns no selected row uses: the prompt padding
    every row has on the left and the response columns past the longest selected response. The rollout is padded
    to its longest prompt and response, a micro batch to its own; the cut columns are padding in every row, so
    the loss is the same (causal attention: no kept position reads a later column) for less compute."""
    attention = rollout.attention_mask[index]
    response_mask = rollout.response_mask[index]
    width = rollout.queries.shape[1]
    lead = int(attention[:, :width].any(dim=0).long().argmax())  # the first column some prompt uses
    used = response_mask.any(dim=0)
    keep = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
    cut = slice(0, keep)
    columns = slice(lead, width + keep)
    return MiniBatch(sequences=rollout.sequences[index][:, columns], attention_mask=attention[:, columns],
                     response_mask=response_mask[:, cut], logprobs=rollout.logprobs[index][:, cut],
                     ref_logprobs=rollout.ref_logprobs[index][:, cut], values=rollout.values[index][:, cut],
                     advantages=targets.advantages[index][:, cut], returns=targets.returns[index][:, cut],
                     query_width=width - lead)
