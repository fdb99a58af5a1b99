"""Pipeline files: one dataclass per stage, YAML keys are field names, unknown keys are errors.

    rlhf sft --pipeline pipelines/tiny.yaml sft.learning_rate=1e-4 sft.dataset=data/my.jsonl

A pipeline file holds `name`, `model` and one section per stage (`sft`, `rm`, `ppo`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from rlhf.core.alarms import AlarmConfig
from rlhf.errors import ConfigError
from rlhf.pipeline import schema
from rlhf.pipeline.order import SECTIONS
from rlhf.pipeline.registry import SAFE_NAME

# Real models' shapes for `tiny.shape`, from each one's config.json on the hub (Qwen/Qwen2.5-0.5B, -1.5B, -7B):
# random weights of exactly that size, without the hub. The tokenizer stays the small local one.
TINY_SHAPES: dict[str, dict] = {
    "qwen2.5-0.5b": dict(architecture="qwen2", num_hidden_layers=24, hidden_size=896, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, model_vocab_size=151936,
                         tie_word_embeddings=True, rope_theta=1.0e6),
    "qwen2.5-1.5b": dict(architecture="qwen2", num_hidden_layers=28, hidden_size=1536, num_attention_heads=12,
                         num_key_value_heads=2, intermediate_size=8960, model_vocab_size=151936,
                         tie_word_embeddings=True, rope_theta=1.0e6),
    "qwen2.5-7b": dict(architecture="qwen2", num_hidden_layers=28, hidden_size=3584, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, model_vocab_size=152064,
                       tie_word_embeddings=False, rope_theta=1.0e6),
}


@dataclass
class TinyModelSpec:
    """Size of the tiny Llama-style model; the defaults give about 0.3M parameters. `shape` gives a real
    model's size instead (random weights, the local tokenizer)."""

    vocab_size: int = 1024
    """target BPE vocabulary size, special tokens included (a small corpus may yield fewer merges)"""
    hidden_size: int = 64
    """width of the residual stream"""
    intermediate_size: int = 256
    """width of the SwiGLU MLP"""
    num_hidden_layers: int = 4
    """number of decoder layers"""
    num_attention_heads: int = 4
    """number of query heads; must divide hidden_size"""
    num_key_value_heads: int = 4
    """number of key/value heads (fewer than query heads gives grouped-query attention)"""
    max_position_embeddings: int = 512
    """longest sequence in tokens; also the tokenizer's model_max_length"""
    shape: Literal["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"] | None = None
    """a real model's shape (TINY_SHAPES): sets the architecture, sizes, model vocabulary, tying and rope theta"""
    architecture: Literal["llama", "qwen2"] = "llama"
    """llama, or qwen2 (biases on the query, key and value projections)"""
    model_vocab_size: int | None = None
    """rows of the embedding and output matrices; unset: the tokenizer's size (larger: ids no text uses)"""
    tie_word_embeddings: bool = True
    """share one matrix between the input embeddings and the output head"""
    rope_theta: float | None = None
    """base of the rotary position frequencies; unset: the architecture's default (10000)"""
    initializer_range: float | None = None
    """standard deviation of the random initial weights; unset: transformers' 0.02 (set for a width of 768 and
    more: a 64-wide model at 0.02 starts with near-uniform attention and is slow to learn to attend by content)"""
    embedding_init_range: float | None = None
    """standard deviation of the initial token embeddings (tied: the output head's too); unset: initializer_range.
    Wider rows start each token with an identity of its own (docs/tasks.md: lists' repeated items)"""
    output_init_range: float | None = None
    """standard deviation of the initial output head of an untied model (tie_word_embeddings false); unset:
    initializer_range. A wide head with narrow input embeddings lets the policy tell apart tokens it has already
    written while its inputs stay grouped by meaning (docs/tasks.md: lists); a tied head is the embedding"""

    def validate(self, *, where: str, path: str) -> None:
        if self.shape is not None:
            defaults = TinyModelSpec()
            clashing = [name for name in TINY_SHAPES[self.shape] if getattr(self, name) != getattr(defaults, name)]
            if clashing:
                raise ConfigError(f"{where}: '{path}.shape' {self.shape} sets {', '.join(clashing)}; remove "
                                  f"'{path}.{clashing[0]}' or set '{path}.shape' to null")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{where}: '{path}': num_attention_heads must divide hidden_size and "
                              f"num_key_value_heads must divide num_attention_heads")
        for name in ("initializer_range", "embedding_init_range", "output_init_range"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{where}: '{path}.{name}' must be positive, got {value}")
        if self.output_init_range is not None and self.resolved().tie_word_embeddings:
            raise ConfigError(f"{where}: '{path}.output_init_range' sets an untied output head, but the head is tied "
                              f"to the input embeddings; set '{path}.tie_word_embeddings' to false, or use "
                              f"'{path}.embedding_init_range' (the tied matrix)")
        if self.model_vocab_size is not None and self.model_vocab_size < self.vocab_size:
            raise ConfigError(f"{where}: '{path}.model_vocab_size' {self.model_vocab_size} is smaller than the "
                              f"tokenizer's vocab_size {self.vocab_size}")

    def resolved(self) -> TinyModelSpec:
        """This spec with its `shape` (if any) written out into the size fields."""
        if self.shape is None:
            return self
        return dataclasses.replace(self, shape=None, **TINY_SHAPES[self.shape])


@dataclass
class TinyEncoderSpec:
    """Size of the tiny BERT-style reward encoder; the defaults give about 0.3M parameters."""

    vocab_size: int = 2000
    """target WordPiece vocabulary size, special tokens included (a small corpus may yield fewer tokens)"""
    hidden_size: int = 64
    """width of the residual stream"""
    intermediate_size: int = 256
    """width of the GELU MLP"""
    num_hidden_layers: int = 2
    """number of encoder layers"""
    num_attention_heads: int = 4
    """number of attention heads; must divide hidden_size"""
    max_position_embeddings: int = 512
    """longest sequence in tokens, [CLS] and [SEP] included; also the tokenizer's model_max_length"""


@dataclass
class DataSource:
    """Where a data set comes from. In YAML either a mapping or just the path (`dataset: data/x.jsonl`)."""

    SHORTHAND = "path"
    path: str
    """A local .jsonl/.json/.parquet file (optionally .gz), or a hub data set id such as Anthropic/hh-rlhf."""
    split: str = "train"
    """Split of a hub data set (`test`, `train[:1000]`); ignored for local files."""
    name: str | None = None
    """Configuration name of a hub data set, if it has several."""
    data_dir: str | None = None
    """Sub-folder of a hub data set (HH-RLHF: `harmless-base`)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin."""


@dataclass
class LoraSettings:
    """LoRA adapter shape, used when a stage's `mode` is `lora`."""

    r: int = 16
    """Rank of the update matrices."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt; `all-linear` means every linear layer but the output head."""


@dataclass
class PPOLoraSettings(LoraSettings):
    """The PPO stage's adapter: its shape, and a learning rate of its own."""

    learning_rate: float | None = None
    """Peak learning rate of the adapter weights, while the value model keeps the stage's `learning_rate`; unset:
    the stage's. An adapter usually wants a larger rate than full tuning. (In the SFT, RM and DPO stages the
    stage's own `learning_rate` is the adapter's.)"""


@dataclass
class TrainStage:
    """Settings shared by the stages that run a maintained TRL trainer (SFT, reward model)."""

    dataset: DataSource
    """Training data."""
    eval_dataset: DataSource | None = None
    """Held-out data; when unset, `eval_fraction` of `dataset` is carved off with the pipeline seed."""
    eval_fraction: float = 0.1
    """Share of `dataset` held out for evaluation when there is no `eval_dataset`."""
    max_train_samples: int | None = None
    """Use at most this many training records (after the eval split); unset: all."""
    parent: str | None = None
    """Registry id to start from; unset: the newest complete entry of the parent stage."""
    mode: Literal["full", "lora", "top_n"] = "full"
    """What is trained: every weight, a LoRA adapter, or only the top `top_n_layers` layers."""
    top_n_layers: int = 2
    """With mode top_n: how many of the last transformer layers train (plus final norm and head)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """Adapter shape when mode is lora."""
    epochs: float = 1.0
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimiser steps to run; -1 means use `epochs`."""
    learning_rate: float = 2e-5
    """Peak learning rate of AdamW."""
    lr_scheduler: str = "linear"
    """transformers scheduler name: linear, cosine, constant, constant_with_warmup, ..."""
    warmup_ratio: float = 0.0
    """Share of the steps spent warming the learning rate up from 0, in [0, 1)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 8
    """Sequences per device per forward pass."""
    eval_batch_size: int = 16
    """Sequences per device per evaluation pass."""
    gradient_accumulation_steps: int = 1
    """Forward passes per optimiser step."""
    max_length: int = 512
    """Tokens per sequence; longer sequences are truncated."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Training precision. auto: bf16 on a GPU that supports it, fp32 otherwise (always fp32 on a CPU)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (about 20% slower)."""
    compile: bool = False
    """torch.compile the model (the trainer's `torch_compile`; batches padded to a multiple of 64 tokens, so that
    few shapes compile). On a GPU it fuses the small kernels a step launches: 1.8x on a raw 0.5B step
    (docs/benchmarks.md); the first steps pay for compiling (about two minutes at 0.5B, longer on a CPU)."""
    logging_steps: int = 10
    """Optimiser steps between metric logs."""
    eval_steps: int | None = None
    """Optimiser steps between evaluations; unset: evaluate at the end only."""
    save_steps: int = 50
    """Optimiser steps between resumable trainer checkpoints."""

    def validate(self, *, where: str, path: str) -> None:
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{where}: '{path}.warmup_ratio' must be in [0, 1), got {self.warmup_ratio}")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"{where}: '{path}.eval_fraction' must be between 0 and 1, got {self.eval_fraction}")
        for name in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "max_length",
                     "logging_steps", "save_steps", "top_n_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}: '{path}.{name}' must be at least 1, got {getattr(self, name)}")
        if self.max_steps < 1 and self.epochs <= 0:
            raise ConfigError(f"{where}: set '{path}.epochs' > 0 or '{path}.max_steps' >= 1")


