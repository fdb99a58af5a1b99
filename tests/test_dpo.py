"""DPO stage on the tiny task: it raises the gold score over the SFT policy, is evaluated under PPO's metric names,
saves a policy that loads back (LoRA: an adapter and a merged model); its evaluation settings default to the ppo
section's; bad pairs and a missing SFT parent stop with one line and exit 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.cli import main
from rlhf.errors import ConfigError
from rlhf.pipeline import compare
from rlhf.pipeline.compare import KEY_METRICS
from rlhf.pipeline.config import load_pipeline
from rlhf.pipeline.registry import Registry
from rlhf.stages import dpo

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "pipelines" / "tiny.yaml"


def run_dpo(parents: dict, name: str, **extra):
    settings = {"sft_parent": parents["sft"], "rm_parent": parents["rm"], "max_eval_prompts": 64, "save_steps": 1000,
                **extra}
    pipeline, path = load_pipeline(TINY, [f"name={name}", *(f"dpo.{k}={v}" for k, v in settings.items())])
    return dpo.run(pipeline, registry=Registry(parents["home"]), where=str(path))


def weights_changed(entry, parents: dict) -> bool:
    trained = AutoModelForCausalLM.from_pretrained(entry.path)
    start = AutoModelForCausalLM.from_pretrained(Registry(parents["home"]).get(parents["sft"]).path)
    return any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), start.state_dict().values()))


@pytest.mark.slow
def test_dpo_raises_the_gold_score_and_saves_a_loadable_policy(trained_parents):
    entry = run_dpo(trained_parents, "dpo-learns", max_train_samples=1600)  # 50 steps, about 7 s on 2 cores
    m = entry.metrics
    assert entry.status == "complete" and entry.parents == [trained_parents["sft"], trained_parents["rm"]]
    assert entry.roles == {"policy": trained_parents["sft"], "reference": trained_parents["sft"],
                           "reward": trained_parents["rm"]}
    # Learned: the implicit reward ranks the held-out pairs (0.0 before training, when policy and reference are
    # one model, and the loss is log 2), and the true objective of sampled responses rose over the SFT policy's.
    # Measured on 2026-11-29: accuracy 0.70, loss 0.53, gold -0.17 -> 0.33 (this 1-epoch SFT policy is weak).
    assert m["eval/reward_accuracy"] > 0.6 and m["eval/loss"] < math.log(2) - 0.1, m
    assert m["eval/gold"] > m["eval/sft_gold"] + 0.25, m
    assert m["eval/sft_kl"] == pytest.approx(0.0, abs=1e-4) and m["eval/kl"] > 0
    assert set(KEY_METRICS["ppo"]) <= set(m)  # PPO's names: `rlhf compare` puts the two side by side
    assert m["train/seconds"] > 0 and m["train/peak_memory_mb"] > 0
    history = [json.loads(line) for line in (Path(entry.path) / "history.jsonl").read_text().splitlines()]
    assert any("rewards/accuracies" in row for row in history)  # TRL's DPO metrics, per logging step
    assert weights_changed(entry, trained_parents)  # and the folder loads back as a causal LM


@pytest.mark.slow
def test_dpo_with_lora_saves_the_adapter_and_a_merged_model(trained_parents):
    entry = run_dpo(trained_parents, "dpo-lora", mode="lora", max_steps=6, max_eval_prompts=16, **{"lora.r": 4})
    assert entry.status == "complete"
    assert entry.metrics["train/trainable_parameters"] < 30_000  # rank-4 adapters on a 294,208-parameter model
    assert entry.metrics["eval/sft_kl"] == pytest.approx(0.0, abs=1e-4)  # the SFT baseline beside it, as in full mode
    assert (Path(entry.path) / "adapter" / "adapter_config.json").is_file()
    assert weights_changed(entry, trained_parents)


def test_the_evaluation_defaults_to_the_ppo_sections(registry_home):
    registry = Registry(registry_home)
    for stage in ("sft", "rm"):  # parents by id; resolving loads no model
        made = registry.create(stage=stage, pipeline="tiny", parents=[], config={}, config_hash="h",
                               data_fingerprint="d")
        registry.complete(made.id, metrics={})
    pipeline, _ = load_pipeline(TINY, [])
    found = dpo.resolve(pipeline, registry, where="tiny")
    rm_split = (len(found.data.train), len(found.data.eval))
    assert rm_split == (3600, 400)  # the rm section's pairs and its held-out fraction
    evaluation = found.evaluation
    assert (evaluation.origin, len(evaluation.prompts)) == ("data/tiny/eval_prompts.jsonl", 200)
    assert (evaluation.max_new_tokens, evaluation.temperature, evaluation.gold) == (24, 0.7, "praise")
    assert evaluation.batch_size == pipeline.ppo.eval_batch_size

    own, _ = load_pipeline(TINY, ["dpo.max_new_tokens=10", "ppo=null"])
    found = dpo.resolve(own, registry, where="tiny")
    assert found.evaluation.max_new_tokens == 10 and found.evaluation.gold is None
    assert found.evaluation.origin == "the held-out pairs" and len(found.evaluation.prompts) == 200
    with pytest.raises(ConfigError, match="dpo.sft_parent"):
        load_pipeline(TINY, ["dpo.parent=sft-20261129T000000-abcdef"])


def test_identical_chosen_and_rejected_stop_with_the_file_and_line(tmp_path, registry_home, capsys):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "Describe the red fox.\n", "chosen": "it is kind.", "rejected": "it is rude."},
            {"prompt": "Describe the grey owl.\n", "chosen": "it is wise.", "rejected": "it is wise."}] * 2
    pairs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["dpo", "--pipeline", str(TINY), f"dpo.dataset={pairs}"]) == 2
    err = capsys.readouterr().err
    assert f"{pairs} line 2: chosen and rejected are identical" in err and "dpo.skip_invalid_pairs" in err
    assert not Registry(registry_home).entries(stage="dpo")


def test_a_missing_sft_parent_names_make_sft(capsys):
    assert main(["dpo", "--pipeline", str(TINY)]) == 2
    assert "run `make sft` first" in capsys.readouterr().err


def test_compare_puts_dpo_beside_ppo(registry_home):
    registry = Registry(registry_home)

    def add(stage: str, roles: dict, metrics: dict):
        made = registry.create(stage=stage, pipeline="tiny", roles=roles, run="r1", config={}, config_hash=stage,
                               data_fingerprint="d")
        return registry.complete(made.id, metrics=metrics)

    policy = add("sft", {}, {"eval/loss": 1.4})
    reward = add("rm", {"base": policy.id}, {"eval/accuracy": 0.96})
    roles = {"policy": policy.id, "reference": policy.id, "reward": reward.id}
    add("ppo", roles, {"eval/gold": 1.77, "eval/sft_gold": -0.31, "eval/gold_gain": 2.08, "eval/kl": 4.4})
    add("dpo", roles, {"eval/gold": 1.2, "eval/sft_gold": -0.31, "eval/gold_gain": 1.51, "eval/kl": 3.0})
    [run] = compare.pipeline_runs(registry.entries())
    table = compare.to_table([run])
    assert "ppo eval/gold_gain" in table and "dpo eval/gold_gain" in table and "1.51" in table
