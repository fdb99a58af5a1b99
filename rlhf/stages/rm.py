"""Reward-model stage: a scalar reward trained on ranked comparisons with TRL's RewardTrainer.

    make rm [PIPELINE=pipelines/tiny.yaml] [SET="rm.learning_rate=1e-4"] [FORCE=1] [RESTART=1]
    rlhf rm --pipeline pipelines/tiny.yaml rm.init=tiny-encoder

Reads the pipeline's `rm` section, starts from the newest complete SFT entry (or `rm.init`), and
registers a sequence-classification folder (one label) with `reward_stats.json` beside the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import TaskType
from transformers import AutoModelForSequenceClassification, set_seed
from trl import RewardConfig, RewardTrainer

from rlhf.core.prompts import render_prompt
from rlhf.errors import ConfigError
from rlhf.pipeline import lineage, tracking
from rlhf.pipeline.config import DataSource, Pipeline, RMStage
from rlhf.pipeline.data import Records, common_prefix_length, comparison_set, load_records, to_dataset
from rlhf.pipeline.registry import Entry, Registry, hash_config, is_entry_id
from rlhf.pipeline.stage_config import stage_config
from rlhf.stages.base import ensure_base, ensure_built, register_external
from rlhf.stages.common import Split, load_split, tracked
from rlhf.stages.rm_keep import EvalCurve, keep_args, kept_step, report
from rlhf.stages.rm_lm import LMRegularisedRewardTrainer, lm_head_for
from rlhf.stages.runner import Attempt, StageInputs, run_stage
from rlhf.stages.trl_common import fit, training_args
from rlhf.training import dist, tiny
from rlhf.training.models import (
    default_device,
    ensure_pad_token,
    load_model,
    load_tokenizer,
    parameter_counts,
    prepare_mode,
    resolve_model_ref,
    save_final,
    whole_models,
)
from rlhf.training.reward import RewardStats, encode_text, reward_stats, score_ids


def _pairs(records: Records, cfg: RMStage) -> list[dict]:
    found = comparison_set(records, skip_invalid=cfg.skip_invalid_pairs)
    if found.skipped:
        print(f"rm: skipped {found.skipped} pairs of {records.origin} that rank nothing "
              f"(first: {found.skip_reasons[0]})")
    return found.rows


def resolve_init(pipeline: Pipeline, cfg: RMStage, registry: Registry, *, where: str,
                 dry: bool = False) -> Entry | None:
    """The entry the reward model starts from, registered if it is a model from outside the registry; with
    `dry` (`rlhf plan`), None when that would mean building or registering it."""
    if cfg.init == "sft":
        return lineage.current(registry, pipeline, stage="sft", explicit=cfg.parent, quiet=dry)
    if cfg.init == "base":
        return ensure_base(pipeline, registry, where=where, build=not dry)
    if cfg.init == "tiny-encoder":
        return ensure_built(pipeline, registry, kind="tiny-encoder", spec=cfg.encoder,
                            build=None if dry else tiny.build_encoder_reward_model)
    if is_entry_id(cfg.init):
        return lineage.require(registry, stage="sft", pipeline=pipeline.name, explicit=cfg.init)
    ref = resolve_model_ref(cfg.init, where=f"{where}: rm.init")
    if ref.kind == "tiny":
        raise ConfigError(f"{where}: rm.init 'tiny' is ambiguous; use 'base' (the pipeline's model) or 'tiny-encoder'")
    return register_external(pipeline, registry, ref, create=not dry)


@dataclass(frozen=True)
class Resolved:
    """What a reward-model run starts from."""

    inputs: StageInputs | None  # None in a plan when the backbone is not built yet
    data: Split
    init: Entry | None  # roles["base"]: the backbone (the SFT policy, the base model, round R-1's RM, ...)
    previous: Entry | None  # round R >= 2: round R-1's reward model, whose accuracy on the fresh pairs is compared


def resolve(pipeline: Pipeline, registry: Registry, *, where: str, round: int = 1, dry: bool = False) -> Resolved:
    """Round 1 trains on the rm section's dataset from rm.init; round R >= 2 on the comparisons collected for it,
    from the parents `lineage.rm_round_parents` picks. `dry` (`rlhf plan`) builds and registers nothing."""
    cfg = pipeline.rm
    if cfg is None:
        raise ConfigError(f"{where}: has no 'rm' section")
    data = load_split(cfg.dataset, cfg.eval_dataset, eval_fraction=cfg.eval_fraction, seed=pipeline.seed,
                      rows_of=lambda records: _pairs(records, cfg), max_train_samples=cfg.max_train_samples)
    roles, previous, init = {}, None, None
    if round > 1:
        parents = lineage.rm_round_parents(registry, pipeline, round=round, quiet=dry)
        data = _round_data(pipeline, cfg, parents, first=data)
        roles, previous, init = {"comparisons": parents.comparisons.id}, parents.previous, parents.base
    if init is None and dry:  # as rm.init: round 1, or rounds.rm_init rm_init
        init = resolve_init(pipeline, cfg, registry, where=where, dry=True)
    elif init is None:  # the main process builds or registers a backbone from outside; the others read its entry
        init = registry.get(dist.decide(lambda: resolve_init(pipeline, cfg, registry, where=where).id))
    if init is None:
        return Resolved(inputs=None, data=data, init=None, previous=previous)
    config = stage_config(pipeline, stage="rm", round=round)
    inputs = StageInputs(stage="rm", pipeline=pipeline.name, roles={"base": init.id, **roles}, round=round,
                         config=config, config_hash=hash_config(config), data_fingerprint=data.fingerprint,
                         info={"mode": cfg.mode, "init": cfg.init, "init_path": init.path, "init_stage": init.stage})
    return Resolved(inputs=inputs, data=data, init=init, previous=previous)


def run(pipeline: Pipeline, *, registry: Registry, where: str, force: bool = False, restart: bool = False,
        round: int = 1) -> Entry:
    found = resolve(pipeline, registry, where=where, round=round)
    print(f"rm: round {round}: starting from {found.init.stage} {found.init.id} ({found.init.path}); "
          f"{len(found.data.train)} train / {len(found.data.eval)} eval pairs")
    return run_stage(registry, found.inputs, force=force, restart=restart,
                     train=lambda attempt: train(pipeline, found, attempt=attempt, registry=registry))


def _round_data(pipeline: Pipeline, cfg: RMStage, parents: lineage.RMRoundParents, *, first: Split) -> Split:
    """Round R's data: its collected pairs, plus round 1's and the earlier rounds' training pairs with
    rounds.mix_previous (`parents.earlier` is empty without it); evaluated on its fresh held-out pairs."""

    def pairs_of(entry: Entry, file: str) -> list[dict]:
        return _pairs(load_records(DataSource(path=str(Path(entry.path) / file))), cfg)

    collected = parents.comparisons
    train, held_out = pairs_of(collected, lineage.TRAIN_FILE), pairs_of(collected, lineage.EVAL_FILE)
    mixed = pipeline.rounds.mix_previous
    if mixed:
        train = train + first.train
    for earlier in parents.earlier:
        train += pairs_of(earlier, lineage.TRAIN_FILE)
    sources = [collected.id, *(e.id for e in parents.earlier)]
    fingerprint = hash_config({"sources": sources, "first": first.fingerprint if mixed else None})
    return Split(train=train, eval=held_out, fingerprint=fingerprint)


def tokenize_pairs(rows: list[dict], tokenizer, *, max_length: int,
                   prompt_lengths: bool = False) -> tuple[list[dict], int]:
    """Rows of chosen_ids/rejected_ids (+ margin) for the trainer, and how many pairs were truncated. With
    `prompt_lengths`, each row also gets `chosen_prompt_length`: how many of its chosen_ids are the prompt's."""
    eos = tokenizer.eos_token or ""
    out, truncated = [], 0
    for row in rows:
        item, texts, cuts = {}, {}, {}
        for side in ("chosen", "rejected"):
            texts[side] = _pair_text(row, side, tokenizer, eos=eos)
            item[f"{side}_ids"], cuts[side] = encode_text(tokenizer, texts[side], max_length=max_length)
        truncated += cuts["chosen"] or cuts["rejected"]
        if "margin" in row:
            item["margin"] = row["margin"]
        if prompt_lengths:  # the whole chosen text is tokenised again only when it was cut
            whole = tokenizer(texts["chosen"])["input_ids"] if cuts["chosen"] else item["chosen_ids"]
            item["chosen_prompt_length"] = _prompt_length(row, tokenizer, whole=whole, kept=len(item["chosen_ids"]))
        out.append(item)
    return out, truncated


