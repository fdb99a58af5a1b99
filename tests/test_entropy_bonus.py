"""PPO's entropy bonus (`ppo.entropy_coef`): with it, a step on a rollout that carries no advantage raises the
policy's entropy; without it, the same step leaves the policy where it was."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlhf.core import maths
from rlhf.pipeline.config import ConfigError, DataSource, PPOStage, load_pipeline
from rlhf.training.ppo.steps import _micro_step

VOCAB, LENGTH, ROWS, WIDTH = 11, 5, 4, 3


class TablePolicy(torch.nn.Module):
    """Logits that are one learned table per response position, the same for every row; no value model."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(1, LENGTH, VOCAB, generator=torch.Generator().manual_seed(0)) * 3)

    def forward(self, sequences, attention_mask, *, query_width, group):
        return self.table.expand(sequences.shape[0], -1, -1), None


def batch(model: TablePolicy) -> SimpleNamespace:
    """Responses drawn anywhere, their log-probabilities the policy's own (ratio 1) and every advantage 0."""
    sequences = torch.randint(0, VOCAB, (ROWS, WIDTH + LENGTH), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = model(sequences, None, query_width=WIDTH, group=1)
        logprobs = maths.logprobs_from_logits(logits, sequences[:, WIDTH:], temperature=0.7)
    return SimpleNamespace(query_width=WIDTH, sequences=sequences, attention_mask=torch.ones_like(sequences),
                           response_mask=torch.ones(ROWS, LENGTH, dtype=torch.bool), logprobs=logprobs,
                           advantages=torch.zeros(ROWS, LENGTH))


def entropy(model: TablePolicy) -> float:
    return float(maths.entropy_from_logits(model.table.detach(), temperature=0.7).mean())


@pytest.mark.parametrize("coef", [0.0, 0.1])
def test_the_bonus_raises_entropy_and_nothing_moves_without_it(coef):
    model = TablePolicy()
    cfg = PPOStage(dataset=DataSource(path="p.jsonl"), temperature=0.7, entropy_coef=coef)
    optimiser = torch.optim.SGD(model.parameters(), lr=5.0)
    start, data = entropy(model), batch(model)
    for _ in range(20):
        stats = _micro_step(model, data, cfg=cfg, backward=torch.Tensor.backward, kl_coef=0.0, with_entropy=True)
        optimiser.step()
        optimiser.zero_grad()
    assert stats["policy_loss"] == pytest.approx(0.0, abs=1e-6)  # no advantage: the clipped term pulls nowhere
    if coef:
        assert entropy(model) > start + 0.1, (start, entropy(model))
        assert stats["entropy"] == pytest.approx(entropy(model), abs=0.05)  # the logged entropy is the bonus's
    else:
        assert entropy(model) == pytest.approx(start, abs=1e-6)


def test_a_negative_entropy_coef_is_refused():
    with pytest.raises(ConfigError, match=r"ppo.entropy_coef' must be at least 0, got -0.1"):
        load_pipeline("pipelines/tiny.yaml", ["ppo.entropy_coef=-0.1"])
