"""Scoring with a reward model, and the reward statistics saved beside its checkpoint.

The RM stage writes `reward_stats.json` (mean and std of eval-split scores) so PPO can normalise
scores; PPO scores policy text with the same helpers, re-tokenising for the reward model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

STATS_FILE = "reward_stats.json"


@dataclass(frozen=True)
class RewardStats:
    """Scores of the eval split, from which PPO normalises: (score - mean) / std."""

    mean: float  # over chosen and rejected scores together
    std: float
    chosen_mean: float
    chosen_std: float
    rejected_mean: float
    rejected_std: float
    pairs: int

    def save(self, folder: Path) -> None:
        (folder / STATS_FILE).write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> RewardStats:
        return cls(**json.loads((folder / STATS_FILE).read_text(encoding="utf-8")))


def _mean_std(values: torch.Tensor) -> tuple[float, float]:
    return values.mean().item(), values.std(unbiased=False).item() if values.numel() > 1 else 0.0


def reward_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> RewardStats:
    """Statistics of paired scores: chosen (N,), rejected (N,)."""
    both = torch.cat([chosen, rejected])
    mean, std = _mean_std(both)
    chosen_mean, chosen_std = _mean_std(chosen)
    rejected_mean, rejected_std = _mean_std(rejected)
    return RewardStats(mean=mean, std=std, chosen_mean=chosen_mean, chosen_std=chosen_std,
                       rejected_mean=rejected_mean, rejected_std=rejected_std, pairs=len(chosen))


@torch.no_grad()
def score_ids(model: PreTrainedModel, sequences: list[list[int]], *, pad_token_id: int,
              batch_size: int = 32) -> torch.Tensor:
    """Scalar scores (N,) of token-id sequences, right-padded batch by batch.

    Sequence-classification heads read the last non-pad token, so pad must never be a real token.
    """
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        scores.append(logits[:, 0].float().cpu())
    result = torch.cat(scores) if scores else torch.zeros(0)
    if not torch.isfinite(result).all():
        bad = int((~torch.isfinite(result)).sum())
        raise FloatingPointError(f"the reward model returned {bad} non-finite scores (NaN or inf)")
    return result


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str, *, max_length: int) -> tuple[list[int], bool]:
    """Token ids of `text` for a reward model, cut to `max_length` from the left (the response end,
    which the reward reads, is kept); returns (ids, was_truncated)."""
    ids = tokenizer(text)["input_ids"]
    if len(ids) <= max_length:
        return ids, False
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        return tokenizer(text, truncation=True, max_length=max_length)["input_ids"], True
    finally:
        tokenizer.truncation_side = side
