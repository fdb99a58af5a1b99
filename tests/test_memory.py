"""The peak-memory estimator (rlhf/pipeline/memory.py): each term against numbers worked out by hand, the stage
sums, the cheapest change when a stage does not fit, what is needed when a model's shape cannot be found, and one
real measurement (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_model_shape import QWEN, QWEN_CONFIG, TINY  # Qwen2.5-0.5B's config.json and shape; the tiny model's

from rlhf.pipeline import memory
from rlhf.pipeline.config import TinyEncoderSpec, TinyModelSpec, load_pipeline
from rlhf.pipeline.model_shape import ShapeNotFound, Shapes, encoder_shape, tiny_shape

REPO = Path(__file__).resolve().parent.parent
MiB, GiB = 2**20, 2**30


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # pipeline files name accelerate configs relative to the repository


def pipeline(file: str = "pipelines/tiny.yaml", *overrides: str):
    return load_pipeline(REPO / file, list(overrides))[0]


# --- parameter counts ----------------------------------------------------------------------------------------------

def test_lora_and_top_n_trainable_parameters():
    # LoRA r 16 on q, k, v, o, gate, up, down of a tiny block: r x ((64+64) + 2 (64+64) + (64+64) + 2 (64+256) +
    # (256+64)) = 16 x 1,472 = 23,552, x 4 blocks = 94,208.
    assert memory.lora_parameters(TINY, rank=16) == 94_208
    assert memory.trainable_parameters(TINY, head="lm", mode="lora", top_n=2, rank=16) == 94_208
    assert memory.trainable_parameters(TINY, head="score", mode="lora", top_n=2, rank=16) == 94_208 + 64
    # top 2 blocks 2 x 65,664 + final norm 64; the tied head stays frozen; a score head trains
    assert memory.trainable_parameters(TINY, head="lm", mode="top_n", top_n=2, rank=16) == 131_392
    assert memory.trainable_parameters(TINY, head="score", mode="top_n", top_n=2, rank=16) == 131_392 + 64


# --- the terms -----------------------------------------------------------------------------------------------------

def test_block_activations_fp32_and_bf16():
    # fp32, per token: 4 x (8 x 64 + 2 x 64 + 4 x 256) = 6,656 bytes + log-sum-exp 4 x 4 heads = 6,672; 512 tokens.
    assert memory.block_activations(TINY, 512, mixed=False) == 512 * 6_672
    # bf16 autocast: 28 x 64 + 4 x 64 + 8 x 256 = 4,096 bytes + 16.
    assert memory.block_activations(TINY, 512, mixed=True) == 512 * 4_112


def test_grouped_query_attention_saves_repeated_keys_in_a_padded_batch():
    # Qwen: kv_dim 128 but 14 query heads of 64 = 896. Unpadded: 4 x (8 x 896 + 2 x 128 + 4 x 4,864) + 4 x 14.
    assert memory.block_activations(QWEN, 1, mixed=False, padded=False) == 4 * (7_168 + 256 + 19_456) + 56
    # padded: k and v repeated to the 14 heads, 896 wide each
    assert memory.block_activations(QWEN, 1, mixed=False, padded=True) == 4 * (7_168 + 1_792 + 19_456) + 56


def test_lora_freezes_the_norms_whose_inputs_autograd_then_drops():
    # the two RMSNorms' normalised outputs (2 x 64 fp32 per token) are kept only for their (frozen) weights
    full = memory.block_activations(TINY, 512, mixed=False)
    assert full - memory.block_activations(TINY, 512, mixed=False, frozen_norms=True) == 512 * 2 * 64 * 4


def test_encoder_terms():
    bert = encoder_shape(TinyEncoderSpec())  # H 64, I 256, 4 heads
    # per token: 4 x (9 x 64 + 2 x 256) = 4,352 bytes + log-sum-exp 16 (measured on BERT: within 3%)
    assert memory.block_activations(bert, 1, mixed=False) == 4_368
    assert memory.final_norm_activations(bert, 10, mixed=False) == 10 * 64 * 4  # the embeddings' LayerNorm input
    assert memory.block_backward_temporaries(bert, 10, mixed=False) == 10 * 256 * 4  # one (tokens, I) tensor


def test_checkpointing_keeps_block_inputs_only():
    # 4 blocks x 512 tokens x 64 x 4 bytes
    assert memory.checkpointed_activations(TINY, 512, layers=4) == 524_288


def test_attention_masks_and_final_norm():
    # 4 blocks x 8 rows x 64 x 64 x 4 bytes (fp32) or 2 (bf16)
    assert memory.attention_masks(8, 64, layers=4, mixed=False) == 524_288
    assert memory.attention_masks(8, 64, layers=4, mixed=True) == 262_144
    # the last block's output, the normalised hidden (fp32) and the head's input: 512 tokens x 64 x (4 + 4 + 4)
    assert memory.final_norm_activations(TINY, 512, mixed=False) == 512 * 64 * 12


def test_fused_head_buffers():
    # 504 scored tokens (8 rows x 63): a 504 x 32,768 fp32 buffer = 66,060,288; on the CPU seven 504 x 1,024 fp32
    # temporaries = 14,450,688.
    assert memory.fused_head(TINY, 504, mixed=False, device="cpu") == 66_060_288 + 14_450_688
    # on a GPU (Triton) the buffer alone, bf16; tokens past 4,096 reuse it
    assert memory.fused_head(TINY, 504, mixed=True, device="cuda") == 504 * 32_768 * 2
    assert memory.fused_head(QWEN, 10_000, mixed=True, device="cuda") == 4_096 * 32_768 * 2


def test_kv_cache_and_logits():
    # Qwen, 64 prompts of 512 + 53 tokens: (24 + 1) blocks x 64 x 565 x 128 x (4 + 2) bytes (bf16: fp32 keys)
    assert memory.kv_cache(QWEN, 64, 565, key_bytes=4, value_bytes=2) == 25 * 64 * 565 * 128 * 6
    # 8 responses of 53 tokens over 151,936 ids, fp32: 424 x 607,744 bytes, a quarter of a GiB each copy
    assert memory.logits(8, 53, 151_936) == 257_683_456


def test_autocast_weight_copies():
    # bf16 copies of a tiny block's linears (65,664 - 128 norm weights) x 4 blocks, and of the 1,024 x 64 head
    assert memory.autocast_weight_copies(TINY, layers=4, lm_head=False) == 2 * 4 * 65_536
    assert memory.autocast_weight_copies(TINY, layers=4, lm_head=True) == 2 * (4 * 65_536 + 65_536)


def test_strategies_shard_what_they_should():
    p, t = 1_000_000, 1_000_000
    held = {s: memory.trained_model(p, t, strategy=s, processes=4, mixed=True, block=100, unsharded_root=10)
            for s in ("single", "ddp", "zero2", "zero3", "fsdp2")}
    # single: fp32 weights 4p, gradients 4t, AdamW 8t; DDP adds its buckets, a copy of the gradients
    assert (held["single"].weights, held["single"].gradients, held["single"].optimiser) == (4 * p, 4 * t, 8 * t)
    assert held["single"].buffers == 0 and held["ddp"].buffers == 4 * t
    # ZeRO-2: bf16 weights whole; bf16 gradients, the fp32 master and AdamW (4 + 8 bytes) over 4 GPUs
    assert (held["zero2"].weights, held["zero2"].gradients, held["zero2"].optimiser) == (2 * p, t // 2, 3 * t)
    # ZeRO-3: the weights sharded too, two blocks and the root gathered (bf16)
    assert (held["zero3"].weights, held["zero3"].gathered) == (p // 2, 2 * (2 * 100 + 10))
    # FSDP2: fp32 shards, gradients and AdamW over 4
    assert (held["fsdp2"].weights, held["fsdp2"].gradients, held["fsdp2"].optimiser) == (p, t, 2 * t)


def test_optimiser_step_scratch():
    assert memory.optimiser_step_temporaries(TINY, 1000, implementation="fused") == 0
    assert memory.optimiser_step_temporaries(TINY, 1000, implementation="foreach") == 4000
    # single-tensor: three fp32 copies of the largest tensor (the 1,024 x 64 embedding)
    assert memory.optimiser_step_temporaries(TINY, 10**6, implementation="single") == 3 * 4 * 65_536


# --- the stages ----------------------------------------------------------------------------------------------------

def test_sft_estimate_is_the_sum_of_its_terms():
    # tiny, batch 8 x 64 tokens, fp32 on the CPU: the peak is the start of the backward pass.
    p = pipeline("pipelines/tiny.yaml", "sft.batch_size=8", "sft.max_length=64")
    est = memory.estimate_stage(p, "sft", strategy="single", processes=1, device="cpu",
                                shapes=Shapes(policy=TINY))
    parts = {c.name: c.bytes for c in est.components}
    weights, adam = 4 * 328_256, 8 * 328_256
    blocks = 4 * 512 * 6_672 + 512 * 64 * 12  # 4 blocks + the final norm
    masks = 524_288
    head = 66_060_288 + 14_450_688 + 504 * 64 * 4  # fused head buffers + its input's gradient
    head_grad = 4 * 1024 * 64  # the (tied) head's gradient, made first
    assert parts == {"weights": weights, "optimiser states": adam, "activations": blocks, "attention masks": masks,
                     "backward scratch": head, "gradients": head_grad}
    assert est.total == weights + adam + blocks + masks + head + head_grad  # 94.8 MiB, measured 95.4
    assert est.phase == "forward and backward" and est.precision == "fp32"
    assert est.phases["optimiser step"] == weights + adam + 4 * 328_256


def test_rm_forwards_chosen_and_rejected_together():
    sft = memory.estimate_stage(pipeline(), "rm", strategy="single", processes=1, device="cpu",
                                shapes=Shapes(policy=TINY, reward=TINY))
    activations = {c.name: c.bytes for c in sft.components}["activations"]
    # tiny.yaml: rm batch 32 -> 64 sequences of 64 tokens
    assert activations == 4 * 64 * 64 * 6_672 + 64 * 64 * 64 * 12


def test_the_rm_language_regulariser_adds_its_logits_and_head_copy():
    plain = memory.estimate_stage(pipeline("pipelines/tiny.yaml", "rm.lm_loss_coef=0"), "rm", strategy="single",
                                  processes=1, device="cpu", shapes=Shapes(policy=TINY, reward=TINY))
    regularised = memory.estimate_stage(pipeline("pipelines/tiny.yaml", "rm.lm_loss_coef=0.3"), "rm",
                                        strategy="single", processes=1, device="cpu",
                                        shapes=Shapes(policy=TINY, reward=TINY))
    parts = {c.name: c.bytes for c in regularised.components}
    # tiny.yaml: 32 chosen rows of 64 tokens over a 1,024-token vocabulary, hidden 64
    assert parts["regulariser logits"] == 3 * 4 * 32 * 64 * 1024 and parts["regulariser head"] == 4 * 1024 * 64
    assert "regulariser logits" not in {c.name for c in plain.components}
    assert regularised.total == plain.total + 3 * 4 * 32 * 64 * 1024 + 4 * 1024 * 64


def test_gradient_accumulation_holds_the_gradients_through_the_backward_pass():
    one = memory.estimate_stage(pipeline("pipelines/tiny.yaml", "rm.batch_size=8"), "rm", strategy="single",
                                processes=1, device="cpu", shapes=Shapes(policy=TINY, reward=TINY))
    two = memory.estimate_stage(pipeline("pipelines/tiny.yaml", "rm.batch_size=8",
                                         "rm.gradient_accumulation_steps=2"), "rm", strategy="single", processes=1,
                                device="cpu", shapes=Shapes(policy=TINY, reward=TINY))
    assert two.total - one.total == 4 * 328_320  # all fp32 gradients of the reward model


def test_checkpointing_lowers_activations():
    full = memory.estimate_stage(pipeline(), "rm", strategy="single", processes=1, device="cpu",
                                 shapes=Shapes(policy=TINY, reward=TINY))
    ckpt = memory.estimate_stage(pipeline("pipelines/tiny.yaml", "rm.gradient_checkpointing=true"), "rm",
                                 strategy="single", processes=1, device="cpu",
                                 shapes=Shapes(policy=TINY, reward=TINY))
    assert {c.name: c.bytes for c in ckpt.components}["activations"] == 4 * 4096 * 64 * 4 + 4096 * 64 * 12
    assert ckpt.total < full.total


def test_with_checkpointing_the_peak_can_be_the_end_of_the_backward_pass():
    # RM, 16 x 64 tokens through 4 checkpointed blocks of hidden 512: at the end of the backward pass every gradient
    # but the first block's is held, with the first block's recomputed activations and gradients in flight; that
    # outweighs the start (block inputs, one recomputed block). Measured: 318.1 MiB estimated, 320.5 measured.
    shape = tiny_shape(TinyModelSpec(hidden_size=512, intermediate_size=2048, num_attention_heads=8))
    p = pipeline("pipelines/tiny.yaml", "rm.batch_size=8", "rm.max_length=64", "rm.gradient_checkpointing=true",
                 "rm.lm_loss_coef=0")  # measured without the regulariser
    est = memory.estimate_stage(p, "rm", strategy="single", processes=1, device="cpu",
                                shapes=Shapes(policy=shape, reward=shape))
    parts = {c.name: c.bytes for c in est.components}
    params = shape.parameters(head="score")
    tokens = 16 * 64
    assert parts["gradients"] == 4 * (params - shape.block_parameters())
    assert parts["activations"] == memory.block_activations(shape, tokens, mixed=False) \
        + memory.block_backward_temporaries(shape, tokens, mixed=False) + tokens * 512 * 4
    assert est.total == 12 * params + parts["gradients"] + parts["activations"]


def test_ppo_counts_four_models_and_lora_drops_the_reference():
    shapes = Shapes(policy=TINY, reward=TINY)
    full = memory.estimate_stage(pipeline(), "ppo", strategy="single", processes=1, device="cpu", shapes=shapes)
    parts = {c.name: c.bytes for c in full.components}
    assert parts["policy + value weights"] == 4 * (328_256 + 328_320)
    assert parts["reference"] == 4 * 328_256 and parts["reward model"] == 4 * 328_320
    assert set(full.phases) == {"update", "optimiser step", "generation", "scoring"}
    lora = memory.estimate_stage(pipeline("pipelines/tiny.yaml", "ppo.mode=lora"), "ppo", strategy="single",
                                 processes=1, device="cpu", shapes=shapes)
    lora_parts = {c.name: c.bytes for c in lora.components}
    assert "reference" not in lora_parts
    # AdamW over the adapters and the whole value model (LoRA applies to the policy only)
    assert lora_parts["optimiser states"] == 8 * (94_208 + 328_320)


def test_the_entropy_bonus_keeps_its_softmax_for_the_backward():
    shapes = Shapes(policy=TINY, reward=TINY)
    plain, bonus = (memory.estimate_stage(pipeline("pipelines/tiny.yaml", f"ppo.entropy_coef={coef}"), "ppo",
                                          strategy="single", processes=1, device="cpu", shapes=shapes)
                    for coef in (0, 0.01))
    parts = {c.name: c.bytes for c in bonus.components}
    assert parts["entropy bonus"] == 2 * 16 * 24 * TINY.vocab_size * 4  # micro batch 16 x 24 response tokens, fp32
    assert bonus.total > plain.total and "entropy bonus" not in {c.name for c in plain.components}


def test_ppo_generation_holds_the_kv_cache_of_the_whole_rollout_batch():
    shapes = Shapes(policy=TINY, reward=TINY)
    big = memory.estimate_stage(pipeline("pipelines/tiny.yaml", "ppo.rollout_batch_size=4096",
                                         "ppo.mini_batch_size=16"), "ppo", strategy="single", processes=1,
                                device="cpu", shapes=shapes)
    assert big.phase == "generation"
    kv = {c.name: c.bytes for c in big.components}["KV cache"]
    assert kv == 5 * 4096 * (32 + 24) * 64 * 8  # (4 + 1) blocks x 4,096 x 56 tokens x 64 x (4 + 4) bytes


def test_bf16_halves_the_frozen_models_and_encoder_rm_gives_a_policy_value_model():
    shapes = Shapes(policy=TINY, reward=encoder_shape(TinyEncoderSpec()))
    est = memory.estimate_stage(pipeline("pipelines/tiny.yaml", "rm.init=tiny-encoder"), "ppo", strategy="single",
                                processes=1, device="cuda", shapes=shapes)
    parts = {c.name: c.bytes for c in est.components}
    assert est.precision == "bf16"  # auto on a GPU
    assert parts["reward model"] == 2 * 265_217 and parts["reference"] == 2 * 328_256
    assert parts["policy + value weights"] == 4 * (328_256 + 328_320)  # value model from the policy (auto)


def test_sharding_lowers_the_peak_and_processes_above_one_mean_ddp():
    p = pipeline("pipelines/qwen2.5-0.5b-tldr.yaml")
    shapes = Shapes(policy=QWEN, reward=QWEN)
    single = memory.estimate_stage(p, "sft", strategy="single", processes=1, shapes=shapes)
    ddp = memory.estimate_stage(p, "sft", strategy="single", processes=8, shapes=shapes)
    zero3 = memory.estimate_stage(p, "sft", strategy="zero3", processes=8, shapes=shapes)
    assert ddp.strategy == "ddp" and ddp.total - single.total == 4 * 494_032_768  # DDP's gradient buckets
    assert zero3.total < single.total


def test_strategy_from_the_shipped_accelerate_configs():
    found = {name: memory.strategy_from_accelerate(REPO / "accelerate" / f"{name}.yaml")
             for name in ("ddp", "zero2", "zero3", "fsdp", "cpu2")}
    assert found == {"ddp": "ddp", "zero2": "zero2", "zero3": "zero3", "fsdp": "fsdp2", "cpu2": "ddp"}


# --- fits, the cheapest change, the text -------------------------------------------------------------------------

def test_fits_leaves_room_for_the_cuda_context_and_allocator_slack():
    est = memory.estimate_stage(pipeline(), "sft", strategy="single", processes=1,
                                shapes=Shapes(policy=TINY))
    assert est.needs() == -(-est.total * 11 // 10) + GiB // 2
    assert est.fits(est.needs()) and not est.fits(est.needs() - 1)


def test_the_cheapest_change_is_gradient_checkpointing_then_smaller_batches():
    p = pipeline("pipelines/qwen2.5-0.5b-tldr.yaml")
    shapes = Shapes(policy=QWEN, reward=QWEN)
    ppo = memory.estimate_stage(p, "ppo", strategy="single", processes=1, shapes=shapes)
    assert not ppo.fits(24 * GiB)  # ~31 GiB: no checkpointing, micro batch 8 x 565 tokens through two models
    change = memory.cheapest_change(p, "ppo", strategy="single", processes=1, gpu_bytes=24 * GiB, shapes=shapes)
    assert change.overrides == ("ppo.gradient_checkpointing=true",) and change.memory.fits(24 * GiB)
    # RM already checkpoints (the GPU pipeline): halving its batch (16 x 640 tokens x 2 sides) is next, with the
    # accumulation doubled so that an optimiser step sees as many pairs
    rm = memory.cheapest_change(p, "rm", strategy="single", processes=1, gpu_bytes=12 * GiB, shapes=shapes)
    assert rm.overrides == ("rm.batch_size=8", "rm.gradient_accumulation_steps=4") and rm.memory.fits(12 * GiB)


def test_lora_then_zero3_then_more_gpus_when_batches_are_not_enough():
    p = pipeline("pipelines/qwen2.5-0.5b-tldr.yaml")
    shapes = Shapes(policy=QWEN, reward=QWEN)
    lora = memory.cheapest_change(p, "sft", strategy="single", processes=1, gpu_bytes=6 * GiB, shapes=shapes)
    assert lora.what.endswith("LoRA") and "sft.mode=lora" in lora.overrides
    more = memory.cheapest_change(p, "ppo", strategy="ddp", processes=2, gpu_bytes=12 * GiB, shapes=shapes)
    assert more.strategy == "zero3" and more.memory.fits(12 * GiB)
    assert memory.cheapest_change(p, "ppo", strategy="ddp", processes=2, gpu_bytes=GiB, shapes=shapes) is None


def test_render_says_whether_it_fits_and_what_to_change():
    p = pipeline("pipelines/qwen2.5-0.5b-tldr.yaml")
    shapes = Shapes(policy=QWEN, reward=QWEN)
    est = memory.estimate_stage(p, "ppo", strategy="single", processes=1, shapes=shapes)
    change = memory.cheapest_change(p, "ppo", strategy="single", processes=1, gpu_bytes=24 * GiB, shapes=shapes)
    text = memory.render(est, gpu_bytes=24 * GiB, change=change)
    assert text.startswith(f"ppo: peak about {memory.size(est.total)} per GPU (update)")
    assert "DOES NOT FIT in 24.0 GiB" in text
    assert 'SET="ppo.gradient_checkpointing=true"' in text
    assert len(text.splitlines()) <= 6
    fits = memory.render(memory.estimate_stage(p, "sft", strategy="ddp", processes=8, shapes=shapes),
                         gpu_bytes=80 * GiB)
    assert "fits in 80.0 GiB" in fits and "ddp x 8" in fits


# --- shapes that cannot be found --------------------------------------------------------------------------------

def test_a_hub_model_without_a_cached_config_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    p = pipeline("pipelines/qwen2.5-0.5b-tldr.yaml")
    with pytest.raises(ShapeNotFound) as caught:
        memory.estimate_stage(p, "sft", strategy="ddp", processes=8)
    message = str(caught.value)
    assert "\n" not in message
    assert "model 'Qwen/Qwen2.5-0.5B'" in message and "hf download Qwen/Qwen2.5-0.5B config.json" in message


def test_a_cached_hub_config_is_found(tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text(json.dumps(QWEN_CONFIG))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    est = memory.estimate_stage(pipeline("pipelines/qwen2.5-0.5b-tldr.yaml"), "ppo", strategy="ddp", processes=8)
    assert est.total > 10 * GiB and est.notes == ()


def test_the_estimator_imports_no_torch():
    code = ("import sys; from rlhf.pipeline import memory; "
            "heavy = [m for m in ('torch', 'transformers', 'trl') if m in sys.modules]; sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# --- against a real run ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_estimate_is_within_15_percent_of_a_measured_sft_run(tmp_path, monkeypatch):
    """The real SFT stage (TRL's trainer, 3 steps) on the tiny model, its peak measured with torch's profiler."""
    sys.path.insert(0, str(REPO / "bench"))
    import memory as bench  # bench/memory.py

    monkeypatch.setattr(bench, "HOME", tmp_path)
    bench.write_data(tmp_path / "data")
    home = tmp_path / "h64"
    pipeline_file = bench.write_pipeline(home, hidden=64, variant=None)
    measured = bench.measure("sft", pipeline_file, home)["peak"]
    estimated = bench.estimate("sft", pipeline_file, home).total
    assert abs(estimated / measured - 1) < 0.15, (estimated / MiB, measured / MiB)
