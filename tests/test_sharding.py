"""Sharded models (FSDP2, ZeRO-3) in PPO: whole weights for the rollout and evaluation, the evaluation split
over processes, launch checks and DeepSpeed settings. The FSDP2 run itself is tests/sharded_ppo.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from rlhf.errors import ConfigError
from rlhf.training.ppo.evaluate import PromptResult, shard, summarise
from rlhf.training.ppo.sharding import (
    check_launch,
    configure_deepspeed,
    fsdp_reshard_after_forward,
    fused_optimiser,
    gathered,
    sharding_of,
    will_shard,
)

REPO = Path(__file__).resolve().parent.parent
# The C++ runtime's words when a process aborts with a joinable std::thread left behind: seen once in ~25 runs of
# the FSDP2 launch on 2 CPU cores (2026-11-30), 2 s in, with no Python error; every rerun passed.
THREAD_ABORT = "terminate called without an active exception"


def launch(command: list[str], env: dict) -> subprocess.CompletedProcess:
    """Run a two-process launch; once more when a process of the first died of the runtime abort above (SIGABRT;
    a Python error exits 1). Any other failure, and a second abort, fail the test."""
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and THREAD_ABORT in done.stderr and "(SIGABRT)" in done.stderr:
        print(f"first launch aborted ({THREAD_ABORT!r}); running it once more")
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return done


@given(count=st.integers(0, 50), processes=st.integers(1, 8))
def test_shards_cover_every_prompt_with_equal_lengths(count, processes):
    shards = [shard(count, rank=r, processes=processes) for r in range(processes)]
    assert {i for part in shards for i in part} == set(range(count))
    assert len({len(part) for part in shards}) == 1  # the same number of generate calls everywhere
    assert all(0 <= i < count for part in shards for i in part)


def test_shard_pads_with_repeats_of_its_last_prompt():
    assert shard(5, rank=0, processes=2) == [0, 2, 4]
    assert shard(5, rank=1, processes=2) == [1, 3, 3]
    assert shard(1, rank=1, processes=2) == [0]  # nothing of its own: a repeat, dropped by summarise
    assert shard(0, rank=0, processes=2) == []


def result(index: int, score: float, gold: float | None = 1.0) -> PromptResult:
    return PromptResult(index=index, score=score, raw_score=2 * score, kl=0.5, gold=gold, length=3, eos=index % 2 == 0,
                        response=f"r{index}")


def test_summarise_counts_each_prompt_once_in_prompt_order():
    texts = ["p0", "p1", "p2"]
    # process 0: prompts 0, 2; process 1: prompt 1 and a repeat of it
    summary = summarise([result(0, 1.0), result(2, 3.0), result(1, 2.0), result(1, 2.0)], texts)
    assert summary.score == pytest.approx(2.0) and summary.raw_score == pytest.approx(4.0)
    assert summary.eos_rate == pytest.approx(2 / 3)
    assert [s[0] for s in summary.samples] == ["p0", "p1", "p2"]
    assert summarise([result(0, 1.0, gold=None)], texts).gold is None
    with pytest.raises(ValueError):
        summarise([], texts)


def test_fsdp_version_1_is_refused_before_anything_runs():
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        check_launch({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
    check_launch({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    check_launch({})


def test_deepspeed_gets_the_micro_batch_and_clipping_unless_the_user_set_them():
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto"}
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))
    configure_deepspeed(accelerator, micro_batch_size=8, max_grad_norm=1.0)
    assert config == {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.0}
    mine = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.5}
    accelerator.state.deepspeed_plugin.deepspeed_config = mine
    configure_deepspeed(accelerator, micro_batch_size=8, max_grad_norm=1.0)
    assert mine == {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.5}
    configure_deepspeed(SimpleNamespace(state=SimpleNamespace()), micro_batch_size=8, max_grad_norm=1.0)  # no-op


def test_sharded_launches_are_known_before_any_model_is_loaded():
    """will_shard: FSDP and ZeRO-3 shard the models (generation then runs synced, so ppo.generation_cache static is
    refused at set-up); ZeRO-2, DDP and one process hold them whole."""
    from accelerate.utils import DistributedType

    def launch(kind, stage=None):
        plugin = SimpleNamespace(zero_stage=stage) if stage else None
        return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=plugin))

    assert will_shard(launch(DistributedType.FSDP)) and will_shard(launch(DistributedType.DEEPSPEED, 3))
    assert not will_shard(launch(DistributedType.DEEPSPEED, 2))
    assert not will_shard(launch(DistributedType.MULTI_GPU)) and not will_shard(launch(DistributedType.NO))


def test_fused_adamw_only_for_whole_parameters_on_cpu_or_cuda():
    """fused_optimiser: one process or DDP on a CPU or CUDA device; never DeepSpeed (its own partitions), FSDP
    (DTensor shards) or another device."""
    import torch
    from accelerate.utils import DistributedType

    def launch(kind, device="cpu"):
        return SimpleNamespace(distributed_type=kind, device=torch.device(device))

    assert fused_optimiser(launch(DistributedType.NO)) and fused_optimiser(launch(DistributedType.MULTI_GPU, "cuda"))
    assert fused_optimiser(launch(DistributedType.MULTI_CPU))
    assert not fused_optimiser(launch(DistributedType.FSDP, "cuda"))
    assert not fused_optimiser(launch(DistributedType.DEEPSPEED, "cuda"))
    assert not fused_optimiser(launch(DistributedType.NO, "meta"))


def test_whole_models_need_no_gathering():
    model = nn.Linear(2, 2)
    assert sharding_of(model) == "whole"
    with gathered(model) as synced:
        assert synced is False
    assert fsdp_reshard_after_forward(SimpleNamespace(state=SimpleNamespace())) is True


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fsdp2_rollout_evaluation_and_saving_match_the_whole_model(mode, tmp_path):
    """accelerate's own FSDP2 preparation (accelerate/fsdp.yaml's settings) on two CPU processes: the rollout,
    evaluation, saving and an optimiser step match an unsharded copy."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests" / "sharded_ppo.py"), str(tmp_path), mode]
    done = launch(command, env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = [json.loads((tmp_path / f"report-{mode}-{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["sharding"] == "fsdp2" and report["whole_sharding"] == "whole"
        assert report["blocks_sharded"] and report["head_tied"], report
        assert report["parameters"][0] == report["parameters"][1] and not report["fresh_head_on_meta"], report
        assert report["synced"] and report["whole_inside"] and report["sharded_after"] and report["grads"]
        assert report["logits_match"] and report["reference_match"] and report["values_match"]
        assert report["eval_matches_whole"] and report["eval_prompts"] == 11
        # one AdamW step, each process on its own batch, equals the whole model's on the mean of their losses
        assert report["step_changed_weights"] and report["step_moved_outputs"], report
        assert report["optimiser_step_matches"], report
    assert reports[0]["response_width"] != reports[1]["response_width"]  # the processes generated apart, in step
    assert reports[0]["eval_gold"] == reports[1]["eval_gold"]
    assert reports[0]["saved_policy_matches"] and reports[0]["saved_value_matches"]
    assert reports[0]["adapter_saved"] == (mode == "lora")


@pytest.fixture(scope="module")
def parents(trained_parents) -> dict:
    return trained_parents


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "mode"), [(3, "full"), (3, "lora"), (2, "full")])
def test_deepspeed_ppo_on_two_cpu_processes(stage, mode, parents):
    """accelerate/zero3.yaml and zero2.yaml as shipped, on two CPU processes: under ZeRO-3 the weights are
    partitioned and the rollout and evaluation run on gathered weights; under ZeRO-2 the processes' copies stay
    in sync; the saved policy loads and has moved."""
    pytest.importorskip("deepspeed")
    from transformers import AutoModelForCausalLM

    from rlhf.pipeline.registry import Registry

    env = {**os.environ, "RLHF_HOME": str(parents["home"]), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled"}
    name = f"zero{stage}-{mode}"
    settings = {"sft_parent": parents["sft"], "rm_parent": parents["rm"], "mode": mode, "episodes": 64,
                "rollout_batch_size": 16, "mini_batch_size": 8, "micro_batch_size": 4, "max_eval_prompts": 16,
                "save_steps": 100}
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(REPO / f"accelerate/zero{stage}.yaml"), "--num_processes", "2",
               "--mixed_precision", "no", "-m", "rlhf.cli", "ppo",
               "--pipeline", str(REPO / "pipelines" / "tiny.yaml"), f"name={name}",
               *[f"ppo.{k}={v}" for k, v in settings.items()]]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"2 process(es), weights {'zero3' if stage == 3 else 'whole'}" in done.stdout
    [entry] = Registry(parents["home"]).entries(stage="ppo", pipeline=name)
    # ZeRO-2 keeps a whole copy on each process, which the digest compares; ZeRO-3's one partitioned copy is the
    # same bytes everywhere once gathered, so the check reports it as not applicable rather than a vacuous True.
    assert entry.status == "complete"
    assert entry.metrics["train/processes_in_sync"] is (None if stage == 3 else True)
    assert entry.metrics["train/episodes"] == 64 and entry.metrics["eval/prompts"] == 16
    policy = AutoModelForCausalLM.from_pretrained(entry.path)
    sft_policy = AutoModelForCausalLM.from_pretrained(Registry(parents["home"]).get(parents["sft"]).path)
    moved = [name for (name, a), b in zip(policy.named_parameters(), sft_policy.parameters()) if not a.equal(b)]
    assert moved, "the saved policy equals the SFT policy"
    assert (Path(entry.path) / "adapter" / "adapter_model.safetensors").is_file() == (mode == "lora")
