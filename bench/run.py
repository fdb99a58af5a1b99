"""`make bench`: our PPO against TRL 1.12's PPOTrainer, or our GRPO / RLOO against TRL 1.16's GRPOTrainer /
RLOOTrainer, on the same SFT and RM checkpoints and settings.

    make bench [ALGO=grpo] [BENCH_ARGS="--runs 3 --episodes 1024 --threads 1"]
    .venv/bin/python bench/run.py --pipeline pipelines/tiny.yaml --algo rloo --runs 3

Builds (or reuses) the pipeline's SFT and RM entries in runs/bench/, runs each side `--runs` times with the same
seeds, evaluates every trained policy with the same code (rlhf/training/ppo/evaluate.py: held-out prompts, seeded
sampling, gold score), and prints the medians and one summary line for scripts:
    ppo speedup vs trl-1.12: 1.73x, gold gain ours 0.81 vs trl 0.79
TRL 1.12 (PPO) runs in its own venv (.bench/trl-1.12, bench/trl_env.py, never a dependency of the package);
TRL 1.16 (GRPO, RLOO) is our own dependency and runs in our venv, in its own process (bench/trl_grpo_rloo.py).
Throughput is episodes (sampled responses) per second of the training loop (loading and evaluation excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from trl_env import ensure_trl_venv  # noqa: E402

from rlhf.core.prompts import tokenize_prompts  # noqa: E402
from rlhf.core.sampling import sampling_config  # noqa: E402
from rlhf.pipeline.config import load_pipeline  # noqa: E402
from rlhf.pipeline.data import load_records, prompt_rows  # noqa: E402
from rlhf.pipeline.registry import Registry  # noqa: E402
from rlhf.pipeline.schema import as_plain  # noqa: E402
from rlhf.stages import rm, sft  # noqa: E402
from rlhf.tasks import gold_function  # noqa: E402
from rlhf.training.ppo.evaluate import evaluate, summarise  # noqa: E402
from rlhf.training.ppo.models import response_logits  # noqa: E402
from rlhf.training.ppo.setup import load_models  # noqa: E402

HOME = REPO / "runs" / "bench"
# What each comparison sets on top of the pipeline's ppo section (docs/bench-trl.md): group of 4, and the KL where
# TRL's trainer puts it (GRPOTrainer: a k3 loss term; RLOOTrainer: in the reward).
ALGORITHMS = {
    "ppo": [],
    "grpo": ["ppo.algorithm=grpo", "ppo.samples_per_prompt=4", "ppo.kl_penalty=loss"],
    "rloo": ["ppo.algorithm=rloo", "ppo.samples_per_prompt=4", "ppo.kl_penalty=reward"],
}
PEERS = {"ppo": "trl-1.12", "grpo": "trl-1.16", "rloo": "trl-1.16"}
# PPOStage keys newer than bench/trl_ppo.py, with the only value TRL 1.12's PPO can match (None: any, unused).
PPO_ONLY = {"algorithm": "ppo", "samples_per_prompt": 1, "kl_penalty": "reward", "scale_rewards": None,
            "min_new_tokens": 0, "shared_prefix": None}


@dataclass(frozen=True)
class RunResult:
    episodes_per_s: float
    peak_memory_mb: float
    gold: float
    sft_gold: float

    @property
    def gold_gain(self) -> float:
        return self.gold - self.sft_gold


def ensure_parents(pipeline_file: Path, registry: Registry) -> tuple[str, str]:
    pipeline, _ = load_pipeline(pipeline_file)
    policy = sft.run(pipeline, registry=registry, where=str(pipeline_file))
    reward = rm.run(pipeline, registry=registry, where=str(pipeline_file))
    return policy.id, reward.id


def shared_settings(pipeline_file: Path, overrides: list[str], *, algo: str = "ppo") -> dict:
    """The settings both sides run with: the pipeline's ppo section plus the bench overrides."""
    pipeline, _ = load_pipeline(pipeline_file, overrides)
    settings = as_plain(pipeline.ppo)
    for key in ("dataset", "eval_prompts", "gold", "sft_parent", "rm_parent", "lora"):
        settings.pop(key, None)
    if algo == "ppo":
        for key, value in PPO_ONLY.items():
            if value is not None and settings.get(key, value) != value:
                raise SystemExit(f"bench: ppo.{key}={settings[key]!r} has no TRL 1.12 PPO counterpart "
                                 f"(only {value!r}); use --algo for grpo or rloo")
            settings.pop(key, None)
    return {**settings, "seed": pipeline.seed}


