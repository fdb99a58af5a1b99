"""The GPU benchmark pipeline on the CPU: real model shapes from `tiny.shape`, fixed-length responses
(`min_new_tokens`), the trainers' tokens/s (PerfCallback), and `make gpu-check DEVICE=cpu` end to end.

    .venv/bin/python -m pytest -q tests/test_gpu_bench.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaForCausalLM, Qwen2ForCausalLM

from rlhf.core.sampling import sample, sampling_config
from rlhf.errors import ConfigError
from rlhf.pipeline.config import TinyModelSpec, load_pipeline
from rlhf.training.tiny import build_model, build_tokenizer

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "pipelines" / "gpu-bench.yaml"
TEXTS = [f"At dawn a red fox crossed the river near mill {i}." for i in range(200)]
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS, vocab_size=512)


# ---- the pipeline file and tiny.shape -------------------------------------------------------------------------


def test_the_bench_pipeline_has_qwen_05b_shape_and_fixed_length_responses():
    pipeline, _ = load_pipeline(BENCH)
    spec = pipeline.tiny.resolved()
    assert (spec.architecture, spec.num_hidden_layers, spec.hidden_size, spec.num_attention_heads,
            spec.num_key_value_heads, spec.intermediate_size, spec.model_vocab_size, spec.tie_word_embeddings,
            spec.rope_theta) == ("qwen2", 24, 896, 14, 2, 4864, 151936, True, 1.0e6)
    assert pipeline.ppo.min_new_tokens == pipeline.ppo.max_new_tokens == 53
    assert (pipeline.ppo.max_prompt_length, pipeline.ppo.rollout_batch_size) == (512, 64)


def test_another_shape_is_one_override_away():
    pipeline, _ = load_pipeline(BENCH, ["tiny.shape=qwen2.5-7b"])
    spec = pipeline.tiny.resolved()
    assert (spec.num_hidden_layers, spec.hidden_size, spec.model_vocab_size, spec.tie_word_embeddings) == (
        28, 3584, 152064, False)


def test_a_shape_and_a_size_field_together_are_an_error():
    with pytest.raises(ConfigError, match="sets .*hidden_size"):
        load_pipeline(BENCH, ["tiny.hidden_size=128"])


def test_min_new_tokens_above_max_new_tokens_is_an_error():
    with pytest.raises(ConfigError, match="min_new_tokens"):
        load_pipeline(BENCH, ["ppo.min_new_tokens=54"])


@pytest.mark.parametrize(("shape", "parameters"), [
    # the parameter counts Qwen publishes for Qwen2.5-0.5B, -1.5B and -7B
    ("qwen2.5-0.5b", 494_032_768), ("qwen2.5-1.5b", 1_543_714_304), ("qwen2.5-7b", 7_615_616_512),
])
def test_shapes_build_the_real_models_parameter_counts(tokenizer, shape, parameters):
    with torch.device("meta"):  # shapes only, no memory
        model = build_model(TinyModelSpec(shape=shape), tokenizer, seed=0)
    assert isinstance(model, Qwen2ForCausalLM)
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v biases
    assert model.config.rope_parameters["rope_theta"] == 1.0e6
    assert model.config.vocab_size > len(tokenizer)  # rows no text uses, as Qwen's own vocabulary has


def test_the_default_tiny_model_is_built_as_before(tokenizer):
    model = build_model(TinyModelSpec(), tokenizer, seed=0)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.rope_parameters["rope_theta"] == 10000.0
    assert model.config.tie_word_embeddings and model.model.layers[0].self_attn.q_proj.bias is None


def test_a_small_qwen2_model_with_a_padded_vocabulary_runs(tokenizer):
    spec = TinyModelSpec(architecture="qwen2", model_vocab_size=2048, rope_theta=1e6, **SMALL)
    model = build_model(spec, tokenizer, seed=0)
    ids = tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    assert model(**ids).logits.shape[-1] == 2048


# ---- min_new_tokens -------------------------------------------------------------------------------------------


def test_a_response_is_never_shorter_than_min_new_tokens(tokenizer):
    """EOS made far likelier than any other id: without min_new_tokens every response is EOS alone; with it, EOS
    comes right after min_new_tokens other tokens, and never when min_new_tokens = max_new_tokens."""
    model = build_model(TinyModelSpec(**SMALL), tokenizer, seed=0)
    eos = tokenizer.eos_token_id

    def favour_eos(module, inputs, logits):
        logits[..., eos] += 50.0
        return logits

    model.lm_head.register_forward_hook(favour_eos)
    queries = torch.tensor([[tokenizer.pad_token_id, 5, 6]] * 8)
    mask = (queries != tokenizer.pad_token_id).long()
    lengths = {}
    for least in (0, 5, 12):
        config = sampling_config(max_new_tokens=12, min_new_tokens=least, temperature=1.0,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
        out = sample(model, queries, mask, config=config, micro_batch_size=8)
        lengths[least] = out.response_mask.sum(dim=1).tolist()
        assert not (out.responses[:, :least] == eos).any()
    # response_mask counts the EOS too: 5 tokens then EOS is 6
    assert lengths == {0: [1] * 8, 5: [6] * 8, 12: [12] * 8}


# ---- PerfCallback ---------------------------------------------------------------------------------------------


def test_perf_callback_tokens_per_second_by_hand(monkeypatch):
    from rlhf.stages import trl_common

    now = iter([10.0, 11.0, 13.0, 14.0, 15.0, 16.0])
    monkeypatch.setattr(trl_common.time, "perf_counter", lambda: next(now))
    args = SimpleNamespace(device=torch.device("cpu"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                           world_size=1)
    state = SimpleNamespace(global_step=0, num_input_tokens_seen=0)
    perf = trl_common.PerfCallback(sequences_per_example=1)
    perf.on_train_begin(args, state, None, model=None)  # clock 10
    for tokens in (100, 500):  # step 1 ends at 11 with 100 tokens, step 2 at 13 with 400 more
        state.global_step, state.num_input_tokens_seen = state.global_step + 1, tokens
        perf.on_step_end(args, state, None)
    logs = {"loss": 1.0}
    perf.on_log(args, state, None, logs=logs)  # the window: 500 tokens in 3 s; the clock restarts at 14
    assert logs["perf/tokens_per_s"] == pytest.approx(500 / 3)
    state.global_step, state.num_input_tokens_seen = 3, 800  # step 3 ends at 15 with 300 more
    perf.on_step_end(args, state, None)
    final = {"train_loss": 1.0}
    perf.on_log(args, state, None, logs=final)
    # from the second step on (the first pays for warm-up): 400 + 300 tokens in 2 + 1 s; no MFU on a CPU
    assert final == {"train_loss": 1.0, "train/tokens_per_s": pytest.approx(700 / 3)}
    assert perf.run_figures() == {"train/tokens_per_s": pytest.approx(700 / 3)}


# ---- the GPU check in its CPU form ----------------------------------------------------------------------------


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    out = tmp_path / "check"
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last == str(out / "summary.json")
    summary = json.loads(Path(last).read_text(encoding="utf-8"))
    assert summary["device"] == "cpu"
    assert summary["sft"]["tokens_per_s"] > 0 and summary["rm"]["tokens_per_s"] > 0
    assert summary["ppo"]["step_seconds"] > 0 and summary["ppo"]["steps_timed"] >= 1
    assert {"tests", "data", "sft", "rm", "ppo"} <= set(summary["steps"])
    assert "| SFT |" in (out / "summary.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_gpu_profile_runs_on_the_cpu_and_skips_what_the_budget_cannot_hold(tmp_path):
    """scripts/gpu_profile.py at one layer of the 0.5B shape: every cheap probe reports, torch.compile (which
    needs 90 s of budget) is skipped and says so, and profile.json holds the figures."""
    done = subprocess.run([sys.executable, "scripts/gpu_profile.py", "--device", "cpu", "--out", str(tmp_path),
                           "--layers", "1", "--batch", "1", "--length", "16", "--repeat", "1", "--gen-batch", "1",
                           "--prompt-length", "8", "--new-tokens", "2", "--matmul", "64", "--budget-s", "80"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ,
                                                                                      "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "profile.json").read_text(encoding="utf-8"))
    assert result["launch"]["launch_us"] > 0 and result["matmul"]["tflops"] > 0
    assert all(row["step_s"] > 0 and row["tokens_per_s"] > 0 for row in result["train"]), result["train"]
    assert result["compiled"] == [{"variant": "fp32 + autocast, torch.compile", "skipped": "budget"}]
    assert [row["variant"] for row in result["generate"]] == ["dynamic cache", "static cache"]
    assert all(row["seconds"] > 0 for row in result["generate"])
    assert "| train step variant |" in done.stdout