@dataclass
class SFTStage(TrainStage):
    """Supervised fine-tuning on demonstrations (TRL's SFTTrainer)."""

    completion_only_loss: bool = True
    """Compute the loss on the completion (the last assistant turn) only, not on the prompt."""
    packing: bool = False
    """Pack several short examples into each sequence (faster on large data; off by default)."""


@dataclass
class RMStage(TrainStage):
    """Reward modelling on ranked comparisons (TRL's RewardTrainer, Bradley-Terry pairwise loss)."""

    init: str = "sft"
    """Backbone: `sft` (the pipeline's newest SFT entry, or `parent`), `base`, a registry id, a hub id or
    folder, or `tiny-encoder` (a small BERT-style encoder with its own tokenizer)."""
    encoder: TinyEncoderSpec = field(default_factory=TinyEncoderSpec)
    """Size of the encoder built when init is tiny-encoder."""
    use_margin: bool = True
    """When the data has a `margin` column, require chosen to beat rejected by it: -logsigmoid(rc - rr - m)."""
    center_rewards_coefficient: float | None = None
    """Weight of the penalty mean((rc + rr)^2) that keeps scores centred on 0 (Eisenstein et al. 2023)."""
    lm_loss_coef: float = 0.0
    """Weight of a next-token loss on the chosen sequences, computed from the hidden states the score head reads
    through a frozen copy of the starting policy's output embedding; it keeps those states a language model's
    while the pairs are fitted (Yang et al. 2024). 0: off. A start without a next-token head (`tiny-encoder`, an
    encoder, a reward model whose untied head is gone) trains without it, with a warning."""
    skip_invalid_pairs: bool = False
    """Skip, with a count, pairs that rank nothing (identical or empty responses) instead of failing."""
    best_metric: Literal["accuracy", "loss", "last"] = "accuracy"
    """Which checkpoint the entry keeps: the one with the highest held-out accuracy (or lowest held-out loss) of
    the evaluations made at every save (every `save_steps`, and at the end), or the last; without held-out pairs,
    the last."""
    warn_accuracy: float = 0.7
    """Warn after training when held-out accuracy (share of pairs ranked right) is below this."""
    warn_gain: float = 0.05
    """Warn after training when held-out accuracy rose less than this above the starting model's (step 0)."""

    @property
    def lm_regularised(self) -> bool:
        """Whether `lm_loss_coef` is on for a start that may have a next-token head: `tiny-encoder` has none (a
        checkpoint without one is only found out when it is loaded, rlhf/stages/rm_lm.py)."""
        return self.lm_loss_coef > 0 and self.init != "tiny-encoder"

    def validate(self, *, where: str, path: str) -> None:
        super().validate(where=where, path=path)
        if self.best_metric != "last" and self.eval_steps is not None and self.eval_steps != self.save_steps:
            raise ConfigError(f"{where}: '{path}.best_metric' {self.best_metric} keeps the best of the evaluations "
                              f"made at each checkpoint, so '{path}.eval_steps' ({self.eval_steps}) must equal "
                              f"'{path}.save_steps' ({self.save_steps}); unset it, or set best_metric: last")
        if self.lm_loss_coef < 0:
            raise ConfigError(f"{where}: '{path}.lm_loss_coef' must be at least 0, got {self.lm_loss_coef}")
        for name in ("warn_accuracy", "warn_gain"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{where}: '{path}.{name}' must be in [0, 1], got {getattr(self, name)}")


@dataclass
class PPOStage:
    """PPO against the reward model (our own implementation, rlhf/stages/ppo.py). Sizes are per process."""

    dataset: DataSource
    """Prompts to sample responses for: a `prompt` field (text, or a message list for chat models)."""
    eval_prompts: DataSource | None = None
    """Held-out prompts for the final evaluation; unset: `eval_fraction` of `dataset` is held out."""
    eval_fraction: float = 0.1
    """Share of `dataset` held out for the final evaluation when there is no `eval_prompts`."""
    max_eval_prompts: int = 200
    """Evaluate on at most this many held-out prompts."""
    gold: str | None = None
    """A task whose gold reward also scores the final evaluation (`praise`, rlhf/tasks/); unset: none."""
    sft_parent: str | None = None
    """Registry id of the policy to start from; unset: the pipeline's newest complete SFT entry (of those with
    the current sft settings, when there are any)."""
    rm_parent: str | None = None
    """Registry id of the reward model; unset: the pipeline's newest complete RM entry (of those with the
    current rm settings, when there are any)."""
    min_rm_accuracy: float | None = None
    """Refuse, before loading any model, a reward model whose held-out accuracy (eval/accuracy) is below this;
    unset: any."""
    mode: Literal["full", "lora"] = "full"
    """Train every policy weight, or a LoRA adapter (the reference is then the policy with it disabled)."""
    lora: PPOLoraSettings = field(default_factory=PPOLoraSettings)
    """Adapter shape and learning rate when mode is lora."""
    value_init: Literal["auto", "rm", "policy"] = "auto"
    """Value model start: the reward model, or the SFT policy with a fresh head; auto: rm when it shares
    the policy's tokenizer, else policy. (Critic-free algorithms have no value model.)"""
    algorithm: Literal["ppo", "grpo", "rloo", "reinforce_pp"] = "ppo"
    """How advantages are estimated: ppo (GAE with a value model), or critic-free: grpo (sequence rewards
    normalised within each prompt's group), rloo (leave-one-out baseline over the group), reinforce_pp
    (REINFORCE++: KL-penalised returns normalised over the whole batch)."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt, in one generation call: the group of grpo and rloo (at least 2 for them)."""
    shared_prefix: bool | None = None
    """Run each prompt once for the samples_per_prompt responses sampled to it, in the scoring passes (policy and
    reference) and the updates, whose minibatches then hold whole groups: the same log-probs and gradients for
    (samples_per_prompt - 1) / samples_per_prompt of the prompt's compute (docs/stages.md). On SDPA attention with
    no sliding-window layer each group is packed into one row behind its prompt; otherwise the prompt's pass hands
    its keys and values to the responses' as a cache. true needs mini_batch_size and micro_batch_size multiples of
    samples_per_prompt, and neither gradient_checkpointing nor compile. Unset (auto): on where it can be, except
    under weights sharded by ZeRO-3 or FSDP2, unpacked for short prompts (max_prompt_length < 2 x max_new_tokens),
    and packed where the packed row costs more forward FLOPs than the rows (long responses in large groups: its
    attention spans every slot)."""
    kl_penalty: Literal["reward", "loss"] = "reward"
    """Where the KL to the reference acts: a per-token penalty in the reward, or (grpo) a k3 term of weight kl_coef
    in the loss."""
    scale_rewards: bool = True
    """grpo: divide each group's centred rewards by the group's std (false: only subtract the group's mean)."""
    episodes: int = 8192
    """Responses to sample in all (over all processes); the run has episodes / (rollout_batch_size x processes)
    steps."""
    rollout_batch_size: int = 64
    """Responses sampled per PPO step, per process: rollout_batch_size / samples_per_prompt prompts."""
    mini_batch_size: int = 16
    """Episodes per optimiser step, per process; each PPO epoch makes rollout_batch_size / mini_batch_size steps."""
    micro_batch_size: int = 16
    """Episodes per forward/backward pass (gradient accumulation up to mini_batch_size), and per rollout forward."""
    ppo_epochs: int = 4
    """Passes over each rollout batch, each over a fresh permutation."""
    learning_rate: float = 1e-5
    """Peak AdamW learning rate, for policy and value model."""
    lr_scheduler: Literal["linear", "constant"] = "linear"
    """linear: decay to 0 over the run (Huang et al. 2024); constant: keep the peak."""
    warmup_ratio: float = 0.0
    """Share of the PPO steps spent warming the learning rate up from 0, in [0, 1)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm of policy and value parameters to this; 0 turns clipping off."""
    max_prompt_length: int = 128
    """Prompt tokens; longer prompts are cut (keeping the end) or skipped, see `long_prompts`."""
    long_prompts: Literal["truncate", "skip"] = "truncate"
    """What to do with prompts longer than max_prompt_length; either way the count is printed."""
    max_new_tokens: int = 53
    """Response tokens sampled per prompt (responses stop earlier at EOS)."""
    min_new_tokens: int = 0
    """EOS is suppressed until a response has this many tokens (= max_new_tokens: fixed-length responses)."""
    temperature: float = 0.7
    """Sampling temperature, used in rollouts and in every log-probability computed for them."""
    rollout_logprobs: Literal["auto", "sampling", "forward"] = "auto"
    """Where the rollout's log-probabilities (the ratio's denominators) come from: sampling (recorded as each token
    is drawn; no second policy pass) or forward (a full forward pass over the sampled responses, Huang et al. 2024
    detail 7). auto: sampling in fp32 with min_new_tokens 0, where both give the same numbers (within 1e-5);
    forward under bf16 or fp16, whose cached decoding drifts from a full pass. (Sampling never takes a repetition
    penalty or any other setting from the policy's generation_config.json.)"""
    missing_eos_penalty: float | None = 1.0
    """Subtracted from the (normalised) score of a response that never produced EOS; unset: none."""
    normalise_scores: bool = True
    """Standardise scores with the mean and std the reward model stored (reward_stats.json)."""
    score_clip: float | None = None
    """Clip (normalised) scores to [-score_clip, score_clip]; unset: no clipping."""
    kl_coef: float = 0.05
    """Weight of the per-token KL penalty to the reference policy (the start value when target_kl is set)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator in the reward: k1 = log p - log p_ref; k3 = (r - 1) - log r (always >= 0)."""
    target_kl: float | None = None
    """Adaptive KL (Ziegler et al. 2019): steer kl_coef so the sequence KL approaches this; unset: fixed."""
    kl_horizon: int = 10000
    """Episodes over which the adaptive controller's correction acts."""
    gamma: float = 1.0
    """Discount per token."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """PPO ratio clip."""
    cliprange_value: float = 0.2
    """Value clip around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus: the loss loses entropy_coef x the policy's mean per-token entropy (at the
    sampling temperature) over response tokens, which slows the policy's narrowing onto what the reward model
    favours. 0: off (no extra softmax pass)."""
    whiten_advantages: bool = True
    """Standardise advantages over each rollout batch."""
    whiten_rewards: bool = False
    """Standardise the per-token rewards over each rollout batch before GAE."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on a GPU that supports it, fp32 otherwise (always fp32 on a CPU)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    compile: bool = False
    """torch.compile each transformer block of the policy and the value model in place (one compilation serves
    every block), for the scoring and update passes. Generation with the dynamic cache runs them eagerly; with the
    static cache, transformers compiles the decoding step around them (that pair is not yet measured on a GPU)."""
    generation_cache: Literal["dynamic", "static"] = "dynamic"
    """KV cache of generation. static: a fixed-size cache, for which transformers compiles the decoding step
    (4.4x faster a token at the 0.5B shape on an H200, docs/benchmarks.md), prompts left-padded to a multiple of
    128 tokens so that few shapes compile; the first rollouts pay for compiling. One process or DDP (not ZeRO-3
    or FSDP)."""
    logging_steps: int = 1
    """PPO steps between metric logs (wandb, and history.jsonl beside the checkpoint)."""
    sample_steps: int = 10
    """PPO steps between tables of sample completions (wandb); 0: never."""
    save_steps: int = 20
    """PPO steps between resumable checkpoints."""
    eval_batch_size: int = 64
    """Prompts per generation batch in the final evaluation."""
    alarms: AlarmConfig = field(default_factory=AlarmConfig)
    """Thresholds of the reward-hacking alarms printed during the run (docs/alarms.md); null turns one off."""

    def validate(self, *, where: str, path: str) -> None:
        positive = ("episodes", "rollout_batch_size", "mini_batch_size", "micro_batch_size", "ppo_epochs",
                    "max_prompt_length", "max_new_tokens", "logging_steps", "save_steps", "eval_batch_size",
                    "max_eval_prompts", "kl_horizon", "samples_per_prompt")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}: '{path}.{name}' must be at least 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"{where}: '{path}.temperature' must be > 0, got {self.temperature}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(f"{where}: '{path}.min_new_tokens' must be in [0, max_new_tokens "
                              f"{self.max_new_tokens}], got {self.min_new_tokens}")
        if self.rollout_logprobs == "sampling" and self.min_new_tokens:
            raise ConfigError(f"{where}: '{path}.rollout_logprobs' sampling records the distribution with EOS "
                              f"suppressed by min_new_tokens ({self.min_new_tokens}), which the updates do not "
                              f"use; set rollout_logprobs: forward (or auto)")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"{where}: '{path}.eval_fraction' must be between 0 and 1, got {self.eval_fraction}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{where}: '{path}.warmup_ratio' must be in [0, 1), got {self.warmup_ratio}")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ConfigError(f"{where}: '{path}.target_kl' must be > 0 when set, got {self.target_kl}")
        if self.min_rm_accuracy is not None and not 0 <= self.min_rm_accuracy <= 1:
            raise ConfigError(f"{where}: '{path}.min_rm_accuracy' must be in [0, 1] when set, "
                              f"got {self.min_rm_accuracy}")
        if self.entropy_coef < 0:
            raise ConfigError(f"{where}: '{path}.entropy_coef' must be at least 0, got {self.entropy_coef}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{where}: '{path}.{name}' must be in [0, 1], got {getattr(self, name)}")
        if self.lora.learning_rate is not None and self.lora.learning_rate <= 0:
            raise ConfigError(f"{where}: '{path}.lora.learning_rate' must be > 0 when set, "
                              f"got {self.lora.learning_rate}")


