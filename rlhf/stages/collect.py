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


def run(pipeline: Pipeline, *, registry: Registry, where: str, force: bool = False, restart: bool = False,
        round: int | None = None, labels_file: str | None = None) -> Entry | None:
    """Register round R's comparisons; None when the pairs were written out for labelling."""
    settings = pipeline.rounds
    if pipeline.ppo is None:
        raise ConfigError(f"{where}: collecting needs the 'ppo' section (its prompts, lengths and gold task)")
    round = lineage.next_round(registry, pipeline.name) if round is None else round
    if round < 2:
        raise StageError(f"collect makes the comparisons of round 2 onwards; round 1's are the rm section's "
                         f"dataset ({pipeline.rm.dataset.path if pipeline.rm else 'rm.dataset'})")
    policy = policy_of(registry, pipeline, round=round)
    gold = gold_function(settings.gold or pipeline.ppo.gold, where=where)
    if settings.labeller == "gold" and gold is None:
        raise ConfigError(f"{where}: rounds.labeller 'gold' needs a task with a gold reward (rounds.gold or "
                          "ppo.gold); or use labeller: file and label the pairs yourself")
    labels_file = labels_file or settings.labels
    pairs_file = registry.root / pipeline.name / "labelling" / f"round-{round}-{policy.id}.pairs.jsonl"
    if pairs_file.is_file():
        pairs = labels.read_pairs(pairs_file)
        print(f"collect: round {round}: {len(pairs)} pairs from {pairs_file}")
    else:
        pairs = _sample_pairs(pipeline, settings, policy, round=round)
        if settings.labeller == "file":
            labels.write_pairs(pairs, pairs_file)

    if settings.labeller == "gold":
        comparisons, ties = labels.gold_labels(pairs, gold)
        skipped = 0
    elif labels_file is None:
        print(f"collect: round {round}: wrote {len(pairs)} pairs to label to {pairs_file}\n"
              f"collect: write one line per pair, {{\"id\": \"{pairs[0].id}\", \"round\": {round}, \"choice\": \"a\"}} "
              f"(a or b: the better response; skip: cannot rank), then run `make collect ROUND={round} LABELS=<file>`")
        return None
    else:
        comparisons, skipped = labels.read_labels(Path(labels_file), pairs, round=round)
        ties = 0
    if not comparisons:
        raise DataError(f"collect: round {round}: none of the {len(pairs)} pairs was ranked ({ties} ties, "
                        f"{skipped} skipped); nothing to train a reward model on")
    train, held_out = labels.split_by_prompt(comparisons, eval_fraction=settings.eval_fraction,
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
    metrics = {"collect/pairs": len(train), "collect/eval_pairs": len(held_out),
               "collect/prompts": len({p.prompt for p in pairs}), "collect/ties": ties, "collect/skipped": skipped}
    if gold is not None:  # the gold score of what the policy sampled: the round's starting point
        metrics["collect/policy_gold"] = sum(gold(p, r) for p, r in responses) / len(responses)

    def train_step(attempt: Attempt) -> dict:
        if dist.is_main():
            _write(attempt.folder / lineage.TRAIN_FILE, [c.row() for c in train])
            _write(attempt.folder / lineage.EVAL_FILE, [c.row() for c in held_out])
        print(f"collect: round {round}: {len(train)} train and {len(held_out)} eval pairs from {policy.stage} "
              f"{policy.id} ({ties} ties dropped, {skipped} skipped)")
        return metrics

    return run_stage(registry, inputs, force=force, restart=restart, train=train_step)


def policy_of(registry: Registry, pipeline: Pipeline, *, round: int) -> Entry:
    """The policy a round samples from: round R-1's PPO policy; for round 2 without a PPO entry, the SFT policy."""
    previous = lineage.newest(registry, stage="ppo", pipeline=pipeline.name, round=round - 1)
    if previous is not None:
        return previous
    if round == 2:
        return lineage.require(registry, stage="sft", pipeline=pipeline.name, explicit=pipeline.ppo.sft_parent)
    return lineage.require(registry, stage="ppo", pipeline=pipeline.name, round=round - 1)


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
