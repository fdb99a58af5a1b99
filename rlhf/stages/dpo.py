"""DPO stage: direct preference optimisation on the ranked comparisons with TRL's DPOTrainer, beside PPO.

    make dpo [PIPELINE=pipelines/tiny.yaml] [SET="dpo.beta=0.2"] [FORCE=1] [RESTART=1]
    rlhf dpo --pipeline pipelines/tiny.yaml dpo.sft_parent=sft-… dpo.rm_parent=rm-…

Reads the pipeline's `dpo` section; trains the newest complete SFT policy (or `dpo.sft_parent`) on the rm section's
pairs (or `dpo.dataset`), anchored to that same policy (a frozen copy, or with LoRA the policy with its adapter
disabled). The reward model (`dpo.rm_parent`) trains nothing: it scores the final evaluation, which is PPO's
(rlhf/training/ppo/evaluate.py: held-out prompts sampled by the DPO and the SFT policy, RM score, summed KL to the
SFT policy, gold score) under PPO's metric names, so that `rlhf compare` shows DPO beside PPO. Registers a causal-LM
folder (LoRA: merged, with the adapter in `adapter/`). After Rafailov et al. 2023.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from peft import TaskType
from trl import DPOConfig, DPOTrainer

from rlhf.core.prompts import tokenize_prompts
from rlhf.core.sampling import sampling_config
from rlhf.errors import ConfigError, DataError
from rlhf.pipeline import lineage, rm_verdict, tracking
from rlhf.pipeline.config import DataSource, Pipeline, PPOStage
from rlhf.pipeline.data import InvalidPair, Records, comparison_set, load_records, prompt_rows, to_dataset
from rlhf.pipeline.registry import Entry, Registry, hash_config
from rlhf.pipeline.schema import as_plain
from rlhf.pipeline.stage_config import stage_config
from rlhf.stages.common import Split, load_split, tracked
from rlhf.stages.runner import Attempt, StageInputs, run_stage
from rlhf.stages.trl_common import fit, training_args
from rlhf.tasks import GOLD, gold_function
from rlhf.training import dist
from rlhf.training.models import (
    ensure_pad_token,
    load_causal_lm,
    load_policy,
    load_tokenizer,
    parameter_counts,
    prepare_mode,
    save_final,
    whole_models,
)
from rlhf.training.ppo.evaluate import evaluate, shard, side_by_side
from rlhf.training.ppo.models import response_logits
from rlhf.training.ppo.report import peak_memory_mb
from rlhf.training.ppo.setup import frozen, load_scorer

_PPO_DEFAULTS = {f.name: f.default for f in dataclasses.fields(PPOStage)}


@dataclass(frozen=True)
class Evaluation:
    """PPO's final evaluation as this run makes it. Each setting is the dpo section's, else the ppo section's, else
    PPO's default; the prompt length cap and the generation batch size have no dpo field (the seeded sampling
    draws PPO's random stream only at PPO's batch size), so a pipeline's DPO and PPO entries are measured alike."""

    prompts: list[dict]  # {"prompt": text or messages}, at most max_eval_prompts
    origin: str  # where the prompts come from, for messages
    fingerprint: str  # of the prompts' source
    max_prompt_length: int  # prompt tokens kept (the end); longer prompts are cut, or skipped with long_prompts: skip
    long_prompts: str
    max_new_tokens: int
    temperature: float
    batch_size: int  # prompts per generate call
    gold: str | None

    def settings(self) -> dict:
        """What identifies it, for the config hash and the registry (not the prompts themselves)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("prompts", "fingerprint")}

    def describe(self) -> str:
        gold = f", gold {self.gold}" if self.gold else ""
        return (f"{len(self.prompts)} prompts of {self.origin}, {self.max_new_tokens} new tokens at temperature "
                f"{self.temperature}{gold}")


@dataclass(frozen=True)
class Resolved:
    """What a DPO run starts from."""

    inputs: StageInputs
    data: Split  # {"prompt", "chosen", "rejected"} pairs
    sft: Entry  # roles["policy"] and roles["reference"]: the policy trained, and the anchor it is kept near
    reward: Entry  # roles["reward"]: scores the final evaluation only
    evaluation: Evaluation


def resolve(pipeline: Pipeline, registry: Registry, *, where: str, round: int = 1, dry: bool = False) -> Resolved:
    """The pairs, the SFT policy and the reward model, and the final evaluation's settings. DPO runs in round 1
    only; `dry` (`rlhf plan`) changes nothing, since nothing here builds or registers a model."""
    cfg = pipeline.dpo
    if cfg is None:
        raise ConfigError(f"{where}: has no 'dpo' section")
    if round != 1:
        raise ConfigError(f"{where}: DPO runs in round 1 only (rounds are collect -> rm -> ppo), not round {round}")
    dataset, eval_dataset = _sources(pipeline, where=where)
    data = load_split(dataset, eval_dataset, eval_fraction=cfg.eval_fraction, seed=pipeline.seed,
                      rows_of=lambda records: _pairs(records, skip_invalid=cfg.skip_invalid_pairs),
                      max_train_samples=cfg.max_train_samples)
    evaluation = _evaluation(pipeline, data, where=where)
    sft = lineage.current(registry, pipeline, stage="sft", explicit=cfg.sft_parent, quiet=dry)
    reward = lineage.current(registry, pipeline, stage="rm", explicit=cfg.rm_parent, quiet=dry)
    config = stage_config(pipeline, stage="dpo")
    config["dpo"].update(dataset=as_plain(dataset), eval_dataset=as_plain(eval_dataset),
                         evaluation=evaluation.settings())  # the defaults taken from other sections, resolved
    inputs = StageInputs(stage="dpo", pipeline=pipeline.name, config=config, config_hash=hash_config(config),
                         roles={"policy": sft.id, "reference": sft.id, "reward": reward.id},
                         data_fingerprint=hash_config({"pairs": data.fingerprint, "prompts": evaluation.fingerprint}),
                         info={"mode": cfg.mode, "evaluation": evaluation.describe()})
    return Resolved(inputs=inputs, data=data, sft=sft, reward=reward, evaluation=evaluation)


def run(pipeline: Pipeline, *, registry: Registry, where: str, force: bool = False, restart: bool = False) -> Entry:
    found = resolve(pipeline, registry, where=where)
    print(f"dpo: policy and reference from sft {found.sft.id}; reward model {found.reward.id} scores the evaluation "
          f"only; {len(found.data.train)} train / {len(found.data.eval)} eval pairs")
    verdict = rm_verdict.of_entry(found.reward)
    print(f"dpo: {'warning: ' if verdict is not None and verdict.status == 'weak' else ''}reward model "
          f"{found.reward.id}: " + (verdict.line() if verdict else "no held-out accuracy recorded"))
    print(f"dpo: final evaluation as PPO's: {found.evaluation.describe()}")
    return run_stage(registry, found.inputs, force=force, restart=restart,
                     train=lambda attempt: train(pipeline, found, attempt=attempt, registry=registry))


def train(pipeline: Pipeline, found: Resolved, *, attempt: Attempt, registry: Registry) -> dict:
    cfg, data = pipeline.dpo, found.data
    remote, pickles = pipeline.trust_remote_code, pipeline.allow_pickle
    tokenizer, model = load_policy(found.sft.path, trust_remote_code=remote, allow_pickle=pickles)
    peft_config = prepare_mode(model, cfg, task_type=TaskType.CAUSAL_LM)
    args = DPOConfig(**training_args(pipeline, cfg, attempt, stage="dpo"), max_length=cfg.max_length, beta=cfg.beta,
                     loss_type=[cfg.loss_type], disable_dropout=True)
    reference = None  # LoRA: TRL takes the policy with its adapter disabled (no second copy)
    if peft_config is None:  # loaded here rather than by TRL, so it passes our safetensors check
        reference = load_causal_lm(found.sft.path, trust_remote_code=remote, allow_pickle=pickles,
                                   dtype=torch.bfloat16 if args.bf16 else torch.float32)
        ensure_pad_token(tokenizer, reference)
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=to_dataset(data.train),
                         eval_dataset=to_dataset(data.eval), processing_class=tokenizer, peft_config=peft_config)
    trainable, total = parameter_counts(trainer.model)
    print(f"dpo: mode {cfg.mode}: training {trainable:,} of {total:,} parameters, beta {cfg.beta}, "
          f"loss {cfg.loss_type}")

    with tracked(pipeline, attempt, registry, stage="dpo"):
        fitted = fit(trainer, attempt, registry, stage="dpo")
        save_final(trainer, attempt.folder)
        dist.barrier()  # every process reads the saved policy back for the evaluation
        final = evaluate_policies(pipeline, found, folder=attempt.folder, accelerator=trainer.accelerator)
        metrics = {
            **final,
            "eval/loss": fitted.after["eval_loss"],
            "eval/reward_accuracy": fitted.after.get("eval_rewards/accuracies"),
            "eval/reward_margin": fitted.after.get("eval_rewards/margins"),
            "eval/pairs": len(data.eval), "train/mean_loss": fitted.train_loss,
            "train/global_step": fitted.global_step, "train/seconds": fitted.train_runtime,
            "train/pairs": len(data.train), "train/trainable_parameters": trainable,
            "train/peak_memory_mb": peak_memory_mb(trainer.accelerator.device),  # on a GPU, the trainer's own wins
            **fitted.perf,
        }
        tracking.log_summary(metrics)
        return metrics


def evaluate_policies(pipeline: Pipeline, found: Resolved, *, folder: Path, accelerator: Accelerator) -> dict:
    """PPO's final evaluation of the saved DPO policy beside the SFT policy, with the same seeded sampling, metric
    names and reward scorer as `rlhf/training/ppo/report.py::evaluate_policies`. Every process samples its share of
    the prompts with whole models read from disk, which works however training was sharded."""
    settings, device = found.evaluation, accelerator.device
    remote, pickles = pipeline.trust_remote_code, pipeline.allow_pickle
    frozen_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32  # as PPO's
    with whole_models(accelerator):
        tokenizer = load_tokenizer(str(folder), trust_remote_code=remote)
        policy = frozen(load_causal_lm(str(folder), trust_remote_code=remote, allow_pickle=pickles), device)
        reference = frozen(load_causal_lm(found.sft.path, trust_remote_code=remote, allow_pickle=pickles,
                                           dtype=frozen_dtype), device)
        scorer = load_scorer(pipeline, found.reward, policy_tokenizer=tokenizer, max_length=settings.max_prompt_length
                             + settings.max_new_tokens + 8, batch_size=settings.batch_size, device=device,
                             dtype=frozen_dtype)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer of {found.sft.id} has no EOS token; the evaluation needs one to end "
                          "responses")
    prompts = tokenize_prompts(settings.prompts, tokenizer, max_length=settings.max_prompt_length,
                               long_prompts=settings.long_prompts, origin=settings.origin)
    generation = sampling_config(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    rank = accelerator.process_index
    common = dict(indices=shard(len(prompts.ids), rank=rank, processes=accelerator.num_processes),
                  generation=generation, temperature=settings.temperature, batch_size=settings.batch_size,
                  gold=gold_function(settings.gold, where="dpo"), seed=pipeline.seed + rank, device=device)

    def reference_logits(sequences, attention, width):
        return response_logits(reference, sequences, attention, query_width=width)

    with accelerator.autocast():
        trained = evaluate(policy, reference_logits, scorer, prompts, tokenizer, **common)
        baseline = evaluate(reference, reference_logits, scorer, prompts, tokenizer, **common)
    return side_by_side(gather_object(trained), gather_object(baseline), prompts.texts, stage="dpo",
                        main=accelerator.is_main_process)


# ---- inputs ----------------------------------------------------------------------------------------------------


def _sources(pipeline: Pipeline, *, where: str) -> tuple[DataSource, DataSource | None]:
    """The pairs: the dpo section's, else the rm section's with its eval_dataset (then, at the same eval_fraction
    and seed, DPO holds out the very pairs the reward model was evaluated on)."""
    cfg = pipeline.dpo
    if cfg.dataset is not None:
        return cfg.dataset, cfg.eval_dataset
    if pipeline.rm is None:
        raise ConfigError(f"{where}: 'dpo.dataset' is unset and there is no 'rm' section to take the pairs from")
    return pipeline.rm.dataset, cfg.eval_dataset or pipeline.rm.eval_dataset


def _pairs(records: Records, *, skip_invalid: bool) -> list[dict]:
    """Explicit-prompt pairs (implicit prompts extracted, bad pairs refused or skipped); DPO has no margin."""
    try:
        found = comparison_set(records, skip_invalid=skip_invalid)
    except InvalidPair as err:
        raise DataError(f"{err}; set dpo.skip_invalid_pairs: true to skip the pairs that rank nothing") from None
    if found.skipped:
        print(f"dpo: skipped {found.skipped} pairs of {records.origin} that rank nothing "
              f"(first: {found.skip_reasons[0]})")
    return [{"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]} for row in found.rows]


def _evaluation(pipeline: Pipeline, pairs: Split, *, where: str) -> Evaluation:
    cfg, ppo = pipeline.dpo, pipeline.ppo

    def from_ppo(name: str):  # the ppo section's, else PPO's default
        return getattr(ppo, name) if ppo is not None else _PPO_DEFAULTS[name]

    def setting(name: str):  # the dpo section's, else as from_ppo
        value = getattr(cfg, name)
        return from_ppo(name) if value is None else value

    if cfg.eval_prompts is not None:
        records = load_records(cfg.eval_prompts)
        rows, origin, fingerprint = prompt_rows(records), records.origin, records.fingerprint
    elif ppo is not None:  # PPO's own held-out prompts
        held_out = load_split(ppo.dataset, ppo.eval_prompts, eval_fraction=ppo.eval_fraction, seed=pipeline.seed,
                              rows_of=prompt_rows)
        rows, origin, fingerprint = held_out.eval, (ppo.eval_prompts or ppo.dataset).path, held_out.fingerprint
    else:  # the prompts of the held-out pairs, each once
        unique = {json.dumps(row["prompt"]): row["prompt"] for row in pairs.eval}
        rows, origin, fingerprint = [{"prompt": p} for p in unique.values()], "the held-out pairs", pairs.fingerprint
    gold = setting("gold")
    if gold is not None and gold not in GOLD:
        raise ConfigError(f"{where}: dpo.gold '{gold}' is not a task with a gold reward (known: {', '.join(GOLD)})")
    return Evaluation(prompts=rows[:cfg.max_eval_prompts], origin=origin, fingerprint=fingerprint,
                      max_prompt_length=from_ppo("max_prompt_length"), long_prompts=from_ppo("long_prompts"),
                      max_new_tokens=setting("max_new_tokens"), temperature=setting("temperature"),
                      batch_size=from_ppo("eval_batch_size"), gold=gold)


# ---- models for the evaluation -----------------------------------------------------------------------------------