@dataclass
class DPOStage(TrainStage):
    """DPO on ranked comparisons (TRL's DPOTrainer), an alternative to PPO: it starts from the SFT policy, which is
    also its reference, and samples nothing while training. The reward model only scores the final evaluation,
    which is PPO's (held-out prompts: RM score, KL to the SFT policy, gold score). `parent` is not used."""

    dataset: DataSource | None = None
    """Ranked pairs, in the reward model's formats; unset: the rm section's dataset (and its eval_dataset)."""
    learning_rate: float = 1e-6
    """Peak learning rate of AdamW (TRL's DPO default)."""
    sft_parent: str | None = None
    """Registry id of the SFT policy to start from and stay near; unset: the pipeline's newest complete SFT entry."""
    rm_parent: str | None = None
    """Registry id of the reward model that scores the final evaluation; unset: the newest complete RM entry."""
    beta: float = 0.1
    """Pull towards the reference: the implicit reward is beta x log(policy / reference) of a response."""
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """sigmoid: DPO's -logsigmoid(beta x margin) (Rafailov et al. 2023); ipo: squared (Azar et al. 2023); hinge."""
    skip_invalid_pairs: bool = False
    """Skip, with a count, pairs that rank nothing (identical or empty responses) instead of failing."""
    eval_prompts: DataSource | None = None
    """Prompts of the final evaluation; unset: the ppo section's held-out prompts, else the held-out pairs' prompts."""
    max_eval_prompts: int = 200
    """Evaluate on at most this many held-out prompts."""
    max_new_tokens: int | None = None
    """Response tokens sampled per held-out prompt; unset: the ppo section's (PPO's default without one)."""
    temperature: float | None = None
    """Sampling temperature of the final evaluation; unset: the ppo section's (PPO's default without one)."""
    gold: str | None = None
    """A task whose gold reward also scores the final evaluation (`praise`); unset: the ppo section's."""

    def validate(self, *, where: str, path: str) -> None:
        super().validate(where=where, path=path)
        if self.parent is not None:
            raise ConfigError(f"{where}: '{path}.parent' is not used by DPO; name the SFT policy with "
                              f"'{path}.sft_parent'")
        if self.beta <= 0:
            raise ConfigError(f"{where}: '{path}.beta' must be > 0, got {self.beta}")
        for name in ("max_eval_prompts", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{where}: '{path}.{name}' must be at least 1, got {value}")
        if self.temperature is not None and self.temperature <= 0:
            raise ConfigError(f"{where}: '{path}.temperature' must be > 0, got {self.temperature}")


@dataclass
class RoundsSettings:
    """Iterated rounds after the first: collect comparisons on the current policy, retrain the reward model,
    run PPO again (`make collect`, `make rm ROUND=2`, `make ppo ROUND=2`, `make rounds N=3`)."""

    prompts: DataSource | None = None
    """Prompts to sample responses for; unset: the ppo section's `dataset`."""
    num_prompts: int = 256
    """Prompts drawn (seeded, per round) from `prompts` in each round."""
    responses_per_prompt: int = 4
    """Responses sampled per prompt; pairs are formed among them."""
    max_pairs_per_prompt: int = 3
    """At most this many pairs per prompt (of the K*(K-1)/2 possible), drawn at random."""
    temperature: float = 1.0
    """Sampling temperature of the collected responses."""
    max_new_tokens: int | None = None
    """Response length cap; unset: the ppo section's `max_new_tokens`."""
    labeller: Literal["gold", "file"] = "gold"
    """Who ranks the pairs: `gold` (the task's gold reward, a simulated annotator) or `file` (your labels:
    `make collect` writes the pairs to label; `make collect LABELS=file` reads your labels back)."""
    gold: str | None = None
    """Task whose gold reward labels the pairs; unset: the ppo section's `gold`."""
    labels: str | None = None
    """The labels file for `labeller: file` (also `--labels` / `LABELS=`)."""
    eval_fraction: float = 0.2
    """Share of each round's prompts whose pairs are held out to evaluate the reward models on fresh pairs."""
    mix_previous: bool = True
    """Train a round's reward model on the earlier rounds' comparisons too, not only the new ones."""
    rm_init: Literal["previous", "rm_init"] = "previous"
    """Reward model of round R starts from: `previous` (round R-1's) or `rm_init` (as the rm section's `init`)."""
    policy_init: Literal["previous", "sft"] = "previous"
    """PPO of round R starts from: `previous` (round R-1's PPO policy) or `sft`."""
    kl_anchor: Literal["sft", "previous"] = "sft"
    """The KL reference of round R: `sft` (the original SFT policy) or `previous` (the starting policy)."""
    batch_size: int = 64
    """Prompts per generation call while collecting."""

    def validate(self, *, where: str, path: str) -> None:
        for name in ("num_prompts", "max_pairs_per_prompt", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}: '{path}.{name}' must be at least 1, got {getattr(self, name)}")
        if self.responses_per_prompt < 2:
            raise ConfigError(f"{where}: '{path}.responses_per_prompt' must be at least 2 to form pairs, "
                              f"got {self.responses_per_prompt}")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"{where}: '{path}.eval_fraction' must be between 0 and 1, got {self.eval_fraction}")
        if self.temperature <= 0:
            raise ConfigError(f"{where}: '{path}.temperature' must be > 0, got {self.temperature}")