def _pair_text(row: dict, side: str, tokenizer, *, eos: str) -> str:
    if isinstance(row["prompt"], list):  # conversational: the chat template renders the turns
        return tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=False)
    return row["prompt"] + row[side] + eos


def _prompt_length(row: dict, tokenizer, *, whole: list[int], kept: int) -> int:
    """Tokens of the chosen side (`whole`: its ids before cutting, `kept` of them left after cutting from the left)
    that belong to the prompt: the prefix they share with the prompt's own tokens (a token merged across the
    boundary is the response's), less those cut."""
    shared = common_prefix_length(tokenizer(render_prompt(row["prompt"], tokenizer))["input_ids"], whole)
    return max(0, shared - (len(whole) - kept))


def _regulariser(pipeline: Pipeline, cfg: RMStage, init: Entry, model) -> dict:
    """The trainer's `lm_loss_coef` and `lm_head_weight` (rm.lm_loss_coef), or none, with a warning when the start
    has no next-token head to hold the hidden states to."""
    if cfg.lm_loss_coef == 0:
        return {}
    if not cfg.lm_regularised:
        weight, why = None, f"the {cfg.init} start has no next-token head"
    else:
        weight, why = lm_head_for(init.path, model, trust_remote_code=pipeline.trust_remote_code,
                                  allow_pickle=pipeline.allow_pickle)
    if weight is None:
        print(f"rm: warning: rm.lm_loss_coef {cfg.lm_loss_coef} is not applied: {why}; training on the pairwise "
              "loss alone")
        return {}
    return {"lm_loss_coef": cfg.lm_loss_coef, "lm_head_weight": weight}


