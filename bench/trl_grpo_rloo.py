"""Reference critic-free runs: TRL 1.16's `GRPOTrainer` or `RLOOTrainer` on our SFT and RM checkpoints.

Runs under our own venv (TRL 1.16 is a dependency of the package), in its own process, and imports no `rlhf`:
only torch, transformers, trl, datasets, the standard library and the helpers of bench/trl_ppo.py.

    .venv/bin/python bench/trl_grpo_rloo.py --algo grpo --sft SFT_DIR --rm RM_DIR --prompts prompts.jsonl \
        --out OUT_DIR --settings '{"episodes": 1024, "samples_per_prompt": 4, "kl_penalty": "loss", ...}'

Settings use our names (rlhf.pipeline.config.PPOStage) and are mapped onto GRPOConfig / RLOOConfig by
`map_settings`; the policy and the reference come from SFT_DIR, the reward from RM_DIR. The training loop alone is
timed, from the Trainer's on_train_begin to its on_train_end (its data loader, optimiser and `accelerator.prepare`
come before, as our PPO's set-up does). Writes OUT_DIR/policy, OUT_DIR/history.jsonl (TRL's per-step logs) and
OUT_DIR/result.json.

Batches in TRL 1.16 (GRPOTrainer and RLOOTrainer share them; GRPOConfig.__post_init__, `_prepare_inputs`):
    generation batch  = per_device_train_batch_size x steps_per_generation completions, of
                        generation_batch_size / num_generations prompts, sampled in one `generate` call
    micro batch       = per_device_train_batch_size completions per forward/backward
    optimiser step    = gradient_accumulation_steps micro batches
    num_iterations    = passes over each generation batch (one shuffle per generation, same slices each pass)
    max_steps         = optimiser steps in the run
so rollout R, mini M, micro m and ppo_epochs K of ours become per_device_train_batch_size m, steps_per_generation
R/m, gradient_accumulation_steps M/m, num_iterations K, and E episodes are max_steps = E/R x K x R/M optimiser
steps: E/R generations of R responses, as ours. Episodes are counted where the reward is computed.

The reward (`--reward ids`, the default) is our reward model scoring exactly what ours scores: the prompt's ids
and the completion's ids up to and including EOS, standardised with the RM's reward_stats.json, clipped, less
missing_eos_penalty when there is no EOS (rlhf/training/ppo/scorer.py). `--reward text` hands TRL the model itself
instead, as its docs suggest (statistics folded into the score head): TRL then scores prompt + decoded completion
text re-tokenised without special tokens, so the reward model never sees the EOS it was trained to score at, and
there is no missing-EOS penalty.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is loaded from local folders
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_ppo import (  # noqa: E402
    ADAM_EPSILON,
    REWARD_STATS,
    BenchError,
    _divide,
    fold_normalisation,
    peak_memory_mb,
    read_prompt_rows,
    run_and_report,
)

ALGORITHMS = ("grpo", "rloo")
# Our PPOStage keys this script maps (see map_settings).
MAPPED = {
    "algorithm", "samples_per_prompt", "kl_penalty", "scale_rewards", "episodes",
    "rollout_batch_size", "mini_batch_size", "micro_batch_size", "ppo_epochs", "learning_rate", "lr_scheduler",
    "warmup_ratio", "weight_decay", "max_grad_norm", "max_prompt_length", "long_prompts", "max_new_tokens",
    "min_new_tokens", "temperature", "missing_eos_penalty", "normalise_scores", "score_clip", "kl_coef",
    "kl_estimator", "cliprange", "precision", "gradient_checkpointing", "seed",
}
# Our keys that TRL's critic-free trainers have no counterpart for: accepted only at the value TRL always matches.
FIXED_IN_TRL = {
    "target_kl": None,  # no adaptive KL controller
    "mode": "full",  # LoRA is not wired up here
    "whiten_rewards": False,  # per-token reward whitening is a GAE detail
    "entropy_coef": 0.0,  # no entropy bonus in TRL's GRPOTrainer or RLOOTrainer
}
# Our keys that do not concern these runs: PPO's critic and GAE (no value model here; whiten_advantages whitens
# GAE's advantages, while ours and TRL's group advantages are used as they are), data selection, evaluation, logging
# and checkpoints.
IGNORED = {
    "value_init", "vf_coef", "cliprange_value", "gamma", "lam", "whiten_advantages", "kl_horizon", "dataset",
    "eval_prompts", "eval_fraction", "max_eval_prompts", "sft_parent", "rm_parent", "lora", "logging_steps",
    "sample_steps", "save_steps", "eval_batch_size",
    "compile", "generation_cache", "shared_prefix", "rollout_logprobs", "alarms", "min_rm_accuracy",  # speed switches,
    # warnings, refusals
}
DEFAULTS = {  # our PPOStage defaults, for keys the caller leaves out
    "samples_per_prompt": 4, "kl_penalty": "reward", "scale_rewards": True, "episodes": 8192,
    "rollout_batch_size": 64, "mini_batch_size": 16, "micro_batch_size": 16, "ppo_epochs": 4,
    "learning_rate": 1e-5, "lr_scheduler": "linear", "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 1.0,
    "max_prompt_length": 128, "long_prompts": "truncate", "max_new_tokens": 53, "min_new_tokens": 0,
    "temperature": 0.7, "missing_eos_penalty": 1.0, "normalise_scores": True, "score_clip": None, "kl_coef": 0.05,
    "kl_estimator": "k1", "cliprange": 0.2, "precision": "auto", "gradient_checkpointing": False, "seed": 42,
}


def resolve_settings(raw: dict, *, algo: str) -> tuple[dict, list[str]]:
    """Our settings with defaults filled in and checked against what TRL's `algo` trainer can do; notes on keys
    that have no effect."""
    if algo not in ALGORITHMS:
        raise BenchError(f"--algo must be one of {', '.join(ALGORITHMS)}, got {algo!r}")
    unknown = set(raw) - MAPPED - set(FIXED_IN_TRL) - IGNORED
    if unknown:
        raise BenchError(f"unknown settings keys: {', '.join(sorted(unknown))}")
    for key, value in FIXED_IN_TRL.items():
        if key in raw and raw[key] != value:
            raise BenchError(f"settings '{key}': {raw[key]!r} has no TRL 1.16 {algo} counterpart (only {value!r})")
    s = {**DEFAULTS, "algorithm": algo, **{k: v for k, v in raw.items() if k in MAPPED}}
    if s["algorithm"] != algo:
        raise BenchError(f"settings 'algorithm' is {s['algorithm']!r} but --algo is {algo!r}")
    if s["samples_per_prompt"] < 2:
        raise BenchError(f"settings 'samples_per_prompt' must be at least 2 for {algo} (a group), "
                         f"got {s['samples_per_prompt']}")
    notes = [f"'{key}' ignored (not part of a critic-free TRL run)" for key in sorted(IGNORED & set(raw))]
    if algo == "grpo":
        if s["kl_penalty"] != "loss":
            raise BenchError("settings 'kl_penalty' must be loss for grpo: GRPOTrainer puts the KL (k3, weight "
                             "beta) in the loss only, never in the reward")
        notes.append("kl_estimator unused: GRPO's KL loss term is always k3")
    else:
        if s["kl_penalty"] != "reward":
            raise BenchError("settings 'kl_penalty' must be reward for rloo: RLOOTrainer subtracts beta x the "
                             "summed KL from each sequence's reward")
        if s["kl_estimator"] != "k1":
            raise BenchError("settings 'kl_estimator' must be k1 for rloo: RLOOTrainer's KL is log p - log p_ref")
        if "scale_rewards" in raw:
            notes.append("scale_rewards unused: a grpo setting")
    return s, notes


def map_settings(s: dict, *, algo: str, out_dir: Path, cuda: bool, bf16_ok: bool) -> dict:
    """GRPOConfig or RLOOConfig keyword arguments for our resolved settings `s` (one process)."""
    rollout, mini, micro = s["rollout_batch_size"], s["mini_batch_size"], s["micro_batch_size"]
    group = s["samples_per_prompt"]
    _divide(rollout, group, "rollout_batch_size / samples_per_prompt")
    minibatches = _divide(rollout, mini, "rollout_batch_size / mini_batch_size")
    accumulation = _divide(mini, micro, "mini_batch_size / micro_batch_size")
    generations = _divide(s["episodes"], rollout, "episodes / rollout_batch_size")
    if s["lr_scheduler"] not in ("linear", "constant"):
        raise BenchError(f"settings 'lr_scheduler' must be linear or constant, got {s['lr_scheduler']!r}")
    precision = s["precision"]
    if precision == "auto":
        precision = "bf16" if cuda and bf16_ok else "fp32"
    if precision != "fp32" and not cuda:
        raise BenchError(f"settings 'precision' {precision} needs a GPU; use fp32 or auto on the CPU")
    config = {
        "output_dir": str(out_dir),
        "num_generations": group,
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": accumulation,
        "steps_per_generation": rollout // micro,
        "num_iterations": s["ppo_epochs"],
        "max_steps": generations * s["ppo_epochs"] * minibatches,
        "learning_rate": s["learning_rate"],
        "lr_scheduler_type": s["lr_scheduler"],
        "warmup_steps": s["warmup_ratio"],  # a float in [0, 1) is a ratio of the optimiser steps (transformers 5)
        "weight_decay": s["weight_decay"],
        "adam_epsilon": ADAM_EPSILON,
        "optim": "adamw_torch",  # torch.optim.AdamW, as ours (TrainingArguments would pick the fused variant)
        "max_grad_norm": s["max_grad_norm"],  # 0 turns clipping off in both
        "max_completion_length": s["max_new_tokens"],
        "temperature": s["temperature"],
        "top_p": 1.0,
        "top_k": 0,  # pure ancestral sampling, as ours
        "generation_kwargs": {"min_new_tokens": s["min_new_tokens"]} if s["min_new_tokens"] else None,
        "epsilon": s["cliprange"],
        "beta": s["kl_coef"],
        "mask_truncated_completions": False,
        "disable_dropout": True,
        "shuffle_dataset": True,
        "seed": s["seed"],
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        # TRL's default is on, ours off; transformers 5.24 calls gradient_checkpointing a deprecated alias of this
        "activation_checkpointing": s["gradient_checkpointing"],
        "logging_steps": 1,
        "log_completions": False,
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
        "push_to_hub": False,
    }
    if algo == "grpo":
        config.update(
            loss_type="bnpo",  # ours: token mean over each micro batch, / accumulation steps (TRL's default: dapo)
            scale_rewards="group" if s["scale_rewards"] else "none",
            importance_sampling_level="token",
            use_bias_correction_kl=False,  # plain k3 per token (DeepSeekMath eq. 4), not weighted by the ratio
        )
    else:
        config.update(normalize_advantages=False)  # ours uses the leave-one-out advantages as they are
    return config


class RewardFunction:
    """Our reward model as TRL's reward function, scoring what ours scores (`--reward ids`): prompt ids (tokenised
    as TRL tokenised them for generation) + completion ids up to and including EOS, right-padded; then
    standardised, clipped and lowered for a missing EOS (rlhf/training/ppo/scorer.py). Counts the episodes."""

    __name__ = "reward_model"  # TRL logs rewards/<name>/mean

    def __init__(self, model, tokenizer, *, stats: dict | None, score_clip: float | None,
                 missing_eos_penalty: float | None, batch_size: int):
        self.model, self.tokenizer, self.stats = model, tokenizer, stats
        self.score_clip, self.missing_eos_penalty, self.batch_size = score_clip, missing_eos_penalty, batch_size
        self.episodes = 0
        self._prompt_ids: dict[str, list[int]] = {}

    def scores(self, sequences: list[list[int]], *, has_eos: list[bool]) -> list[float]:
        import torch

        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        raw = []
        with torch.no_grad():
            for start in range(0, len(sequences), self.batch_size):
                batch = sequences[start:start + self.batch_size]
                ids = torch.full((len(batch), max(map(len, batch))), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, seq in enumerate(batch):
                    ids[row, :len(seq)] = torch.tensor(seq)
                    mask[row, :len(seq)] = 1
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                raw.append(logits[:, 0].float().cpu())
        scores = torch.cat(raw)
        if self.stats is not None:
            scores = (scores - self.stats["mean"]) / (self.stats["std"] or 1.0)
        if self.score_clip is not None:
            scores = scores.clamp(-self.score_clip, self.score_clip)
        if self.missing_eos_penalty is not None:
            scores = torch.where(torch.tensor(has_eos), scores, scores - self.missing_eos_penalty)
        return scores.tolist()

    def __call__(self, prompts: list[str], completion_ids: list[list[int]], **_trl_kwargs) -> list[float]:
        eos = self.tokenizer.eos_token_id
        sequences = []
        for prompt, completion in zip(prompts, completion_ids, strict=True):
            if prompt not in self._prompt_ids:
                self._prompt_ids[prompt] = self.tokenizer(text=prompt)["input_ids"]
            sequences.append(self._prompt_ids[prompt] + list(completion))
        self.episodes += len(sequences)
        return self.scores(sequences, has_eos=[bool(c) and c[-1] == eos for c in completion_ids])


class CountingRewardModel:
    """`--reward text`: TRL's own reward-model path; only counts the episodes (a second reward function of weight
    0 sees every completion)."""

    __name__ = "episode_counter"

    def __init__(self):
        self.episodes = 0

    def __call__(self, completions: list, **_trl_kwargs) -> list[float]:
        self.episodes += len(completions)
        return [0.0] * len(completions)


def read_prompts(path: Path, tokenizer, *, max_length: int, long_prompts: str) -> tuple[list[str], dict]:
    """Prompt texts as our PPO sees them: a message list through the chat template; over max_length tokens, the
    end kept (decoded back to text, as rlhf/core/prompts.py does) or the prompt skipped. TRL 1.16 has no prompt
    length limit of its own."""
    rows, stats = read_prompt_rows(path, tokenizer, max_length=max_length, long_prompts=long_prompts)
    return [text for text, _ in rows], stats


def run(args: argparse.Namespace) -> dict:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    try:
        raw = json.loads(args.settings)
    except ValueError as exc:
        raise BenchError(f"--settings is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise BenchError("--settings must be a JSON object")
    settings, notes = resolve_settings(raw, algo=args.algo)
    sft_dir, rm_dir, out_dir = Path(args.sft), Path(args.rm), Path(args.out)
    for name, folder in (("--sft", sft_dir), ("--rm", rm_dir)):
        if not (folder / "config.json").is_file():
            raise BenchError(f"{name} {folder} is not a model folder (no config.json)")
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    config_kwargs = map_settings(settings, algo=args.algo, out_dir=out_dir, cuda=cuda,
                                 bf16_ok=cuda and torch.cuda.is_bf16_supported())
    transformers.set_seed(settings["seed"])

    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise BenchError("the SFT tokenizer needs a pad token distinct from EOS (the reward model reads the last "
                         "non-pad token)")
    rm_tokenizer = AutoTokenizer.from_pretrained(rm_dir) if (rm_dir / "tokenizer_config.json").is_file() else None
    if rm_tokenizer is not None and rm_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise BenchError(f"the reward model in {rm_dir} has its own tokenizer; the benchmark expects one that "
                         "shares the policy's ids, as the bundled pipelines' reward models do")
    texts, prompt_info = read_prompts(Path(args.prompts), tokenizer, max_length=settings["max_prompt_length"],
                                      long_prompts=settings["long_prompts"])
    group_prompts = settings["rollout_batch_size"] // settings["samples_per_prompt"]
    if len(texts) < group_prompts:
        raise BenchError(f"{len(texts)} prompts are fewer than one rollout batch's {group_prompts}")
    dataset = Dataset.from_dict({"prompt": texts})

    policy = AutoModelForCausalLM.from_pretrained(sft_dir)
    reward_model = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1).eval()
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    reward_model.to("cuda" if cuda else "cpu")
    stats_file = rm_dir / REWARD_STATS
    stats = json.loads(stats_file.read_text(encoding="utf-8")) if stats_file.is_file() else None
    if settings["normalise_scores"] and stats is None:
        notes.append(f"no {REWARD_STATS} in {rm_dir}: scores are not normalised")
    if args.reward == "ids":
        counter = RewardFunction(reward_model, tokenizer, stats=stats if settings["normalise_scores"] else None,
                                 score_clip=settings["score_clip"],
                                 missing_eos_penalty=settings["missing_eos_penalty"],
                                 batch_size=settings["micro_batch_size"])
        reward_funcs, reward_classes, weights = [counter], None, None
    else:
        if settings["normalise_scores"]:
            fold_normalisation(reward_model, rm_dir)
        notes.append("--reward text: TRL scores prompt + completion text without EOS; no missing-EOS penalty, "
                     "no score clipping")
        counter = CountingRewardModel()
        reward_funcs, reward_classes, weights = [reward_model, counter], [tokenizer, None], [1.0, 0.0]
    config_kwargs["reward_weights"] = weights

    history_file = out_dir / "history.jsonl"
    history_file.write_text("", encoding="utf-8")

    loop: dict[str, float] = {}

    class History(TrainerCallback):
        def on_log(self, _args, state, _control, logs=None, **_kwargs):
            with history_file.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": state.global_step, **(logs or {})}) + "\n")

        def on_train_begin(self, *_args, **_kwargs):
            loop["begin"] = time.perf_counter()

        def on_train_end(self, *_args, **_kwargs):
            if cuda:
                torch.cuda.synchronize()
            loop["end"] = time.perf_counter()

    if args.algo == "grpo":
        config_class, trainer_class = trl.GRPOConfig, trl.GRPOTrainer
    else:
        config_class, trainer_class = trl.RLOOConfig, trl.RLOOTrainer
    config = config_class(**config_kwargs)
    trainer = trainer_class(model=policy, reward_funcs=reward_funcs, args=config, train_dataset=dataset,
                            processing_class=tokenizer, reward_processing_classes=reward_classes,
                            callbacks=[History()])

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    width = config.generation_batch_size
    print(f"[trl-{args.algo}] training: {config.max_steps} optimiser steps; {settings['episodes'] // width} "
          f"generations of {width} completions ({width // config.num_generations} prompts x "
          f"{config.num_generations}), {config.num_iterations} iterations each, micro batch "
          f"{config.per_device_train_batch_size} x {config.gradient_accumulation_steps} accumulated, on "
          f"{trainer.accelerator.device}", flush=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    trainer.train()
    call_seconds = time.perf_counter() - started
    seconds = loop["end"] - loop["begin"]  # the training loop, as ours is timed
    load_after = os.getloadavg()
    memory, memory_kind = peak_memory_mb(cuda)

    policy_dir = out_dir / "policy"
    trainer.accelerator.unwrap_model(trainer.model).save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    result = {
        "algo": args.algo,
        "episodes": counter.episodes,
        "seconds": round(seconds, 3),
        "train_call_seconds": round(call_seconds, 3),  # trainer.train() whole, with the Trainer's set-up
        "episodes_per_s": round(counter.episodes / seconds, 3) if seconds > 0 else None,
        "peak_memory_mb": round(memory, 1),
        "memory_kind": memory_kind,
        "device": str(trainer.accelerator.device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(load_before[0], 2), round(load_after[0], 2)],  # other work skews CPU timings
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "reward": args.reward,
        "optimizer_steps": trainer.state.global_step,
        "settings": {k: v for k, v in config_kwargs.items() if k != "output_dir"},
        "generation_batch_size": config.generation_batch_size,
        "our_settings": settings,
        "data": prompt_info,
        "notes": notes,
        "sft": str(sft_dir),
        "rm": str(rm_dir),
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algo", choices=ALGORITHMS, required=True, help="GRPOTrainer or RLOOTrainer")
    parser.add_argument("--sft", required=True, help="SFT checkpoint folder: policy, reference and tokenizer")
    parser.add_argument("--rm", required=True, help="reward-model folder (and its reward_stats.json)")
    parser.add_argument("--prompts", required=True, help='JSONL file, one {"prompt": "..."} per line')
    parser.add_argument("--out", required=True, help="output folder (policy/, history.jsonl, result.json)")
    parser.add_argument("--settings", default="{}", help="JSON object of our settings (PPOStage names)")
    parser.add_argument("--reward", choices=("ids", "text"), default="ids",
                        help="ids: our reward model scores the same ids as ours (default); text: TRL's own "
                             "reward-model path (re-tokenised text, no EOS; see the module docstring)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (torch.set_num_threads); 0 keeps torch's default")
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    return run_and_report(args, run=run, name=args.algo)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
