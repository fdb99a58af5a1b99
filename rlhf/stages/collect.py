"""Collect stage: new comparisons on the current policy, for the next round's reward model.

    make collect [ROUND=2] [LABELS=my-labels.jsonl]
    rlhf collect --pipeline pipelines/tiny.yaml [--round 2] [--labels my-labels.jsonl]

Samples `responses_per_prompt` responses for `num_prompts` prompts from round R-1's PPO policy (the SFT
policy when there is no PPO yet), pairs them, and has the pairs ranked by the labeller (the `rounds`
section). With `labeller: file` the first call writes the pairs to label and stops; the second, given
the labels, registers the comparisons. The entry's folder holds `comparisons.jsonl` (for training) and
`eval_comparisons.jsonl` (fresh pairs on held-out prompts, to evaluate the reward models).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf.core.prompts import left_pad, tokenize_prompts
from rlhf.core.sampling import response_texts, sample, sampling_config
from rlhf.errors import ConfigError, DataError, StageError
from rlhf.pipeline import labels, lineage
from rlhf.pipeline.config import Pipeline, RoundsSettings
from rlhf.pipeline.data import load_records, prompt_rows
from rlhf.pipeline.registry import Entry, Registry, hash_config
from rlhf.pipeline.schema import as_plain
from rlhf.stages.runner import Attempt, StageInputs, run_stage
from rlhf.tasks import gold_function
from rlhf.training import dist
from rlhf.training.models import default_device, load_policy
from rlhf.training.ppo.models import disable_dropout


@dataclass(frozen=True)
class Resolved:
    """What a collect run registers. `inputs` is None while there is nothing to register: in a plan (`dry`), or
    while the written pairs wait for your labels (labeller: file)."""

    inputs: StageInputs | None
    round: int
    policy: Entry  # roles["policy"]: the policy sampled
    pairs_file: Path  # where the pairs to label are written (labeller: file), and read back from on a rerun
    pairs: list[labels.CandidatePair] = field(default_factory=list)  # sampled or read back; empty in a plan
    train: list[labels.Comparison] = field(default_factory=list)  # ranked pairs, for the next reward model
    held_out: list[labels.Comparison] = field(default_factory=list)  # ranked pairs on held-out prompts
    ties: int = 0  # pairs the gold labeller could not rank (equal gold scores), dropped
    skipped: int = 0  # pairs you marked `skip`
    policy_gold: float | None = None  # mean gold score of the sampled responses: where the round starts


def resolve(pipeline: Pipeline, registry: Registry, *, where: str, round: int = 2, dry: bool = False,
            labels_file: str | None = None) -> Resolved:
    """The policy round R samples from (`lineage.collect_policy`) and its pairs, sampled (or read back) and ranked
    by the labeller. `dry` (`rlhf plan`) checks the settings and finds the policy, and samples and writes nothing."""
    settings = pipeline.rounds
    if pipeline.ppo is None:
        raise ConfigError(f"{where}: collecting needs the 'ppo' section (its prompts, lengths and gold task)")
    if round < 2:
        raise StageError(f"collect makes the comparisons of round 2 onwards; round 1's are the rm section's "
                         f"dataset ({pipeline.rm.dataset.path if pipeline.rm else 'rm.dataset'})")
    policy = lineage.collect_policy(registry, pipeline, round=round)
    gold = gold_function(settings.gold or pipeline.ppo.gold, where=where)
    if settings.labeller == "gold" and gold is None:
        raise ConfigError(f"{where}: rounds.labeller 'gold' needs a task with a gold reward (rounds.gold or "
                          "ppo.gold); or use labeller: file and label the pairs yourself")
    pairs_file = registry.root / pipeline.name / "labelling" / f"round-{round}-{policy.id}.pairs.jsonl"
    if dry:
        return Resolved(inputs=None, round=round, policy=policy, pairs_file=pairs_file)
    if pairs_file.is_file():
        pairs = labels.read_pairs(pairs_file)
        print(f"collect: round {round}: {len(pairs)} pairs from {pairs_file}")
    else:
        pairs = _sample_pairs(pipeline, settings, policy, round=round)
        if settings.labeller == "file":
            labels.write_pairs(pairs, pairs_file)

    labels_file = labels_file or settings.labels
    if settings.labeller == "gold":
        comparisons, ties = labels.gold_labels(pairs, gold)
        skipped = 0
    elif labels_file is None:  # the pairs wait for your labels
        return Resolved(inputs=None, round=round, policy=policy, pairs_file=pairs_file, pairs=pairs)
    else:
        comparisons, skipped = labels.read_labels(Path(labels_file), pairs, round=round)
        ties = 0
    if not comparisons:
        raise DataError(f"collect: round {round}: none of the {len(pairs)} pairs was ranked ({ties} ties, "
                        f"{skipped} skipped); nothing to train a reward model on")
    train_pairs, held_out = labels.split_by_prompt(comparisons, eval_fraction=settings.eval_fraction,
                                                   seed=pipeline.seed + round)
    section = {k: v for k, v in as_plain(settings).items() if k != "labels"}
    config = {"model": pipeline.model, "seed": pipeline.seed, "collect": section, "round": round}
    fingerprint = hash_config({"pairs": [p.id + p.a + p.b for p in pairs],
                               "comparisons": [c.row() for c in comparisons]})
    inputs = StageInputs(stage="collect", pipeline=pipeline.name, roles={"policy": policy.id}, round=round,
                         config=config, config_hash=hash_config(config), data_fingerprint=fingerprint,
                         info={"labeller": settings.labeller,
                               **({"labels": str(labels_file)} if settings.labeller == "file" else {})})
    responses = [(p.prompt, r) for p in pairs for r in (p.a, p.b)]
    policy_gold = sum(gold(p, r) for p, r in responses) / len(responses) if gold is not None else None
    return Resolved(inputs=inputs, round=round, policy=policy, pairs_file=pairs_file, pairs=pairs, train=train_pairs,
                    held_out=held_out, ties=ties, skipped=skipped, policy_gold=policy_gold)


def run(pipeline: Pipeline, *, registry: Registry, where: str, force: bool = False, restart: bool = False,
        round: int | None = None, labels_file: str | None = None) -> Entry | None:
    """Register round R's comparisons (R: the newest PPO's round + 1 unless given); None when the pairs were
    written out for labelling."""
    round = lineage.next_round(registry, pipeline.name) if round is None else round
    found = resolve(pipeline, registry, where=where, round=round, labels_file=labels_file)
    if found.inputs is None:
        print(f"collect: round {round}: wrote {len(found.pairs)} pairs to label to {found.pairs_file}\n"
              f"collect: write one line per pair, {{\"id\": \"{found.pairs[0].id}\", \"round\": {round}, "
              f"\"choice\": \"a\"}} (a or b: the better response; skip: cannot rank), then run "
              f"`make collect ROUND={round} LABELS=<file>`")
        return None
    return run_stage(registry, found.inputs, force=force, restart=restart,
                     train=lambda attempt: train(pipeline, found, attempt=attempt, registry=registry))


def train(pipeline: Pipeline, found: Resolved, *, attempt: Attempt, registry: Registry) -> dict:
    """Write the ranked pairs into the entry's folder (the next reward model trains on them); their counts."""
    if dist.is_main():
        _write(attempt.folder / lineage.TRAIN_FILE, [c.row() for c in found.train])
        _write(attempt.folder / lineage.EVAL_FILE, [c.row() for c in found.held_out])
    print(f"collect: round {found.round}: {len(found.train)} train and {len(found.held_out)} eval pairs from "
          f"{found.policy.stage} {found.policy.id} ({found.ties} ties dropped, {found.skipped} skipped)")
    metrics = {"collect/pairs": len(found.train), "collect/eval_pairs": len(found.held_out),
               "collect/prompts": len({p.prompt for p in found.pairs}), "collect/ties": found.ties,
               "collect/skipped": found.skipped}
    if found.policy_gold is not None:  # the gold score of what the policy sampled: the round's starting point
        metrics["collect/policy_gold"] = found.policy_gold
    return metrics


