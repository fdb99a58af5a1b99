"""Reward-model stage end to end: it learns the gold ranking, agrees with the gold function on fresh
pairs, loads back with its statistics, and handles real HH-RLHF data, another tokenizer and LoRA; it keeps its best
checkpoint (across a resume too) and warns, with what to try, when it is weak."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest
import torch
from conftest import HH_RLHF
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf.errors import StageError
from rlhf.pipeline import history
from rlhf.pipeline.config import load_pipeline
from rlhf.pipeline.registry import Registry
from rlhf.stages import rm, rm_keep, sft
from rlhf.tasks import praise
from rlhf.training.reward import RewardStats, encode_text, score_ids

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

SMALL = """
name: {name}
model: tiny
seed: 5
tiny: {{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2,
        num_key_value_heads: 2}}
rm:
  dataset: {dataset}
  init: {init}
  mode: {mode}
  max_steps: {steps}
  max_train_samples: {samples}
  learning_rate: {lr}
  batch_size: 16
  max_length: {max_length}
  skip_invalid_pairs: true
  logging_steps: 5
  save_steps: {save_steps}
"""


def small(tmp_path: Path, *, name="rmsmall", dataset=str(REPO / "data/tiny/comparisons.jsonl"), init="base",
          mode="full", steps=40, samples=600, lr=3e-3, max_length=64, save_steps=100) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(SMALL.format(name=name, dataset=dataset, init=init, mode=mode, steps=steps, samples=samples,
                                 lr=lr, max_length=max_length, save_steps=save_steps), encoding="utf-8")
    return path


def registry() -> Registry:
    return Registry(os.environ["RLHF_HOME"])


def run(stage, file: Path, overrides=()):
    pipeline, path = load_pipeline(file, list(overrides))
    return stage.run(pipeline, registry=registry(), where=str(path))


def folder_accuracy(folder: str, file: Path) -> float:
    """Share of the pairs in `file` that the reward model saved in `folder` ranks right, tokenised as the stage does."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines()]
    encoded, _ = rm.tokenize_pairs(rows, tokenizer, max_length=64)
    chosen, rejected = (score_ids(model, [r[f"{side}_ids"] for r in encoded], pad_token_id=tokenizer.pad_token_id)
                        for side in ("chosen", "rejected"))
    return (chosen > rejected).float().mean().item()