def train(pipeline: Pipeline, found: Resolved, *, attempt: Attempt, registry: Registry) -> dict:
    cfg, data, previous = pipeline.rm, found.data, found.previous
    set_seed(pipeline.seed)  # the new score head a backbone gets is drawn here, before the trainer seeds anything
    tokenizer, model = _load(found.init, pipeline)
    regulariser = _regulariser(pipeline, cfg, found.init, model)  # before the trainer's arguments turn ZeRO-3 on
    peft_config = prepare_mode(model, cfg, task_type=TaskType.SEQ_CLS)
    train_rows, train_cut = tokenize_pairs(data.train, tokenizer, max_length=cfg.max_length,
                                           prompt_lengths=bool(regulariser))
    eval_rows, eval_cut = tokenize_pairs(data.eval, tokenizer, max_length=cfg.max_length)
    if not cfg.use_margin:
        for row in train_rows + eval_rows:
            row.pop("margin", None)
    if train_cut or eval_cut:
        print(f"rm: truncated {train_cut} train and {eval_cut} eval pairs to max_length {cfg.max_length} tokens "
              f"(the start of the prompt is dropped; the response end is kept)")
    kept_by = cfg.best_metric if eval_rows else "last"
    if kept_by != cfg.best_metric:
        print(f"rm: no held-out pairs: keeping the last checkpoint (rm.best_metric {cfg.best_metric} needs them)")
    args = RewardConfig(**{**training_args(pipeline, cfg, attempt, stage="rm"), **keep_args(cfg, kept_by=kept_by)},
                        max_length=cfg.max_length, center_rewards_coefficient=cfg.center_rewards_coefficient,
                        disable_dropout=True)
    trainer_class = LMRegularisedRewardTrainer if regulariser else RewardTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=to_dataset(train_rows),
                            eval_dataset=to_dataset(eval_rows), processing_class=tokenizer,
                            peft_config=peft_config, **regulariser)
    curve = EvalCurve()
    trainer.add_callback(curve)
    trainable, total = parameter_counts(trainer.model)
    print(f"rm: mode {cfg.mode}: training {trainable:,} of {total:,} parameters")

    with tracked(pipeline, attempt, registry, stage="rm"):
        fitted = fit(trainer, attempt, registry, stage="rm")  # ends with the kept checkpoint's weights loaded
        kept = kept_step(trainer, kept_by=kept_by)
        save_final(trainer, attempt.folder)
        stats = _eval_stats(trainer, eval_rows, pad_token_id=tokenizer.pad_token_id, batch_size=cfg.eval_batch_size)
        if dist.is_main():
            stats.save(attempt.folder)
        metrics = {
            "eval/accuracy": fitted.after["eval_accuracy"], "eval/loss": fitted.after["eval_loss"],
            "eval/margin": fitted.after.get("eval_margin"),
            "eval/init_accuracy": fitted.before.get("eval_accuracy"),
            "eval/kept_step": kept, "eval/last_accuracy": curve.points[-1].accuracy if curve.points else None,
            "eval/chosen_mean": stats.chosen_mean, "eval/chosen_std": stats.chosen_std,
            "eval/rejected_mean": stats.rejected_mean, "eval/rejected_std": stats.rejected_std,
            "eval/reward_mean": stats.mean, "eval/reward_std": stats.std, "eval/pairs": len(eval_rows),
            "train/mean_loss": fitted.train_loss, "train/global_step": fitted.global_step,
            "train/runtime": fitted.train_runtime, "train/pairs": len(train_rows),
            "train/truncated_pairs": train_cut + eval_cut, "train/trainable_parameters": trainable,
            **fitted.perf,
        }
        if previous is not None:  # round R: does the new model rank the fresh pairs better than round R-1's?
            metrics["eval/previous_rm_accuracy"] = _accuracy_of(previous, data.eval, pipeline=pipeline, cfg=cfg,
                                                                  accelerator=trainer.accelerator)
            print(f"rm: fresh eval pairs ranked correctly: {metrics['eval/accuracy']:.3f} by this model, "
                  f"{metrics['eval/previous_rm_accuracy']:.3f} by round {previous.round}'s {previous.id}")
        verdict = report(cfg, metrics, curve.points, kept_by=kept_by, attempt=attempt, registry=registry)
        metrics["eval/verdict"] = verdict.status
        tracking.log_summary({**metrics, "eval/verdict_problems": "; ".join(verdict.problems)})
        return metrics


