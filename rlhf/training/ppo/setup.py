"""Loading what PPO needs from the registry's SFT and RM entries, and saving what it produced."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import PeftModel, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase, get_scheduler

from rlhf.errors import ConfigError
from rlhf.pipeline.config import Pipeline, PPOStage
from rlhf.pipeline.registry import Entry
from rlhf.training.checkpointing import enable_checkpointing
from rlhf.training.compile import compile_blocks
from rlhf.training.models import (
    load_causal_lm,
    load_model,
    load_policy,
    load_tokenizer,
    lora_config,
    lora_copy,
    whole_models,
)
from rlhf.training.ppo.models import PolicyAndValue, ValueModel, disable_dropout, standardise_head
from rlhf.training.ppo.scorer import RewardScorer
from rlhf.training.ppo.steps import Models
from rlhf.training.reward import RewardStats

VALUE_FOLDER = "value_model"  # beside the policy in the PPO entry's folder


@dataclass
class Loaded:
    tokenizer: PreTrainedTokenizerBase  # the policy's
    policy_and_value: PolicyAndValue
    reference: torch.nn.Module | None  # None with LoRA: the policy with its adapter disabled
    scorer: RewardScorer
    value_source: str  # "rm", "policy", or "none" (a critic-free algorithm)

    def rollout_models(self, unwrapped: PolicyAndValue) -> Models:
        return Models(policy_and_value=unwrapped, reference=self.reference, scorer=self.scorer)


def frozen(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A model that is only read: no dropout, no gradients, eval mode, on `device`."""
    disable_dropout(model)
    model.requires_grad_(False)
    return model.eval().to(device)


def load_models(pipeline: Pipeline, cfg: PPOStage, *, policy_entry: Entry, reference_entry: Entry, rm: Entry,
                device: torch.device, frozen_dtype: torch.dtype = torch.float32) -> Loaded:
    """The policy starts from `policy_entry` (the SFT policy, or in round R >= 2 round R-1's PPO policy); the
    KL reference is `reference_entry` (usually the SFT policy). Policy and value model load in fp32 (the
    optimiser's master weights); the frozen reference and reward model in `frozen_dtype` (bf16 under bf16
    mixed precision: half the memory, and their forward passes compute in bf16 anyway)."""
    remote, pickles = pipeline.trust_remote_code, pipeline.allow_pickle
    tokenizer, policy = load_policy(policy_entry.path, trust_remote_code=remote, allow_pickle=pickles)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the policy tokenizer of {policy_entry.id} has no EOS token; PPO needs one to end responses")
    tokenizer.padding_side = "left"
    reference = None
    if cfg.mode == "lora":
        policy = get_peft_model(policy, lora_config(cfg.lora, task_type=TaskType.CAUSAL_LM))
    if cfg.mode != "lora" or reference_entry.path != policy_entry.path:  # LoRA alone: the adapter disabled
        reference = frozen(load_causal_lm(reference_entry.path, trust_remote_code=remote, allow_pickle=pickles,
                                           dtype=frozen_dtype), device)
    if cfg.gradient_checkpointing:
        enable_checkpointing(policy)
    if cfg.compile:
        compile_blocks(policy)
    disable_dropout(policy)

    scorer = load_scorer(pipeline, rm, policy_tokenizer=tokenizer, max_length=cfg.max_prompt_length
                         + cfg.max_new_tokens + 8, batch_size=cfg.micro_batch_size, device=device, dtype=frozen_dtype)
    shares = scorer.shares_ids
    if cfg.algorithm != "ppo":  # critic-free: no value model is loaded, trained or saved
        model = PolicyAndValue(policy, None).to(device)
        return Loaded(tokenizer=tokenizer, policy_and_value=model, reference=reference, scorer=scorer,
                      value_source="none")
    if cfg.value_init == "rm" and not shares:
        raise ConfigError(f"ppo.value_init 'rm' needs a reward model with the policy's tokenizer; {rm.id} has its "
                          f"own (values are per policy token): use value_init: policy or auto")
    value_source = "rm" if cfg.value_init == "rm" or (cfg.value_init == "auto" and shares) else "policy"
    value_from = rm.path if value_source == "rm" else policy_entry.path
    value_base = load_model(AutoModelForSequenceClassification, value_from, num_labels=1, trust_remote_code=remote,
                            allow_pickle=pickles)
    value_base.config.pad_token_id = tokenizer.pad_token_id
    disable_dropout(value_base)
    if cfg.gradient_checkpointing:  # in effect in train mode only, which the stage sets for its updates
        enable_checkpointing(value_base)
    if cfg.compile:
        compile_blocks(value_base)
    value = ValueModel(value_base)
    if value_source == "rm" and cfg.normalise_scores and scorer.stats is not None:
        standardise_head(value.head, mean=scorer.stats.mean, std=scorer.stats.std)
    model = PolicyAndValue(policy, value).to(device)
    return Loaded(tokenizer=tokenizer, policy_and_value=model, reference=reference, scorer=scorer,
                  value_source=value_source)


