"""The final evaluation on held-out prompts: reward-model score, KL to the reference, gold score."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from rlhf.ppo import maths
from rlhf.ppo.generation import response_texts, sample
from rlhf.ppo.models import response_logits
from rlhf.ppo.prompts import PromptSet, left_pad
from rlhf.ppo.scorer import RewardScorer
from rlhf.tasks import GoldFn


@dataclass(frozen=True)
class PolicyEval:
    score: float  # mean reward-model score, normalised with the RM's statistics
    raw_score: float  # mean reward-model score as the model outputs it
    kl: float  # mean over prompts of the summed per-token KL (k1) to the reference
    gold: float | None  # mean gold score, when the task has one
    length: float  # mean response tokens (EOS included)
    eos_rate: float  # share of responses that ended with EOS
    samples: list[tuple[str, str, float]]  # (prompt, response, score) of the first few prompts

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}score": self.score, f"{prefix}raw_score": self.raw_score, f"{prefix}kl": self.kl,
               f"{prefix}length": self.length, f"{prefix}eos_rate": self.eos_rate}
        if self.gold is not None:
            out[f"{prefix}gold"] = self.gold
        return out


@torch.no_grad()
def evaluate(policy, reference_logits: Callable[[Tensor, Tensor, int], Tensor], scorer: RewardScorer,
             prompts: PromptSet, tokenizer, *, generation, temperature: float, batch_size: int,
             gold: GoldFn | None, seed: int, device: torch.device, keep_samples: int = 8) -> PolicyEval:
    """Sample one response per prompt (seeded, so two policies see the same random stream) and score it."""
    torch.manual_seed(seed)
    scores, raws, kls, golds, lengths, eos, samples = [], [], [], [], [], [], []
    for start in range(0, len(prompts.ids), batch_size):
        queries, query_mask = (t.to(device) for t in left_pad(prompts.ids[start:start + batch_size],
                                                              pad_token_id=tokenizer.pad_token_id))
        out = sample(policy, queries, query_mask, config=generation, micro_batch_size=batch_size)
        width = queries.shape[1]
        sequences = torch.cat([queries, out.responses], dim=1)
        attention = torch.cat([query_mask, out.response_mask.long()], dim=1)
        logprobs = maths.logprobs_from_logits(response_logits(policy, sequences, attention, query_width=width),
                                              out.responses, temperature=temperature)
        ref = maths.logprobs_from_logits(reference_logits(sequences, attention, width), out.responses,
                                         temperature=temperature)
        kls.append(maths.masked_sum(logprobs - ref, out.response_mask, dim=1).cpu())
        raw = scorer.raw(queries, query_mask, out.responses, out.response_mask).cpu()
        raws.append(raw)
        scores.append(scorer.normalise(raw, enabled=True))
        lengths.append(out.response_mask.sum(dim=1).float().cpu())
        eos.append(out.has_eos.float().cpu())
        for row, text in enumerate(response_texts(tokenizer, out.responses, out.response_mask)):
            prompt = prompts.texts[start + row]
            if gold is not None:
                golds.append(gold(prompt, text))
            if len(samples) < keep_samples:
                samples.append((prompt, text, float(scores[-1][row])))
    mean = lambda parts: float(torch.cat(parts).mean())  # noqa: E731
    return PolicyEval(score=mean(scores), raw_score=mean(raws), kl=mean(kls),
                      gold=sum(golds) / len(golds) if gold is not None else None, length=mean(lengths),
                      eos_rate=mean(eos), samples=samples)