def gold_agreement(folder: str, *, pairs: int = 300, seed: int = 12345) -> float:
    """Share of freshly sampled gold-ranked pairs (never in the data files) the reward model ranks right."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    rng = random.Random(seed)
    fresh = [praise.sample_comparison(rng) for _ in range(pairs)]

    def ids(prompt: str, response: str) -> list[int]:
        text = praise.as_policy_prompt(prompt) + response + (tokenizer.eos_token or "")
        return encode_text(tokenizer, text, max_length=64)[0]

    chosen = score_ids(model, [ids(p.prompt, p.chosen) for p in fresh], pad_token_id=tokenizer.pad_token_id)
    rejected = score_ids(model, [ids(p.prompt, p.rejected) for p in fresh], pad_token_id=tokenizer.pad_token_id)
    return (chosen > rejected).float().mean().item()


def test_tiny_pipeline_rm_learns_the_gold_ranking():
    tiny = REPO / "pipelines" / "tiny.yaml"
    parent = run(sft, tiny, ["sft.epochs=1"])
    entry = run(rm, tiny, ["sft.epochs=1"])
    assert entry.status == "complete" and entry.parents == [parent.id]
    # Learned: held-out accuracy well above chance, and above the untrained head's.
    assert entry.metrics["eval/accuracy"] >= 0.90, entry.metrics  # the target; 0.945-0.99 over seeds 42-47
    assert entry.metrics["eval/accuracy"] > entry.metrics["eval/init_accuracy"] + 0.2
    assert entry.metrics["eval/chosen_mean"] > entry.metrics["eval/rejected_mean"]
    # Generalises to the true objective: fresh pairs from the gold task, scored from the saved folder.
    agreement = gold_agreement(entry.path)
    print(f"rm eval/accuracy {entry.metrics['eval/accuracy']:.4f}, fresh gold pairs {agreement:.4f}")
    assert agreement >= 0.88
    stats = RewardStats.load(Path(entry.path))
    assert stats.pairs == entry.metrics["eval/pairs"] and stats.std > 0
    model = AutoModelForSequenceClassification.from_pretrained(entry.path)
    tokenizer = AutoTokenizer.from_pretrained(entry.path)
    assert model.config.num_labels == 1
    assert tokenizer.pad_token_id == model.config.pad_token_id != tokenizer.eos_token_id
    # Padding does not move the score: it is read at the last real token.
    ids = tokenizer("Describe the red fox.\nthe fox is kind.<|eos|>")["input_ids"]
    alone = score_ids(model, [ids], pad_token_id=tokenizer.pad_token_id)
    padded = score_ids(model, [ids, ids + ids], pad_token_id=tokenizer.pad_token_id)
    assert torch.allclose(alone, padded[:1], atol=1e-5)
    again = run(rm, tiny, ["sft.epochs=1"])
    assert again.id == entry.id  # up to date: not retrained


def test_missing_sft_parent_names_make_sft(tmp_path):
    with pytest.raises(StageError, match=r"run `make sft` first"):
        run(rm, small(tmp_path, init="sft"))
    assert not registry().entries(stage="rm")


def test_explicit_parent_that_is_not_complete_is_refused(tmp_path):
    reg = registry()
    running = reg.create(stage="sft", pipeline="rmsmall", parents=[], config={}, config_hash="x",
                         data_fingerprint="y")
    with pytest.raises(StageError, match=r"is running, not complete"):
        run(rm, small(tmp_path, init="sft"), [f"rm.parent={running.id}"])


def test_different_tokenizer_encoder_backbone(tmp_path):
    entry = run(rm, small(tmp_path, init="tiny-encoder", steps=60, lr=2e-3))
    init = registry().get(entry.parents[0])
    assert init.stage == "base" and init.config["model"] == "tiny-encoder"
    assert entry.info["init"] == "tiny-encoder"
    model = AutoModelForSequenceClassification.from_pretrained(entry.path)
    assert model.config.model_type == "bert"
    tokenizer = AutoTokenizer.from_pretrained(entry.path)
    assert tokenizer.eos_token is None and tokenizer.cls_token == "[CLS]"
    # 0.515 -> 0.67 measured (2026-11-29): a real margin, not just "moved"
    assert entry.metrics["eval/accuracy"] > entry.metrics["eval/init_accuracy"] + 0.08


def test_lora_reward_model(tmp_path):
    entry = run(rm, small(tmp_path, mode="lora", steps=40, lr=1e-2))
    assert (Path(entry.path) / "adapter" / "adapter_config.json").is_file()
    assert entry.metrics["train/trainable_parameters"] < 60_000
    assert entry.metrics["eval/loss"] < entry.info["before"]["eval_loss"]
    merged = AutoModelForSequenceClassification.from_pretrained(entry.path)  # loads without peft
    parent = registry().get(entry.parents[0])
    adapted = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(parent.path, num_labels=1),
                                        Path(entry.path) / "adapter")
    ids = AutoTokenizer.from_pretrained(entry.path)("Describe the red fox.\nthe fox is kind.", return_tensors="pt")
    with torch.no_grad():  # the merged model scores as the parent with the saved adapter does
        assert torch.allclose(merged(**ids).logits, adapted(**ids).logits, atol=1e-4)


def test_conversational_comparisons_train_end_to_end(tmp_path):
    """Explicit-prompt pairs as message lists: rendered with the chat template, and still learned."""
    rows = [json.loads(line) for line in (REPO / "data/tiny/comparisons.jsonl").read_text().splitlines()[:600]]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": r["prompt"].strip()}],
        "chosen": [{"role": "assistant", "content": r["chosen"]}],
        "rejected": [{"role": "assistant", "content": r["rejected"]}]}) + "\n" for r in rows))
    entry = run(rm, small(tmp_path, name="chat", dataset=str(data), steps=60, lr=5e-3))
    assert entry.metrics["eval/loss"] < entry.info["before"]["eval_loss"]
    assert entry.metrics["eval/accuracy"] > entry.metrics["eval/init_accuracy"] + 0.15  # 0.52 -> 0.80 measured


@pytest.mark.skipif(not HH_RLHF.is_file(), reason="the HH-RLHF sample in ../shared/data is not on this machine")
def test_trains_on_real_hh_rlhf_pairs(tmp_path, capsys):
    entry = run(rm, small(tmp_path, name="hh", dataset=str(HH_RLHF), steps=15, samples=300, max_length=96, lr=1e-3))
    out = capsys.readouterr().out
    assert "skipped 4 pairs" in out  # HH-RLHF ships 4 pairs whose chosen answer is empty
    assert "truncated" in out and entry.metrics["train/truncated_pairs"] > 0  # long dialogues are cut, with a count
    assert entry.metrics["train/pairs"] == 300
    # Learned from real-format pairs in 15 steps: held-out loss below its start (0.6934 -> 0.6832 measured on
    # 2026-11-30, with the score head seeded) and accuracy up (0.48 -> 0.60); pairs read the wrong way round would
    # push both the other way.
    assert entry.metrics["eval/loss"] < entry.info["before"]["eval_loss"]
    assert entry.metrics["eval/accuracy"] > entry.metrics["eval/init_accuracy"] + 0.05
    assert (Path(entry.path) / "reward_stats.json").is_file()
    AutoModelForSequenceClassification.from_pretrained(entry.path)


@pytest.mark.parametrize("row, expected", [
    ({"prompt": "Describe the cat.\n", "chosen": "the cat is kind.", "rejected": "the cat is kind."},
     r"identical"),
    ({"prompt": "Describe the cat.\n", "chosen": "the cat is kind."}, r"missing field 'rejected'"),
    ({"prompt": "Describe the cat.\n", "chosen": 3, "rejected": "x"}, r"field 'chosen' must be a string"),
    ({"chosen": "alpha beta", "rejected": "gamma delta"}, r"share no common prefix"),
])
def test_bad_comparisons_fail_cleanly(tmp_path, capsys, row, expected):
    from rlhf.cli import main

    data = tmp_path / "pairs.jsonl"
    good = {"prompt": "Describe the dog.\n", "chosen": "the dog is kind.", "rejected": "the dog is rude."}
    if "prompt" not in row:  # one format per data set: an implicit-prompt pair first
        good = {"chosen": "Describe the dog.\nthe dog is kind.", "rejected": "Describe the dog.\nthe dog is rude."}
    data.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    file = small(tmp_path, dataset=str(data)).read_text().replace("skip_invalid_pairs: true", "")
    (tmp_path / "strict.yaml").write_text(file)
    assert main(["rm", "--pipeline", str(tmp_path / "strict.yaml")]) == 2
    err = capsys.readouterr().err
    assert "pairs.jsonl line 2" in err and re.search(expected, err), err
    assert not registry().entries(stage="rm", status="complete")


def test_a_weak_reward_model_warns_with_what_to_try_and_a_good_one_does_not(tmp_path, capsys):
    # The same alarm settings for both. The bar is 0.6 here, not the default 0.7 (meant for a finished reward
    # model): 100 steps of the small model reach about 0.7, from about 0.5 before training.
    alarms = ["rm.use_margin=false", "rm.batch_size=32", "rm.warn_accuracy=0.6"]
    good = run(rm, small(tmp_path, name="good", steps=100, lr=5e-3, samples=3000, save_steps=20), alarms)
    out = capsys.readouterr().out
    assert good.metrics["eval/verdict"] == "ok" and good.info["verdict"]["status"] == "ok", good.metrics
    assert f"rm: held-out accuracy {good.metrics['eval/accuracy']:.3f} (" in out and "rm: warning" not in out
    # One step at a learning rate of 1e-7 leaves the model where it started: no gain, accuracy at chance.
    weak = run(rm, small(tmp_path, name="weak", steps=1, lr=1e-7, save_steps=20), alarms)
    out = capsys.readouterr().out
    assert abs(weak.metrics["eval/accuracy"] - weak.metrics["eval/init_accuracy"]) < 0.01
    assert weak.metrics["eval/verdict"] == "weak" and weak.info["verdict"]["status"] == "weak"
    assert any("rm.warn_gain 0.05" in problem for problem in weak.info["verdict"]["problems"])
    assert "rm: warning: held-out accuracy" in out and "less than rm.warn_gain 0.05" in out, out
    assert "rm: what to try:" in out and "check the labels" in out and weak.info["verdict"]["advice"]


@pytest.fixture(scope="module")
def ranking_rm(tmp_path_factory) -> Path:
    """The folder of a small reward model that ranks the tiny task's pairs well above chance (60 steps, ~2 s), in a
    registry of its own: tests start from it by folder (`rm.init`)."""
    home = tmp_path_factory.mktemp("ranking")
    pipeline, path = load_pipeline(small(home, name="ranking", steps=60, lr=5e-3, save_steps=60),
                                   ["rm.use_margin=false"])
    return Path(rm.run(pipeline, registry=Registry(home / "runs"), where=str(path)).path)


def falling_run(tmp_path: Path, ranking_rm: Path) -> tuple[Path, list[str], Path]:
    """A run whose held-out accuracy falls: from a model that ranks well, trained at a constant learning rate on
    pairs with chosen and rejected swapped, evaluated every 2 steps on 192 correctly labelled pairs (12 eval
    batches of 16, so TRL's batch-mean accuracy is the pairs' accuracy). Returns the pipeline file, its overrides
    and the held-out file."""
    rows = [json.loads(line) for line in (REPO / "data/tiny/comparisons.jsonl").read_text().splitlines()]
    swapped, held_out = tmp_path / "swapped.jsonl", tmp_path / "held_out.jsonl"
    swapped.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n"
                               for r in rows[:600]))
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows[-192:]))
    file = small(tmp_path, name="falls", dataset=str(swapped), init=str(ranking_rm), steps=30, lr=3e-3, save_steps=2)
    return file, ["rm.use_margin=false", "rm.lr_scheduler=constant", f"rm.eval_dataset={held_out}"], held_out


def assert_kept_the_best(entry, held_out: Path) -> None:
    """The entry's figures are those of its best evaluation during training, which is not the last, and its folder
    holds those weights."""
    metrics = entry.metrics
    curve = {row["step"]: row["eval/accuracy"] for row in history.read(entry.path)
             if "eval/accuracy" in row and 0 < row["step"] < metrics["train/global_step"]}
    assert metrics["eval/kept_step"] in curve and metrics["eval/kept_step"] < metrics["train/global_step"] == 30
    assert metrics["eval/accuracy"] == pytest.approx(max(curve.values()))
    assert metrics["eval/accuracy"] == pytest.approx(curve[metrics["eval/kept_step"]])
    assert metrics["eval/accuracy"] > metrics["eval/last_accuracy"], metrics
    assert folder_accuracy(entry.path, held_out) == pytest.approx(metrics["eval/accuracy"], abs=1e-6)


def test_keeps_the_checkpoint_with_the_best_held_out_accuracy(tmp_path, capsys, ranking_rm):
    file, overrides, held_out = falling_run(tmp_path, ranking_rm)
    entry = run(rm, file, overrides)
    assert_kept_the_best(entry, held_out)
    kept = entry.metrics["eval/kept_step"]
    assert f"peaked at {entry.metrics['eval/accuracy']:.3f} at step {kept} of 30" in capsys.readouterr().out
    # Kept by the last instead, the same run ends with the last weights.
    last = run(rm, file, [*overrides, "rm.best_metric=last"])
    assert last.metrics["eval/kept_step"] == 30
    assert last.metrics["eval/accuracy"] == pytest.approx(entry.metrics["eval/last_accuracy"], abs=1e-6)


def test_a_resumed_attempt_keeps_the_best_checkpoint_of_an_earlier_attempt(tmp_path, monkeypatch, capsys, ranking_rm):
    file, overrides, held_out = falling_run(tmp_path, ranking_rm)

    def interrupt(self, args, state, control, **kwargs):
        if state.global_step == 20:  # after the checkpoint of step 20 is written
            raise RuntimeError("interrupted at step 20")

    with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="interrupted"):
        patch.setattr(rm_keep.EvalCurve, "on_save", interrupt, raising=False)
        run(rm, file, overrides)
    [failed] = registry().entries(stage="rm", pipeline="falls")
    assert (Path(failed.path) / "checkpoints" / "checkpoint-20").is_dir()
    capsys.readouterr()
    entry = run(rm, file, overrides)  # the same command resumes from checkpoint-20
    assert entry.id == failed.id and entry.status == "complete"
    assert "rm: continuing from checkpoint-20" in capsys.readouterr().out
    assert [a["outcome"].split(":")[0] for a in entry.info["attempt_log"]] == ["failed", "complete"]
    assert entry.metrics["eval/kept_step"] <= 20  # evaluated by the first attempt, kept by the second
    assert_kept_the_best(entry, held_out)