@dataclass
class Pipeline:
    """A whole pipeline file."""

    name: str
    """Pipeline name: groups registry entries and checkpoint folders (letters, digits, . _ -)."""
    model: str
    """Base model: `tiny`, a hub id (Qwen/Qwen2.5-0.5B) or a local Hugging Face folder."""
    seed: int = 42
    """Seed for model init, data splits, shuffling and sampling."""
    tiny: TinyModelSpec = field(default_factory=TinyModelSpec)
    """Size of the model built when `model` is `tiny`."""
    trust_remote_code: bool = False
    """Allow model and data repositories to run their own Python code. Leave off unless you trust them."""
    allow_pickle: bool = False
    """Load model weights stored as pickle files (.bin, .pt), which can run code when loaded; off: safetensors only."""
    wandb_project: str = "rlhf"
    """Weights & Biases project the stages log to."""
    accelerate_config: str | None = None
    """accelerate config file (accelerate/ddp.yaml, ...): stages then run under `accelerate launch` with it."""
    processes: int | None = None
    """Processes per machine under accelerate_config; unset: one per visible GPU (NPROC=N / --nproc N wins)."""
    sft: SFTStage | None = None
    """Supervised fine-tuning stage."""
    rm: RMStage | None = None
    """Reward-model stage."""
    ppo: PPOStage | None = None
    """PPO stage."""
    dpo: DPOStage | None = None
    """DPO stage, an alternative to PPO on the comparison data (rlhf dpo)."""
    rounds: RoundsSettings = field(default_factory=RoundsSettings)
    """Iterated rounds after the first (collect, rm, ppo again)."""

    def validate(self, *, where: str, path: str) -> None:
        if not SAFE_NAME.match(self.name):
            raise ConfigError(f"{where}: 'name' must be letters, digits, '.', '_' or '-' (at most 100), "
                              f"starting with a letter or digit; got {self.name!r}")
        if self.accelerate_config and not Path(self.accelerate_config).is_file():
            raise ConfigError(f"{where}: accelerate_config file {self.accelerate_config} not found")
        if self.processes is not None and (self.processes < 1 or not self.accelerate_config):
            raise ConfigError(f"{where}: 'processes' must be at least 1 and needs 'accelerate_config' (the processes "
                              f"run under accelerate launch), got {self.processes}")


def load_pipeline(file: str | Path, overrides: list[str] = ()) -> tuple[Pipeline, Path]:
    """Read a pipeline file, apply `key=value` overrides, and check every key and type."""
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"pipeline file {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping with 'name', 'model' and stage sections")
    for key, value in data.items():
        if key not in _field_names() and isinstance(value, dict) and "dataset" in value:
            raise ConfigError(f"{path}: unknown stage '{key}' (stages: {', '.join(SECTIONS)})")
    for text in overrides:
        parts, value = schema.parse_override(text)
        if parts[0] not in _field_names():
            raise ConfigError(f"override '{text}': unknown key '{parts[0]}' "
                              f"(known: {', '.join(sorted(_field_names()))})")
        schema.apply_override(data, parts, value)
    where = f"{path}" + (" (with overrides)" if overrides else "")
    return schema.build(Pipeline, data, where=where), path


def _field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(Pipeline)}
