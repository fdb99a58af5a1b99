"""`make bench ALGO=grpo|rloo`: how our settings map onto TRL 1.16's GRPOConfig / RLOOConfig, the reward TRL is
handed, and (slow) one short TRL run of each. `make bench` itself trains for minutes and is not run here.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_bench_trl.py
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.core.prompts import left_pad
from rlhf.pipeline.config import TinyModelSpec
from rlhf.training.ppo.scorer import RewardScorer, training_scores
from rlhf.training.reward import RewardStats
from rlhf.training.tiny import build_tiny

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "pipelines" / "tiny.yaml"
sys.path.insert(0, str(REPO / "bench"))

import trl_grpo_rloo as critic_free  # noqa: E402  (bench/trl_grpo_rloo.py)
import trl_ppo  # noqa: E402  (bench/trl_ppo.py)
from trl_ppo import BenchError  # noqa: E402


def _bench_run():
    """bench/run.py as the module `bench_run` (registered first: its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module
    spec.loader.exec_module(module)
    return module


# The tiny pipeline's ppo section with the grpo comparison's overrides (pipelines/tiny.yaml, bench/run.py).
TINY_GRPO = {"algorithm": "grpo", "samples_per_prompt": 4, "kl_penalty": "loss", "episodes": 1024,
             "rollout_batch_size": 64, "mini_batch_size": 16, "micro_batch_size": 16, "ppo_epochs": 4,
             "learning_rate": 3e-4, "max_new_tokens": 24, "max_prompt_length": 32, "kl_coef": 0.1}


def _mapped(raw: dict, *, algo: str = "grpo") -> dict:
    settings, _ = critic_free.resolve_settings(raw, algo=algo)
    return critic_free.map_settings(settings, algo=algo, out_dir=Path("out"), cuda=False, bf16_ok=False)


def test_grpo_batches_match_ours():
    # Ours: 1024 episodes / 64 per step = 16 rollouts, each 4 epochs x 64 / 16 = 16 optimiser steps: 256 in all.
    # TRL: each generation of 64 completions is cut into 64 / 16 = 4 micro batches of 16, one optimiser step each
    # (no accumulation), passed over 4 times: 16 steps per generation, x 16 generations = 256 max_steps.
    config = _mapped(TINY_GRPO)
    assert config["num_generations"] == 4
    assert config["per_device_train_batch_size"] == 16
    assert config["gradient_accumulation_steps"] == 1
    assert config["steps_per_generation"] == 4  # 64 completions (16 prompts x 4) per generate call
    assert config["num_iterations"] == 4
    assert config["max_steps"] == 256
    assert config["beta"] == 0.1 and config["epsilon"] == 0.2
    assert config["loss_type"] == "bnpo"  # a token mean per micro batch, as our policy loss
    assert config["scale_rewards"] == "group"
    assert config["use_bias_correction_kl"] is False
    # TRL's own defaults that differ from ours, set explicitly
    assert config["activation_checkpointing"] is False and config["bf16"] is False
    assert config["top_k"] == 0 and config["top_p"] == 1.0 and config["temperature"] == 0.7
    assert config["adam_epsilon"] == 1e-5 and config["optim"] == "adamw_torch" and config["max_grad_norm"] == 1.0


def test_accumulation_and_unscaled_rewards():
    # rollout 32 = 8 prompts x 4; minibatch 16 = 4 micro batches of 4; 2 epochs; 64 episodes = 2 generations.
    # Per generation: 32 / 4 = 8 micro batches x 2 iterations = 16 micro batches = 4 optimiser steps; 2 gens -> 8.
    config = _mapped({**TINY_GRPO, "episodes": 64, "rollout_batch_size": 32, "mini_batch_size": 16,
                      "micro_batch_size": 4, "ppo_epochs": 2, "scale_rewards": False, "min_new_tokens": 3})
    assert (config["per_device_train_batch_size"], config["gradient_accumulation_steps"]) == (4, 4)
    assert config["steps_per_generation"] == 8 and config["max_steps"] == 8
    assert config["scale_rewards"] == "none"
    assert config["generation_kwargs"] == {"min_new_tokens": 3}


def test_rloo_mapping():
    config = _mapped({**TINY_GRPO, "algorithm": "rloo", "kl_penalty": "reward"}, algo="rloo")
    assert config["beta"] == 0.1 and config["normalize_advantages"] is False and config["max_steps"] == 256
    for grpo_only in ("loss_type", "scale_rewards", "use_bias_correction_kl", "importance_sampling_level"):
        assert grpo_only not in config


def test_mapped_configs_are_accepted_by_trl():
    """GRPOConfig / RLOOConfig take every mapped key and derive a generation batch of one rollout."""
    import trl

    for algo, config_class in (("grpo", trl.GRPOConfig), ("rloo", trl.RLOOConfig)):
        raw = {**TINY_GRPO, "algorithm": algo, "kl_penalty": "loss" if algo == "grpo" else "reward"}
        settings, _ = critic_free.resolve_settings(raw, algo=algo)
        kwargs = critic_free.map_settings(settings, algo=algo, out_dir=Path("unused"), cuda=False, bf16_ok=False)
        config = config_class(**kwargs, use_cpu=True)
        assert config.generation_batch_size == 64 and config.steps_per_generation == 4


@pytest.mark.parametrize("algo, change, expected", [
    ("grpo", {"kl_penalty": "reward"}, "kl_penalty' must be loss"),
    ("rloo", {"kl_penalty": "loss"}, "kl_penalty' must be reward"),
    ("rloo", {"kl_penalty": "reward", "kl_estimator": "k3"}, "kl_estimator' must be k1"),
    ("grpo", {"samples_per_prompt": 1}, "at least 2"),
    ("grpo", {"target_kl": 6.0}, "no TRL 1.16 grpo counterpart"),
    ("grpo", {"mode": "lora"}, "no TRL 1.16 grpo counterpart"),
    ("grpo", {"no_such_key": 1}, "unknown settings keys: no_such_key"),
    ("grpo", {"algorithm": "rloo"}, "but --algo is 'grpo'"),
])
def test_settings_trl_cannot_match_are_refused(algo, change, expected):
    with pytest.raises(BenchError, match=expected):
        critic_free.resolve_settings({**TINY_GRPO, "algorithm": algo, **change}, algo=algo)


@pytest.mark.parametrize("change, expected", [
    ({"rollout_batch_size": 62, "mini_batch_size": 62, "micro_batch_size": 62}, "samples_per_prompt: 62"),
    ({"episodes": 1000}, "episodes / rollout_batch_size: 1000 is not a multiple of 64"),
    ({"micro_batch_size": 12}, "mini_batch_size / micro_batch_size"),
    ({"precision": "bf16"}, "needs a GPU"),
])
def test_sizes_that_do_not_divide_are_refused(change, expected):
    with pytest.raises(BenchError, match=expected):
        _mapped({**TINY_GRPO, **change})


def test_bench_settings_reach_each_trl_script():
    """bench/run.py's settings for each comparison pass the checks of the script that receives them; for ppo the
    PPOStage keys newer than bench/trl_ppo.py are dropped (TRL 1.12 would refuse them as unknown)."""
    run = _bench_run()
    ppo = run.shared_settings(TINY, [*run.ALGORITHMS["ppo"], "ppo.episodes=1024"], algo="ppo")
    assert not set(run.PPO_ONLY) & set(ppo)
    trl_ppo.resolve_settings(ppo)
    for algo in ("grpo", "rloo"):
        settings = run.shared_settings(TINY, [*run.ALGORITHMS[algo], "ppo.episodes=1024"], algo=algo)
        resolved, _ = critic_free.resolve_settings(settings, algo=algo)
        assert resolved["samples_per_prompt"] == 4 and resolved["episodes"] == 1024
    with pytest.raises(SystemExit, match="ppo.samples_per_prompt=4 has no TRL 1.12 PPO counterpart"):
        run.shared_settings(TINY, ["ppo.samples_per_prompt=4"], algo="ppo")


def _tiny_checkpoints(folder: Path) -> tuple[Path, Path]:
    """A random tiny policy and a reward model on it (random head), with reward statistics; nothing trained."""
    texts = [json.loads(line)["prompt"] for line in (REPO / "data/tiny/prompts.jsonl").read_text().splitlines()]
    spec = TinyModelSpec(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    policy, tokenizer = build_tiny(texts[:200], spec, seed=0)
    sft_dir, rm_dir = folder / "sft", folder / "rm"
    policy.save_pretrained(sft_dir)
    tokenizer.save_pretrained(sft_dir)
    from transformers import AutoModelForSequenceClassification

    reward = AutoModelForSequenceClassification.from_pretrained(sft_dir, num_labels=1)
    reward.save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)
    RewardStats(mean=0.25, std=2.0, chosen_mean=0.0, chosen_std=1.0, rejected_mean=0.0, rejected_std=1.0,
                pairs=1).save(rm_dir)
    return sft_dir, rm_dir


def test_reward_function_scores_what_ours_scores(tmp_path):
    """TRL's reward function (bench) and our PPO's scorer give the same training scores for the same prompt and
    completion ids: one completion ended by EOS, one cut at the length limit (missing-EOS penalty), one clipped."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    sft_dir, rm_dir = _tiny_checkpoints(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1).eval()
    stats = RewardStats.load(rm_dir)
    prompts = ["Describe the red fox.\n", "Tell me about the owl.\n", "What is the duck like?\n"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    words = [tokenizer(" it is kind and quiet.")["input_ids"], tokenizer(" a fox")["input_ids"],
             tokenizer(" loyal")["input_ids"]]
    completions = [words[0] + [eos], words[1], words[2] + [eos]]

    function = critic_free.RewardFunction(model, tokenizer, stats={"mean": stats.mean, "std": stats.std},
                                          score_clip=0.3, missing_eos_penalty=1.0, batch_size=2)
    theirs = torch.tensor(function(prompts=prompts, completions=["unused"] * 3, completion_ids=completions,
                                   trainer_state=None))
    assert function.episodes == 3

    scorer = RewardScorer(model=model, tokenizer=tokenizer, policy_tokenizer=tokenizer, stats=stats,
                          max_length=128, batch_size=2)
    queries, query_mask = left_pad([tokenizer(p)["input_ids"] for p in prompts], pad_token_id=pad)
    width = max(map(len, completions))
    responses = torch.tensor([c + [pad] * (width - len(c)) for c in completions])
    response_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions])
    raw = scorer.raw(queries, query_mask, responses, response_mask)
    has_eos = torch.tensor([c[-1] == eos for c in completions])
    ours = training_scores(scorer.normalise(raw, enabled=True), has_eos, missing_eos_penalty=1.0, score_clip=0.3)
    torch.testing.assert_close(theirs, ours.float(), atol=1e-5, rtol=1e-5)
    assert theirs[1] <= -0.7  # cut at the limit: clipped to >= -0.3, then 1.0 lower


def test_long_prompts_keep_their_end(tmp_path):
    sft_dir, _ = _tiny_checkpoints(tmp_path)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    long_prompt = "Tell me about the very very very very very very very very old brown duck.\n"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi.\n"}) + "\n" + json.dumps({"prompt": long_prompt}) + "\n")
    texts, info = critic_free.read_prompts(prompts, tokenizer, max_length=6, long_prompts="truncate")
    assert texts[0] == "Hi.\n" and long_prompt.endswith(texts[1]) and len(tokenizer(texts[1])["input_ids"]) <= 6
    assert info["long_prompts"] == 1
    texts, info = critic_free.read_prompts(prompts, tokenizer, max_length=6, long_prompts="skip")
    assert texts == ["Hi.\n"]


@pytest.mark.slow
def test_trl_grpo_and_rloo_run_and_change_the_policy(tmp_path):
    """A few steps of each TRL 1.16 trainer through the bench script: the episodes and optimiser steps are those
    of the mapping, and the saved policy loads back and differs from the SFT policy."""
    from transformers import AutoModelForCausalLM

    sft_dir, rm_dir = _tiny_checkpoints(tmp_path)
    # 16 episodes = 2 rollouts of 8 (2 prompts x 4); minibatch 8 = 2 micro batches of 4; 2 epochs -> 2 steps each.
    settings = {"samples_per_prompt": 4, "episodes": 16, "rollout_batch_size": 8, "mini_batch_size": 8,
                "micro_batch_size": 4, "ppo_epochs": 2, "learning_rate": 1e-2, "max_new_tokens": 8,
                "max_prompt_length": 32}
    start = AutoModelForCausalLM.from_pretrained(sft_dir).state_dict()
    for algo, kl_penalty in (("grpo", "loss"), ("rloo", "reward")):
        out = tmp_path / algo
        command = [sys.executable, str(REPO / "bench" / "trl_grpo_rloo.py"), "--algo", algo, "--sft", str(sft_dir),
                   "--rm", str(rm_dir), "--prompts", str(REPO / "data/tiny/prompts.jsonl"), "--out", str(out),
                   "--threads", "1", "--settings", json.dumps({**settings, "kl_penalty": kl_penalty})]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads((out / "result.json").read_text())
        assert result["episodes"] == 16 and result["optimizer_steps"] == 4 and result["episodes_per_s"] > 0
        trained = AutoModelForCausalLM.from_pretrained(out / "policy").state_dict()
        assert any(not torch.equal(trained[name], start[name]) for name in start)
        logged = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
        assert "rewards/reward_model/mean" in logged[0]