def _eval_stats(trainer: RewardTrainer, rows: list[dict], *, pad_token_id: int, batch_size: int) -> RewardStats:
    """Scores of the eval split by the trained (merged, if LoRA) model."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.eval()
    return reward_stats(*_pair_scores(model, rows, pad_token_id=pad_token_id, batch_size=batch_size))


def _pair_scores(model, rows: list[dict], *, pad_token_id: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (N,) of the chosen and of the rejected side of tokenised pairs."""
    return tuple(score_ids(model, [r[f"{side}_ids"] for r in rows], pad_token_id=pad_token_id, batch_size=batch_size)
                 for side in ("chosen", "rejected"))


def _accuracy_of(entry: Entry, rows: list[dict], *, pipeline: Pipeline, cfg: RMStage, accelerator) -> float:
    """Share of `rows` that the reward model in `entry` ranks correctly (chosen scored above rejected). The
    model loads whole: under ZeRO-3 transformers would build it partitioned, and it is never prepared."""
    with whole_models(accelerator):
        tokenizer, model = _load(entry, pipeline)
    model.eval().to(default_device())
    encoded, _ = tokenize_pairs(rows, tokenizer, max_length=cfg.max_length)
    chosen, rejected = _pair_scores(model, encoded, pad_token_id=tokenizer.pad_token_id,
                                    batch_size=cfg.eval_batch_size)
    return float((chosen > rejected).float().mean())


def _load(entry: Entry, pipeline: Pipeline):
    """(tokenizer, one-label sequence-classification model) of `entry`, with a pad token distinct from EOS."""
    tokenizer = load_tokenizer(entry.path, trust_remote_code=pipeline.trust_remote_code)
    model = load_model(AutoModelForSequenceClassification, entry.path, num_labels=1,
                       trust_remote_code=pipeline.trust_remote_code, allow_pickle=pipeline.allow_pickle)
    ensure_pad_token(tokenizer, model)
    return tokenizer, model