def run_ours(pipeline_file: Path, overrides: list[str], *, seed: int, env: dict, sft_id: str, rm_id: str,
             algo: str = "ppo") -> RunResult:
    name = "bench-ours" if algo == "ppo" else f"bench-ours-{algo}"
    args = [f"name={name}", f"seed={seed}", f"ppo.sft_parent={sft_id}", f"ppo.rm_parent={rm_id}", *overrides]
    command = [sys.executable, "-m", "rlhf.cli", "ppo", "--pipeline", str(pipeline_file), "--force", *args]
    before = {e.id for e in Registry(HOME).entries(stage="ppo", pipeline=name)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench: our {algo} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    # The entry this run made, not the pipeline's newest: a run that made none must not report the last one's.
    made = [e for e in Registry(HOME).entries(stage="ppo", pipeline=name, status="complete") if e.id not in before]
    if len(made) != 1:
        raise SystemExit(f"bench: our {algo} run (seed {seed}) exited 0 but left {len(made)} new complete entries "
                         f"in {HOME} instead of one:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    entry = made[0]
    if algo != "ppo" and (Path(entry.path) / "value_model").exists():
        raise SystemExit(f"bench: our trainer ignored ppo.algorithm={algo} (it trained and saved a value model in "
                         f"{entry.path}); nothing to compare yet")
    m = entry.metrics
    return RunResult(episodes_per_s=m["train/episodes_per_s"], peak_memory_mb=m["train/peak_memory_mb"],
                     gold=m["eval/gold"], sft_gold=m["eval/sft_gold"])


def run_trl(python: Path, pipeline_file: Path, settings: dict, *, seed: int, env: dict, sft_path: str,
            rm_path: str, out: Path, threads: int, value_head: str, algo: str = "ppo", reward: str = "ids",
            overrides: list[str] = ()) -> dict:
    """One TRL run in its own process: TRL 1.12's PPO (bench/trl_ppo.py, its venv's `python`) or TRL 1.16's
    GRPO / RLOO (bench/trl_grpo_rloo.py, our venv's `python`); its result.json."""
    pipeline, _ = load_pipeline(pipeline_file, list(overrides))  # the prompts ours trains on (--set ppo.dataset=...)
    common = ["--sft", sft_path, "--rm", rm_path, "--prompts", pipeline.ppo.dataset.path, "--out", str(out),
              "--settings", json.dumps({**settings, "seed": seed}), "--threads", str(threads)]
    if algo == "ppo":
        command = [str(python), str(REPO / "bench" / "trl_ppo.py"), *common, "--value-head", value_head]
    else:
        command = [str(python), str(REPO / "bench" / "trl_grpo_rloo.py"), "--algo", algo, *common,
                   "--reward", reward]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench: {PEERS[algo]} {algo} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return json.loads((out / "result.json").read_text())


def gold_of(policy_path: Path, pipeline_file: Path, overrides: list[str], *, seed: int, sft_id: str,
            rm_id: str) -> tuple[float, float]:
    """(gold of the policy in `policy_path`, gold of the SFT policy) with our evaluation, as our stage runs it."""
    pipeline, _ = load_pipeline(pipeline_file, [f"seed={seed}", *overrides])
    cfg = pipeline.ppo
    registry = Registry(HOME)
    sft = registry.get(sft_id)
    loaded = load_models(pipeline, cfg, policy_entry=sft, reference_entry=sft, rm=registry.get(rm_id),
                         device=torch.device("cpu"))
    policy = AutoModelForCausalLM.from_pretrained(policy_path).eval()
    tokenizer = loaded.tokenizer
    rows = prompt_rows(load_records(cfg.eval_prompts))[:cfg.max_eval_prompts]
    prompts = tokenize_prompts(rows, tokenizer, max_length=cfg.max_prompt_length, long_prompts=cfg.long_prompts,
                               origin="eval")
    generation = sampling_config(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    reference = lambda seq, att, width: response_logits(loaded.reference, seq, att, query_width=width)  # noqa: E731
    common = dict(indices=list(range(len(prompts.ids))), generation=generation, temperature=cfg.temperature,
                  batch_size=cfg.eval_batch_size, gold=gold_function(cfg.gold, where="bench"), seed=seed,
                  device=torch.device("cpu"))
    trained = summarise(evaluate(policy, reference, loaded.scorer, prompts, tokenizer, **common), prompts.texts)
    baseline = summarise(evaluate(loaded.reference, reference, loaded.scorer, prompts, tokenizer, **common),
                         prompts.texts)
    return trained.gold, baseline.gold


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=str(REPO / "pipelines" / "tiny.yaml"))
    parser.add_argument("--algo", choices=tuple(ALGORITHMS), default="ppo",
                        help="ppo: ours against TRL 1.12's PPOTrainer; grpo, rloo: against TRL 1.16's trainers")
    parser.add_argument("--runs", type=int, default=3, help="runs per side (medians are reported)")
    parser.add_argument("--episodes", type=int, default=1024)
    parser.add_argument("--trl-value-head", choices=("raw", "standardised"), default="raw",
                        help="TRL's RM-initialised value head: raw as TRL users load it, or standardised as ours")
    parser.add_argument("--trl-reward", choices=("ids", "text"), default="ids",
                        help="grpo, rloo: our RM scores the same ids as ours (ids), or TRL's own RM path (text: "
                             "re-tokenised text without EOS); see bench/trl_grpo_rloo.py")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a pipeline override for both sides, e.g. --set ppo.kl_coef=0.05 (repeatable)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per side (0: torch's default); 1 keeps a shared CPU from thrashing")
    args = parser.parse_args(argv)
    pipeline_file = Path(args.pipeline).resolve()
    overrides = [*ALGORITHMS[args.algo], f"ppo.episodes={args.episodes}", *args.set]
    peer = PEERS[args.algo]
    env = {**os.environ, "RLHF_HOME": str(HOME), "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    os.environ.update({k: env[k] for k in ("RLHF_HOME", "WANDB_MODE")})

    sft_id, rm_id = ensure_parents(pipeline_file, Registry(HOME))
    registry = Registry(HOME)
    python = ensure_trl_venv() if args.algo == "ppo" else Path(sys.executable)
    settings = shared_settings(pipeline_file, overrides, algo=args.algo)
    print(f"bench: sft {sft_id}, rm {rm_id}; settings {json.dumps(settings)}")
    ours, trl = [], []
    for run in range(args.runs):
        seed = settings["seed"] + run
        ours.append(run_ours(pipeline_file, overrides, seed=seed, env=env, sft_id=sft_id, rm_id=rm_id,
                             algo=args.algo))
        print(f"bench: ours run {run + 1}: {ours[-1]}")
        out = HOME / ("trl" if args.algo == "ppo" else f"trl-{args.algo}") / f"run-{run + 1}"
        result = run_trl(python, pipeline_file, settings, seed=seed, env=env, sft_path=registry.get(sft_id).path,
                         rm_path=registry.get(rm_id).path, out=out, threads=args.threads,
                         value_head=args.trl_value_head, algo=args.algo, reward=args.trl_reward,
                         overrides=overrides)
        gold, sft_gold = gold_of(out / "policy", pipeline_file, overrides, seed=seed, sft_id=sft_id, rm_id=rm_id)
        trl.append(RunResult(episodes_per_s=result["episodes_per_s"], peak_memory_mb=result["peak_memory_mb"],
                             gold=gold, sft_gold=sft_gold))
        print(f"bench: {peer} run {run + 1}: {trl[-1]}")

    def median(results: list[RunResult], name: str) -> float:
        return statistics.median(getattr(r, name) for r in results)

    print(f"\n{'':>10} {'episodes/s':>11} {'peak MB':>9} {'gold':>7} {'sft gold':>9} {'gain':>7}   "
          f"(medians of {args.runs} runs, {args.episodes} episodes, "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'})")
    for name, results in (("ours", ours), (peer, trl)):
        print(f"{name:>10} {median(results, 'episodes_per_s'):>11.1f} {median(results, 'peak_memory_mb'):>9.0f} "
              f"{median(results, 'gold'):>7.3f} {median(results, 'sft_gold'):>9.3f} "
              f"{median(results, 'gold_gain'):>7.3f}")
    speedup = median(ours, "episodes_per_s") / median(trl, "episodes_per_s")
    print(f"{args.algo} speedup vs {peer}: {speedup:.2f}x, gold gain ours {median(ours, 'gold_gain'):.2f} "
          f"vs trl {median(trl, 'gold_gain'):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