@torch.no_grad()
def _sample_pairs(pipeline: Pipeline, settings: RoundsSettings, policy: Entry, *,
                  round: int) -> list[labels.CandidatePair]:
    """K sampled responses for each of `num_prompts` seeded prompts, paired."""
    ppo = pipeline.ppo
    source = settings.prompts or ppo.dataset
    rows = prompt_rows(load_records(source))
    rng = random.Random(pipeline.seed + round)
    rows = rng.sample(rows, min(settings.num_prompts, len(rows)))
    device = default_device()
    tokenizer, model = load_policy(policy.path, trust_remote_code=pipeline.trust_remote_code,
                                   allow_pickle=pipeline.allow_pickle)
    disable_dropout(model)
    model.eval().to(device)
    prompts = tokenize_prompts(rows, tokenizer, max_length=ppo.max_prompt_length, long_prompts=ppo.long_prompts,
                               origin=source.path)
    config = sampling_config(max_new_tokens=settings.max_new_tokens or ppo.max_new_tokens,
                             temperature=settings.temperature, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(pipeline.seed + round)
    k = settings.responses_per_prompt
    order = [i for i in range(len(prompts.ids)) for _ in range(k)]  # each prompt K times in a row
    texts: list[str] = []
    for start in range(0, len(order), settings.batch_size):
        batch = order[start:start + settings.batch_size]
        queries, mask = (t.to(device) for t in left_pad([prompts.ids[i] for i in batch],
                                                        pad_token_id=tokenizer.pad_token_id))
        out = sample(model, queries, mask, config=config, micro_batch_size=settings.batch_size)
        texts += [text.strip() for text in response_texts(tokenizer, out.responses, out.response_mask)]
    samples = [(prompts.texts[i], [t for t in texts[i * k:(i + 1) * k] if t]) for i in range(len(prompts.ids))]
    print(f"collect: round {round}: sampled {len(texts)} responses ({k} for each of {len(prompts.ids)} prompts) "
          f"from {policy.stage} {policy.id} at temperature {settings.temperature}")
    return labels.make_pairs(samples, round=round, max_pairs_per_prompt=settings.max_pairs_per_prompt,
                             seed=pipeline.seed + round)


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
