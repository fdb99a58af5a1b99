"""SFT end to end on the tiny model: something is learned, the checkpoint loads back, the registry
records lineage, reruns are skipped, a full disk fails cleanly and resumes, and a seed repeats itself
(killed runs: tests/test_chaos.py)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.pipeline.config import load_pipeline
from rlhf.pipeline.registry import Registry, hash_config
from rlhf.pipeline.stage_config import stage_config
from rlhf.stages import sft

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

SMALL = """
name: {name}
model: tiny
seed: 3
tiny: {{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 3, num_attention_heads: 2,
        num_key_value_heads: 2}}
sft:
  dataset: {dataset}
  mode: {mode}
  top_n_layers: 1
  lora: {{r: 8, alpha: 16}}
  max_steps: {steps}
  learning_rate: {lr}
  batch_size: 16
  max_length: 48
  logging_steps: 5
  save_steps: {save_steps}
"""


def small_pipeline(tmp_path: Path, *, name="small", mode="full", steps=30, lr=3e-3, save_steps=50,
                   dataset=str(REPO / "data/tiny/sft.jsonl")) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(SMALL.format(name=name, mode=mode, steps=steps, lr=lr, save_steps=save_steps,
                                 dataset=dataset), encoding="utf-8")
    return path


def run_sft(file: Path, overrides=(), force=False):
    pipeline, path = load_pipeline(file, list(overrides))
    registry = Registry(os.environ["RLHF_HOME"])
    return sft.run(pipeline, registry=registry, where=str(path), force=force), registry


def weights(folder: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def test_tiny_pipeline_sft_learns_and_registers_lineage():
    entry, registry = run_sft(REPO / "pipelines" / "tiny.yaml")
    assert entry.status == "complete" and entry.stage == "sft" and entry.pipeline == "tiny"
    # Learned: the held-out loss of the default pipeline falls well below the untrained base model's.
    assert entry.metrics["eval/loss"] < 0.6 * entry.metrics["eval/base_loss"]
    base = registry.get(entry.parents[0])
    assert base.stage == "base" and base.status == "complete" and base.parents == []
    # The checkpoint is a plain Hugging Face folder, without trainer checkpoints left behind.
    tokenizer = AutoTokenizer.from_pretrained(entry.path)
    model = AutoModelForCausalLM.from_pretrained(entry.path)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert not (Path(entry.path) / "checkpoints").exists()
    assert not [p for p in Path(entry.path).rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]  # no pickle
    changed = [k for k, v in weights(entry.path).items() if not torch.equal(v, weights(base.path)[k])]
    assert len(changed) == len(weights(base.path))
    # The trained model prefers a real demonstration over a shuffled version of it.
    ids = tokenizer("Describe the red fox.\nthe fox is kind and calm.<|eos|>", return_tensors="pt").input_ids
    shuffled = tokenizer("Describe the red fox.\ncalm fox kind the and is.<|eos|>", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(ids, labels=ids).loss < model(shuffled, labels=shuffled).loss


def test_rerun_is_up_to_date_and_force_retrains(tmp_path, capsys):
    file = small_pipeline(tmp_path, steps=5)
    first, registry = run_sft(file)
    again, _ = run_sft(file)
    assert again.id == first.id
    assert "up to date" in capsys.readouterr().out
    assert len(registry.entries(stage="sft")) == 1
    forced, _ = run_sft(file, force=True)
    assert forced.id != first.id and forced.status == "complete"
    changed, _ = run_sft(file, overrides=["sft.learning_rate=1e-3"])  # a new config is not up to date
    assert changed.id not in (first.id, forced.id)
    assert changed.config_hash != first.config_hash
    assert changed.parents == first.parents  # same base model


def test_lora_saves_adapter_and_merged_model(tmp_path):
    entry, registry = run_sft(small_pipeline(tmp_path, mode="lora", steps=30, lr=1e-2))
    folder = Path(entry.path)
    assert (folder / "adapter" / "adapter_config.json").is_file()
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    assert entry.metrics["train/trainable_parameters"] < 0.5 * sum(v.numel() for v in weights(entry.path).values())
    assert entry.metrics["eval/loss"] < entry.metrics["eval/base_loss"]
    merged = AutoModelForCausalLM.from_pretrained(entry.path)  # the merged weights, no peft needed
    base = weights(registry.get(entry.parents[0]).path)
    assert any(not torch.equal(p.detach(), base[n]) for n, p in merged.state_dict().items() if n in base)
    # The merged model computes what the base model with the saved adapter computes.
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(registry.get(entry.parents[0]).path),
                                        folder / "adapter")
    ids = AutoTokenizer.from_pretrained(entry.path)("Describe the red fox.\nthe fox is kind.", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged(**ids).logits, adapted(**ids).logits, atol=1e-4)


def test_top_n_trains_only_the_top_layers(tmp_path):
    entry, registry = run_sft(small_pipeline(tmp_path, mode="top_n", steps=20))
    after, before = weights(entry.path), weights(registry.get(entry.parents[0]).path)
    same = {k for k in before if torch.equal(before[k], after[k])}
    assert all(k in same for k in before if "layers.0." in k or "layers.1." in k or "embed" in k)
    assert not any(k in same for k in before if "layers.2." in k)  # top_n_layers: 1 of 3
    assert entry.metrics["eval/loss"] < entry.metrics["eval/base_loss"]


def test_conversational_messages_data(tmp_path):
    rows = [json.loads(line) for line in (REPO / "data/tiny/sft.jsonl").read_text().splitlines()[:400]]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": r["prompt"].strip()},
        {"role": "assistant", "content": r["completion"]}]}) + "\n" for r in rows))
    entry, _ = run_sft(small_pipeline(tmp_path, dataset=str(data), steps=50))
    assert entry.metrics["eval/loss"] < 0.75 * entry.metrics["eval/base_loss"]
    tokenizer = AutoTokenizer.from_pretrained(entry.path)
    assert "<|assistant|>" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                            tokenize=False, add_generation_prompt=True)


def test_a_full_disk_while_saving_fails_cleanly_and_a_rerun_resumes(tmp_path, monkeypatch, capsys):
    """The final save hits ENOSPC: exit 2 with one line, the entry marked failed with the reason, earlier
    checkpoints and entries untouched; once there is space, the same command resumes and completes."""
    from rlhf.cli import main

    file = small_pipeline(tmp_path, name="full", steps=20, save_steps=10)

    def full_disk(trainer, folder):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))

    monkeypatch.setattr(sft, "save_final", full_disk)
    assert main(["sft", "--pipeline", str(file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "marked failed" in err[0]
    registry = Registry(os.environ["RLHF_HOME"])
    [failed] = registry.entries(stage="sft")
    assert failed.status == "failed" and "No space left on device" in failed.error
    assert registry.get(failed.parents[0]).status == "complete"  # the base entry is untouched
    assert (Path(failed.path) / "checkpoints" / "checkpoint-20" / "trainer_state.json").is_file()

    monkeypatch.undo()
    monkeypatch.setenv("RLHF_HOME", str(registry.root))
    assert main(["sft", "--pipeline", str(file)]) == 0
    assert f"resuming {failed.id}" in capsys.readouterr().out
    [done] = registry.entries(stage="sft")
    assert done.id == failed.id and done.status == "complete"
    assert [i["outcome"].split(":")[0] for i in done.info["attempt_log"]] == ["failed", "complete"]


def test_same_seed_same_metrics(tmp_path):
    """On the CPU a stage run twice with the same seed learns exactly the same: same metrics, same weights."""
    file = small_pipeline(tmp_path, name="twice", steps=10)
    first, _ = run_sft(file)
    second, _ = run_sft(file, force=True)
    assert second.id != first.id
    timing = ("train/runtime", "train/tokens_per_s", "train/mfu", "train/peak_memory_mb")
    assert {k: v for k, v in first.metrics.items() if k not in timing} == \
        {k: v for k, v in second.metrics.items() if k not in timing}
    assert all(torch.equal(v, weights(second.path)[k]) for k, v in weights(first.path).items())


def test_a_refusal_on_the_main_process_stops_every_process(tmp_path):
    """Two processes (accelerate, gloo on the CPU): the main one refuses to start because a live process
    already runs this stage; the other must stop with it instead of waiting forever for its decision."""
    file = small_pipeline(tmp_path, name="twoproc", steps=5)
    pipeline, _ = load_pipeline(file)
    config = stage_config(pipeline, stage="sft")
    registry = Registry(os.environ["RLHF_HOME"])
    busy = registry.create(stage="sft", pipeline="twoproc", parents=[], config=config,
                           config_hash=hash_config(config), data_fingerprint="x")
    registry.update(busy.id, pid=1)  # pid 1 always exists: a live owner
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate/cpu2.yaml"),
               "-m", "rlhf.cli", "sft", "--pipeline", str(file)]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode != 0
    assert "is already running this stage" in done.stderr
    assert "the main process stopped: " in done.stderr  # the second process was told, not left waiting


def test_the_pipeline_precision_wins_over_the_accelerate_config(tmp_path, monkeypatch):
    """`accelerate launch` exports the config file's mixed_precision (bf16 in the shipped files), which the
    trainer would use whenever bf16 and fp16 are off: a pipeline asking for fp32 must train in fp32."""
    from types import SimpleNamespace

    from trl import SFTConfig

    from rlhf.stages.trl_common import training_args

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    pipeline, _ = load_pipeline(REPO / "pipelines" / "tiny.yaml", ["sft.precision=fp32"])
    attempt = SimpleNamespace(checkpoints=tmp_path, entry=SimpleNamespace(id="sft-test"))
    args = SFTConfig(**training_args(pipeline, pipeline.sft, attempt, stage="sft"))
    assert not args.bf16 and args.mixed_precision == "no"


def test_compile_trains_and_saves_plain_weight_names(tmp_path):
    """sft.compile: the trainer compiles the model; it still learns, and the saved names carry no compile prefix."""
    entry, registry = run_sft(small_pipeline(tmp_path, name="compiled", steps=10), ["sft.compile=true"])
    assert entry.status == "complete" and entry.metrics["eval/loss"] < entry.metrics["eval/base_loss"]
    saved = weights(entry.path)
    assert not [name for name in saved if "_orig_mod" in name]
    assert saved.keys() == weights(registry.get(entry.parents[0]).path).keys()
