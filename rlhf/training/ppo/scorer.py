"""Scores of sampled responses by the frozen reward model, in its own tokenizer when it has one."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.training.ppo.models import same_tokenizer
from rlhf.training.reward import RewardStats, encode_text, score_ids


@dataclass
class RewardScorer:
    model: PreTrainedModel  # frozen sequence-classification model, one label
    tokenizer: PreTrainedTokenizerBase  # the reward model's
    policy_tokenizer: PreTrainedTokenizerBase
    stats: RewardStats | None  # eval-split statistics stored with the reward model
    max_length: int  # tokens the reward model reads (from the left-cut end)
    batch_size: int

    def __post_init__(self) -> None:
        self.shares_ids = same_tokenizer(self.tokenizer, self.policy_tokenizer)

    @torch.no_grad()
    def raw(self, queries: Tensor, query_mask: Tensor, responses: Tensor, response_mask: Tensor) -> Tensor:
        """Reward-model scores (B,) of prompt + response (up to and including EOS)."""
        sequences = []
        for q, qm, r, rm in zip(queries, query_mask.bool(), responses, response_mask.bool()):
            if self.shares_ids:  # the policy's ids are the reward model's: no decode / re-encode round trip
                sequences.append(q[qm].tolist() + r[rm].tolist())
            else:
                sequences.append(self._retokenize(q[qm].tolist(), r[rm].tolist()))
        return score_ids(self.model, sequences, pad_token_id=self.tokenizer.pad_token_id,
                         batch_size=self.batch_size)

    def _retokenize(self, query: list[int], response: list[int]) -> list[int]:
        """The same text in the reward model's tokenizer, ended with its EOS as in its training data."""
        text = self.policy_tokenizer.decode(query + response, skip_special_tokens=True)
        ended = response and response[-1] == self.policy_tokenizer.eos_token_id
        if ended and self.tokenizer.eos_token:
            text += self.tokenizer.eos_token
        return encode_text(self.tokenizer, text, max_length=self.max_length)[0]

    def normalise(self, raw: Tensor, *, enabled: bool) -> Tensor:
        if not enabled or self.stats is None:
            return raw
        std = self.stats.std if self.stats.std > 0 else 1.0
        return (raw - self.stats.mean) / std


def training_scores(normalised: Tensor, has_eos: Tensor, *, missing_eos_penalty: float | None,
                    score_clip: float | None) -> Tensor:
    """The score PPO maximises: clipped, then lowered for responses that never ended (Huang et al. 2024)."""
    scores = normalised.clone()
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)
    if missing_eos_penalty is not None:
        scores = torch.where(has_eos, scores, scores - missing_eos_penalty)
    return scores