def load_scorer(pipeline: Pipeline, rm: Entry, *, policy_tokenizer: PreTrainedTokenizerBase, max_length: int,
                batch_size: int, device: torch.device, dtype: torch.dtype) -> RewardScorer:
    """The frozen reward model of `rm`, in its own tokenizer when it has one, normalised with the statistics stored
    beside it (reward_stats.json): what PPO trains against and what PPO's and DPO's evaluations score with."""
    remote = pipeline.trust_remote_code
    model = frozen(load_model(AutoModelForSequenceClassification, rm.path, num_labels=1, trust_remote_code=remote,
                               allow_pickle=pipeline.allow_pickle, dtype=dtype), device)
    stats_file = Path(rm.path) / "reward_stats.json"
    return RewardScorer(model=model, tokenizer=load_tokenizer(rm.path, trust_remote_code=remote),
                        policy_tokenizer=policy_tokenizer,
                        stats=RewardStats.load(Path(rm.path)) if stats_file.is_file() else None,
                        max_length=max_length, batch_size=batch_size)


def parameter_groups(model: PolicyAndValue, cfg: PPOStage) -> list[dict]:
    """The trained parameters as AdamW groups: the policy's first (its rate is the one logged), then the value
    model's. Under LoRA the policy's trained parameters are its adapter's, at `lora.learning_rate` when set."""
    policy_lr = cfg.lora.learning_rate if cfg.mode == "lora" and cfg.lora.learning_rate else cfg.learning_rate
    groups = [{"params": [p for p in model.policy.parameters() if p.requires_grad], "lr": policy_lr}]
    if model.value is not None:
        groups.append({"params": [p for p in model.value.parameters() if p.requires_grad], "lr": cfg.learning_rate})
    return [group for group in groups if group["params"]]


def make_optimiser(model: PolicyAndValue, cfg: PPOStage, *, steps: int, fused: bool = False):
    """AdamW over policy and value parameters (eps 1e-5, Huang et al. 2024; `parameter_groups`), scheduled per PPO
    step. `fused`: one kernel for the whole update instead of a few per parameter (about 6% of a tiny-model step on
    one CPU thread); for whole parameters on a CPU or CUDA device, which is what the caller vouches for."""
    optimiser = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.learning_rate, eps=1e-5,
                                  weight_decay=cfg.weight_decay, fused=fused or None)
    scheduler = get_scheduler(cfg.lr_scheduler, optimiser, num_warmup_steps=int(cfg.warmup_ratio * steps),
                              num_training_steps=steps)
    return optimiser, scheduler


def save_models(accelerator: Accelerator, model: torch.nn.Module, loaded: Loaded, *, folder: Path) -> None:
    """The policy (merged, with its adapter in adapter/, under LoRA) loadable with AutoModelForCausalLM, its
    tokenizer, and the value model in value_model/ (AutoModelForSequenceClassification). `model` is the
    prepared policy-and-value module: its whole weights are gathered from every process (FSDP, ZeRO-3)."""
    state = accelerator.get_state_dict(model)  # every process takes part; the main one writes
    if not accelerator.is_main_process:
        return
    policy = loaded.policy_and_value.policy
    policy_state = {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")}
    value_state = {k[len("value.model."):]: v for k, v in state.items() if k.startswith("value.model.")}
    with whole_models(accelerator):  # the main process alone: nothing here may wait for the others
        if isinstance(policy, PeftModel):
            adapter = lora_copy(policy, policy_state)
            adapter.save_pretrained(folder / "adapter")
            policy, policy_state = adapter.merge_and_unload(), None
        policy.save_pretrained(folder, state_dict=policy_state, safe_serialization=True)
        loaded.tokenizer.save_pretrained(folder)
        if loaded.policy_and_value.value is None:  # critic-free
            return
        loaded.policy_and_value.value.model.save_pretrained(folder / VALUE_FOLDER, state_dict=value_state,
                                                            safe_serialization=True)
        loaded.tokenizer.save_pretrained(folder / VALUE_FOLDER)
