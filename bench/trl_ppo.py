"""Reference PPO run: TRL 1.12's `trl.experimental.ppo.PPOTrainer` on our SFT and RM checkpoints.

Runs under the TRL 1.12 venv (bench/trl_env.py), never under ours, and must not import `rlhf`: only torch,
transformers, trl, datasets and the standard library.

    python bench/trl_ppo.py --sft SFT_DIR --rm RM_DIR --prompts prompts.jsonl --out OUT_DIR \
        --settings '{"episodes": 512, "rollout_batch_size": 64, "mini_batch_size": 16, ...}'

Settings use our names (rlhf.pipeline.config.PPOStage) and are mapped onto PPOConfig (see `map_settings`). The policy
and
the reference come from SFT_DIR, the reward model and the value model from RM_DIR; `trainer.train()` alone is
timed. Writes OUT_DIR/policy (the trained policy and tokenizer), OUT_DIR/history.jsonl (TRL's per-step metrics)
and OUT_DIR/result.json.

Batch sizes in TRL 1.12 (PPOTrainer.__init__, one process per device, world_size processes):
    batch_size (episodes per PPO step)  = per_device_train_batch_size * gradient_accumulation_steps * world_size
    mini_batch_size                     = batch_size / num_mini_batches   (num_mini_batches divides, never multiplies)
    local_mini_batch_size               = per_device_train_batch_size * gradient_accumulation_steps / num_mini_batches
    forward/backward micro batch        = per_device_train_batch_size, looped over each local mini batch
    PPO steps                           = ceil(total_episodes / batch_size)  (so it may run more than total_episodes)
    rollout generation / no-grad passes = chunks of local_rollout_forward_batch_size
The catch: the optimiser steps through `accelerator.accumulate`, and PPOTrainer builds its Accelerator with
gradient_accumulation_steps, so gradients are applied every gradient_accumulation_steps micro batches, i.e. once
per *whole rollout batch* per PPO epoch, whatever num_mini_batches says (plus one step per micro batch on the last
batch of each pass over the prompts, where accelerate's end-of-dataloader sync kicks in). Hence two mappings:
    --batch-mapping optimizer (default): per_device_train_batch_size = rollout_batch_size,
        gradient_accumulation_steps = 1, num_mini_batches = rollout / mini. One optimiser step per mini batch,
        as in our PPO; each mini batch is a single forward/backward (micro_batch_size is not used for training).
    --batch-mapping accumulate: per_device_train_batch_size = micro_batch_size,
        gradient_accumulation_steps = rollout / micro, num_mini_batches = rollout / mini. Same forward/backward
        shapes as ours, but TRL then makes only ppo_epochs optimiser steps per rollout.
result.json counts the optimiser steps actually taken.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is loaded from local folders
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

REWARD_STATS = "reward_stats.json"

# Our PPOStage keys this script maps (see map_settings).
MAPPED = {
    "episodes", "rollout_batch_size", "mini_batch_size", "micro_batch_size", "ppo_epochs", "learning_rate",
    "max_new_tokens", "temperature", "kl_coef", "kl_estimator", "cliprange", "cliprange_value", "vf_coef", "gamma",
    "lam", "whiten_rewards", "missing_eos_penalty", "seed", "lr_scheduler", "warmup_ratio", "weight_decay",
    "precision", "gradient_checkpointing", "max_prompt_length", "long_prompts", "normalise_scores", "value_init",
}
# Our keys TRL 1.12 has no counterpart for: accepted only at the value that matches what TRL always does.
FIXED_IN_TRL = {
    "whiten_advantages": True,  # TRL always whitens advantages over the rollout batch
    "target_kl": None,  # no adaptive KL controller in PPOTrainer 1.12
    "score_clip": None,  # no score clipping
    "mode": "full",  # LoRA is not wired up here
    "entropy_coef": 0.0,  # PPOTrainer 1.12 logs the entropy but has no entropy bonus
}
# Our keys that do not concern the TRL run (data selection, evaluation, logging, checkpoints): recorded, unused.
IGNORED = {
    "dataset", "eval_prompts", "eval_fraction", "max_eval_prompts", "sft_parent", "rm_parent", "lora", "kl_horizon",
    "logging_steps", "sample_steps", "save_steps", "eval_batch_size", "max_grad_norm",
    "compile", "generation_cache", "shared_prefix", "rollout_logprobs", "alarms", "min_rm_accuracy",  # speed switches,
    # warnings, refusals
}
# max_grad_norm is ignored because PPOTrainer 1.12 never clips gradients (no clip_grad_norm_ in its loop).

DEFAULTS = {  # our PPOStage defaults, for keys the caller leaves out
    "episodes": 8192, "rollout_batch_size": 64, "mini_batch_size": 16, "micro_batch_size": 16, "ppo_epochs": 4,
    "learning_rate": 1e-5, "lr_scheduler": "linear", "warmup_ratio": 0.0, "weight_decay": 0.0,
    "max_prompt_length": 128, "long_prompts": "truncate", "max_new_tokens": 53, "temperature": 0.7,
    "missing_eos_penalty": 1.0, "normalise_scores": True, "kl_coef": 0.05, "kl_estimator": "k1", "gamma": 1.0,
    "lam": 0.95, "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1, "whiten_rewards": False,
    "precision": "auto", "gradient_checkpointing": False, "value_init": "rm", "seed": 42,
}
ADAM_EPSILON = 1e-5  # our PPO's AdamW eps (Huang et al. 2024); TrainingArguments' default would be 1e-8


class BenchError(Exception):
    """A clear, expected failure (bad settings, missing files)."""


def _divide(a: int, b: int, what: str) -> int:
    if b <= 0 or a % b:
        raise BenchError(f"{what}: {a} is not a multiple of {b}")
    return a // b


def resolve_settings(raw: dict) -> tuple[dict, list[str]]:
    """Our settings with defaults filled in, and notes on keys that are ignored."""
    unknown = set(raw) - MAPPED - set(FIXED_IN_TRL) - IGNORED
    if unknown:
        raise BenchError(f"unknown settings keys: {', '.join(sorted(unknown))}")
    for key, value in FIXED_IN_TRL.items():
        if key in raw and raw[key] != value:
            raise BenchError(f"settings '{key}': {raw[key]!r} has no TRL 1.12 PPO counterpart (only {value!r})")
    notes = [f"'{key}' ignored (not part of the TRL run)" for key in sorted(IGNORED & set(raw))]
    if "max_grad_norm" in raw:
        notes.append("PPOTrainer 1.12 never clips gradients, so max_grad_norm has no effect")
    settings = {**DEFAULTS, **{k: v for k, v in raw.items() if k in MAPPED}}
    if settings["value_init"] not in ("rm", "policy", "auto"):
        raise BenchError(f"settings 'value_init' must be rm, policy or auto, got {settings['value_init']!r}")
    if settings["value_init"] == "auto":
        settings["value_init"] = "rm"  # the reward model shares the policy's tokenizer in our pipelines
    return settings, notes


def map_settings(s: dict, *, batch_mapping: str, out_dir: Path, cuda: bool, bf16_ok: bool) -> dict:
    """PPOConfig keyword arguments for our settings `s` (one process)."""
    rollout, mini, micro = s["rollout_batch_size"], s["mini_batch_size"], s["micro_batch_size"]
    num_mini_batches = _divide(rollout, mini, "rollout_batch_size / mini_batch_size")
    _divide(mini, micro, "mini_batch_size / micro_batch_size")
    if batch_mapping == "optimizer":
        per_device, accumulation = rollout, 1
    else:
        per_device, accumulation = micro, _divide(rollout, micro, "rollout_batch_size / micro_batch_size")
    if s["lr_scheduler"] not in ("linear", "constant"):
        raise BenchError(f"settings 'lr_scheduler' must be linear or constant, got {s['lr_scheduler']!r}")
    precision = s["precision"]
    if precision == "auto":
        precision = "bf16" if cuda and bf16_ok else "fp32"
    if precision != "fp32" and not cuda:
        raise BenchError(f"settings 'precision' {precision} needs a GPU; use fp32 or auto on the CPU")
    if s["whiten_rewards"] and rollout // num_mini_batches < 8:
        raise BenchError("whiten_rewards needs mini_batch_size >= 8 in TRL 1.12")
    return {
        "output_dir": str(out_dir),
        "total_episodes": s["episodes"],
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": accumulation,
        "num_mini_batches": num_mini_batches,
        "local_rollout_forward_batch_size": micro,
        "num_ppo_epochs": s["ppo_epochs"],
        "learning_rate": s["learning_rate"],
        "lr_scheduler_type": s["lr_scheduler"],
        "warmup_steps": s["warmup_ratio"],  # a float in [0, 1) is a ratio of the PPO steps (transformers 5)
        "weight_decay": s["weight_decay"],
        "adam_epsilon": ADAM_EPSILON,
        "response_length": s["max_new_tokens"],
        "temperature": s["temperature"],
        "stop_token": "eos",
        "missing_eos_penalty": s["missing_eos_penalty"],
        "kl_coef": s["kl_coef"],
        "kl_estimator": s["kl_estimator"],
        "cliprange": s["cliprange"],
        "cliprange_value": s["cliprange_value"],
        "vf_coef": s["vf_coef"],
        "gamma": s["gamma"],
        "lam": s["lam"],
        "whiten_rewards": s["whiten_rewards"],
        "seed": s["seed"],
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        # PPOTrainer 1.12 never calls gradient_checkpointing_enable itself (TRL's default True is inert);
        # main() enables it on the policy when asked.
        "gradient_checkpointing": False,
        "num_sample_generations": 0,
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "push_to_hub": False,
    }


def read_prompts(path: Path, tokenizer, *, max_length: int, long_prompts: str) -> tuple[list[list[int]], dict]:
    """Token ids of each prompt (as our PPO encodes them: add_special_tokens=True, chat template for message
    lists); prompts over max_length keep their end or are skipped."""
    rows, stats = read_prompt_rows(path, tokenizer, max_length=max_length, long_prompts=long_prompts)
    return [tokens for _, tokens in rows], stats


def read_prompt_rows(path: Path, tokenizer, *, max_length: int,
                     long_prompts: str) -> tuple[list[tuple[str, list[int]]], dict]:
    """(text, token ids) of each prompt: message lists through the chat template; a prompt over max_length keeps
    its last max_length tokens (its text then decoded from them) or is skipped (shared by both TRL sides)."""
    if not path.is_file():
        raise BenchError(f"prompts file not found: {path}")
    ids, long_count = [], 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (ValueError, KeyError, TypeError) as exc:
            raise BenchError(f"{path}:{number}: expected a JSON object with a 'prompt' field ({exc})") from None
        if not isinstance(prompt, str):
            prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        tokens = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not tokens:
            raise BenchError(f"{path}:{number}: the prompt tokenises to nothing")
        if len(tokens) > max_length:
            long_count += 1
            if long_prompts == "skip":
                continue
            tokens = tokens[-max_length:]
            prompt = tokenizer.decode(tokens)
        ids.append((prompt, tokens))
    if not ids:
        raise BenchError(f"{path}: no prompts")
    return ids, {"prompts": len(ids), "long_prompts": long_count, "long_prompts_action": long_prompts}


def standardise_value_head(value_model, *, mean: float, std: float) -> None:
    """Put a value model initialised from the reward model on the normalised-score scale, as our PPO does
    (weight / std; a bias, if any, (bias - mean) / std). TRL 1.12 leaves it on the raw scale."""
    import torch

    head = value_model.score
    with torch.no_grad():
        head.weight.div_(std)
        if head.bias is not None:
            head.bias.sub_(mean).div_(std)


def fold_normalisation(reward_model, rm_dir: Path) -> dict | None:
    """Make the reward model return (score - mean) / std with the statistics our RM stage saved, as our PPO does,
    by folding them into its linear score head (TRL 1.12 has no score normalisation of its own)."""
    import torch

    stats_file = rm_dir / REWARD_STATS
    if not stats_file.is_file():
        return None
    stats = json.loads(stats_file.read_text(encoding="utf-8"))
    mean, std = float(stats["mean"]), float(stats["std"]) or 1.0
    head = reward_model.score
    if not isinstance(head, torch.nn.Linear):
        raise BenchError(f"cannot fold score normalisation into a {type(head).__name__} head")
    folded = torch.nn.Linear(head.in_features, head.out_features, bias=True,
                             device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        folded.weight.copy_(head.weight / std)
        bias = head.bias if head.bias is not None else torch.zeros_like(folded.bias)
        folded.bias.copy_((bias - mean) / std)
    reward_model.score = folded
    return {"mean": mean, "std": std}


def peak_memory_mb(cuda: bool) -> tuple[float, str]:
    import torch

    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_memory_allocated"
    # ru_maxrss is KB on Linux (bytes on macOS)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss / 2**20 if sys.platform == "darwin" else rss / 1024), "peak_rss_process"


def run(args: argparse.Namespace) -> dict:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    try:
        raw = json.loads(args.settings)
    except ValueError as exc:
        raise BenchError(f"--settings is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise BenchError("--settings must be a JSON object")
    settings, notes = resolve_settings(raw)
    sft_dir, rm_dir, out_dir = Path(args.sft), Path(args.rm), Path(args.out)
    for name, folder in (("--sft", sft_dir), ("--rm", rm_dir)):
        if not (folder / "config.json").is_file():
            raise BenchError(f"{name} {folder} is not a model folder (no config.json)")
    out_dir.mkdir(parents=True, exist_ok=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    config_kwargs = map_settings(settings, batch_mapping=args.batch_mapping, out_dir=out_dir, cuda=cuda,
                                 bf16_ok=cuda and torch.cuda.is_bf16_supported())
    if config_kwargs["bf16"] or config_kwargs["fp16"]:
        # With transformers 5, bf16/fp16 in the config no longer reach the Accelerator that PPOTrainer builds
        # itself (TrainingArguments stopped exporting ACCELERATE_MIXED_PRECISION), so say it through the env.
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if config_kwargs["bf16"] else "fp16"
    transformers.set_seed(settings["seed"])  # PPOTrainer seeds torch only; its minibatch permutations use numpy

    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise BenchError("the SFT tokenizer needs a pad token distinct from EOS: PPOTrainer 1.12 treats every pad "
                         "id as padding, so with pad == eos it masks the EOS out and scores the token before it")
    saved_padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # DataCollatorWithPadding pads on this side; PPO queries must be left-padded

    prompt_ids, prompt_info = read_prompts(Path(args.prompts), tokenizer, max_length=settings["max_prompt_length"],
                                           long_prompts=settings["long_prompts"])
    dataset = Dataset.from_dict({"input_ids": prompt_ids})
    if len(dataset) < config_kwargs["per_device_train_batch_size"] * config_kwargs["gradient_accumulation_steps"]:
        raise BenchError(f"{len(dataset)} prompts are fewer than one rollout batch "
                         f"({settings['rollout_batch_size']}); the dataloader drops incomplete batches")

    policy = AutoModelForCausalLM.from_pretrained(sft_dir)
    ref_policy = AutoModelForCausalLM.from_pretrained(sft_dir)
    reward_model = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1)
    value_dir = rm_dir if settings["value_init"] == "rm" else sft_dir
    value_model = AutoModelForSequenceClassification.from_pretrained(value_dir, num_labels=1)
    for model in (reward_model, value_model):
        model.config.pad_token_id = tokenizer.pad_token_id
    normalisation = fold_normalisation(reward_model, rm_dir) if settings["normalise_scores"] else None
    if args.value_head == "standardised" and normalisation and value_dir == rm_dir:
        standardise_value_head(value_model, **normalisation)
        notes.append("value head standardised as ours is (--value-head standardised)")
    if settings["normalise_scores"] and normalisation is None:
        notes.append(f"no {REWARD_STATS} in {rm_dir}: scores are not normalised")
    if settings["gradient_checkpointing"]:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    config = PPOConfig(**config_kwargs)

    history_file = out_dir / "history.jsonl"
    history_file.write_text("", encoding="utf-8")

    class History(TrainerCallback):
        def on_log(self, _args, state, _control, logs=None, **_kwargs):
            with history_file.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": state.global_step, **(logs or {})}) + "\n")

    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                         reward_model=reward_model, train_dataset=dataset, value_model=value_model,
                         callbacks=[History()])
    optimiser_steps = [0]
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper skips unsynced steps
    inner.register_step_post_hook(lambda *_: optimiser_steps.__setitem__(0, optimiser_steps[0] + 1))

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    # The training loop slices each local mini batch into chunks of per_device_train_batch_size.
    micro_used = min(config.per_device_train_batch_size, config.local_mini_batch_size)
    print(f"[trl-ppo] training: {config.num_total_batches} PPO steps of {config.batch_size} episodes "
          f"(mini batch {config.mini_batch_size}, micro batch {micro_used}, {config.num_ppo_epochs} epochs) "
          f"on {trainer.accelerator.device}", flush=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    load_after = os.getloadavg()
    memory, memory_kind = peak_memory_mb(cuda)
    episodes = int(trainer.state.episode)

    policy_dir = out_dir / "policy"
    trained = trainer.accelerator.unwrap_model(trainer.model).policy
    trained.save_pretrained(policy_dir)
    tokenizer.padding_side = saved_padding_side
    tokenizer.save_pretrained(policy_dir)

    mapped = {k: v for k, v in config_kwargs.items() if k not in ("output_dir",)}
    mapped.update(batch_size=config.batch_size, mini_batch_size=config.mini_batch_size,
                  local_mini_batch_size=config.local_mini_batch_size, num_total_batches=config.num_total_batches,
                  world_size=config.world_size, micro_batch_used=micro_used,
                  optim=str(getattr(config.optim, "value", config.optim)))
    result = {
        "episodes": episodes,
        "seconds": round(seconds, 3),
        "episodes_per_s": round(episodes / seconds, 3) if seconds > 0 else None,
        "peak_memory_mb": round(memory, 1),
        "memory_kind": memory_kind,
        "device": str(trainer.accelerator.device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # 1-minute load average before and after training: other work on the machine skews CPU timings badly
        "load_average": [round(load_before[0], 2), round(load_after[0], 2)],
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "batch_mapping": args.batch_mapping, "value_head": args.value_head,
        "optimizer_steps": optimiser_steps[0],
        "optimizer_steps_per_ppo_step": round(optimiser_steps[0] / max(config.num_total_batches, 1), 3),
        "settings": mapped,
        "our_settings": settings,
        "score_normalisation": normalisation,
        "value_model_from": str(value_dir),
        "data": prompt_info,
        "notes": notes,
        "sft": str(sft_dir),
        "rm": str(rm_dir),
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft", required=True, help="SFT checkpoint folder: policy, reference and tokenizer")
    parser.add_argument("--rm", required=True, help="reward-model folder: reward model and value model")
    parser.add_argument("--prompts", required=True, help='JSONL file, one {"prompt": "..."} per line')
    parser.add_argument("--out", required=True, help="output folder (policy/, history.jsonl, result.json)")
    parser.add_argument("--settings", default="{}", help="JSON object of our PPO settings (PPOStage names)")
    parser.add_argument("--batch-mapping", choices=("optimizer", "accumulate"), default="optimizer",
                        help="how rollout/mini/micro batch sizes map onto TRL's (see the module docstring)")
    parser.add_argument("--value-head", choices=("raw", "standardised"), default="raw",
                        help="TRL's value model from the RM: as TRL users load it (raw), or put on the normalised "
                             "score scale as our PPO does (standardised)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (torch.set_num_threads); 0 keeps torch's default. On a CPU shared "
                             "with other jobs, use fewer threads than free cores: oversubscribed OpenMP threads "
                             "slowed this run 5-100x on a busy 2-core machine")
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    return args


def main(argv: list[str]) -> int:
    return run_and_report(parse_args(argv), run=run, name="ppo")


def run_and_report(args: argparse.Namespace, *, run, name: str) -> int:
    """Run one TRL side (`run(args) -> result`), print its one-line result, and turn any failure into a clear
    message and exit status 1 (shared by trl_ppo.py and trl_grpo_rloo.py)."""
    try:
        result = run(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - any failure must end in a clear message and a non-zero exit
        traceback.print_exc()
        print(f"error: TRL {name} run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"[trl-{name}] {result['episodes']} episodes in {result['seconds']:.1f}s = "
          f"{result['episodes_per_s']} episodes/s; peak memory {result['peak_memory_mb']} MB "
          f"({result['memory_kind']}); {result['optimizer_steps']} optimiser steps; "
          f"wrote {Path(args.out) / 'result.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
