"""The final evaluation on held-out prompts: reward-model score, KL to the reference, gold score."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf.core import maths
from rlhf.core.prompts import PromptSet, left_pad
from rlhf.core.sampling import response_texts, sample
from rlhf.tasks import GoldFn
from rlhf.training.ppo.models import response_logits
from rlhf.training.ppo.scorer import RewardScorer


@dataclass(frozen=True)
class PromptResult:
    """One held-out prompt's sampled response and what was measured of it."""

    index: int  # into the PromptSet
    score: float  # reward-model score, normalised with the RM's statistics
    raw_score: float  # reward-model score as the model outputs it
    kl: float  # summed per-token KL (k1) to the reference
    gold: float | None  # gold score, when the task has one
    length: int  # response tokens (EOS included)
    eos: bool  # the response ended with EOS
    response: str


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


def shard(count: int, *, rank: int, processes: int) -> list[int]:
    """The prompt indices process `rank` evaluates: every `processes`-th, padded with repeats of its last one
    so that every process makes the same number of generate calls (sharded models step together)."""
    if count == 0:
        return []
    mine = list(range(rank, count, processes)) or [count - 1]
    return mine + [mine[-1]] * (-(-count // processes) - len(mine))


def summarise(results: list[PromptResult], texts: list[str], *, keep_samples: int = 8) -> PolicyEval:
    """Means over distinct prompts (the repeats `shard` padded with count once), samples in prompt order."""
    unique = sorted({r.index: r for r in reversed(results)}.values(), key=lambda r: r.index)
    if not unique:
        raise ValueError("no evaluation results to summarise")
    mean = lambda values: sum(values) / len(unique)  # noqa: E731
    golds = [r.gold for r in unique]
    return PolicyEval(score=mean(r.score for r in unique), raw_score=mean(r.raw_score for r in unique),
                      kl=mean(r.kl for r in unique), gold=None if None in golds else mean(golds),
                      length=mean(r.length for r in unique), eos_rate=mean(float(r.eos) for r in unique),
                      samples=[(texts[r.index], r.response, r.score) for r in unique[:keep_samples]])


def side_by_side(trained: list[PromptResult], baseline: list[PromptResult], texts: list[str], *, stage: str,
                 main: bool) -> dict:
    """The trained policy's and its reference's results (every process's, gathered) as `eval/…` and `eval/sft_…`
    metrics with `eval/gold_gain`, printed with a few samples on the main process: the same for PPO and DPO."""
    trained, baseline = summarise(trained, texts), summarise(baseline, texts)
    metrics = {**trained.metrics("eval/"), **baseline.metrics("eval/sft_"), "eval/prompts": len(texts)}
    if trained.gold is not None:
        metrics["eval/gold_gain"] = trained.gold - baseline.gold
    if main:
        print(f"{stage}: eval " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
        for prompt, response, score in trained.samples[:4]:
            print(f"{stage}: sample {prompt.strip()!r} -> {response!r} (score {score:.2f})")
    return metrics


@torch.no_grad()
def evaluate(policy, reference_logits: Callable[[Tensor, Tensor, int], Tensor], scorer: RewardScorer,
             prompts: PromptSet, tokenizer, *, indices: list[int], generation, temperature: float, batch_size: int,
             gold: GoldFn | None, seed: int, device: torch.device, synced: bool = False) -> list[PromptResult]:
    """Sample one response for each of `indices` (seeded, so two policies see the same random stream) and
    measure it."""
    torch.manual_seed(seed)
    results = []
    for start in range(0, len(indices), batch_size):
        rows = indices[start:start + batch_size]
        queries, query_mask = (t.to(device) for t in left_pad([prompts.ids[i] for i in rows],
                                                              pad_token_id=tokenizer.pad_token_id))
        out = sample(policy, queries, query_mask, config=generation, micro_batch_size=batch_size, synced=synced)
        width = queries.shape[1]
        sequences = torch.cat([queries, out.responses], dim=1)
        attention = torch.cat([query_mask, out.response_mask.long()], dim=1)
        logprobs = maths.logprobs_from_logits(response_logits(policy, sequences, attention, query_width=width),
                                              out.responses, temperature=temperature)
        ref = maths.logprobs_from_logits(reference_logits(sequences, attention, width), out.responses,
                                         temperature=temperature)
        kls = maths.masked_sum(logprobs - ref, out.response_mask, dim=1).tolist()
        raw = scorer.raw(queries, query_mask, out.responses, out.response_mask)
        scores, raws = scorer.normalise(raw, enabled=True).tolist(), raw.tolist()  # one device copy each
        lengths, eos = out.response_mask.sum(dim=1).tolist(), out.has_eos.tolist()
        texts = response_texts(tokenizer, out.responses, out.response_mask)
        for j, index in enumerate(rows):
            results.append(PromptResult(
                index=index, score=scores[j], raw_score=raws[j], kl=kls[j],
                gold=gold(prompts.texts[index], texts[j]) if gold is not None else None, length=lengths[j],
                eos=eos[j], response=texts[j]))
    return results
