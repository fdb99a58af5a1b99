"""Peak memory per GPU of each stage's training loop, estimated from the pipeline file alone (no torch).

    from rlhf.pipeline import memory
    estimate = memory.estimate_stage(pipeline, "ppo", strategy="ddp", processes=8)
    change = None if estimate.fits(gpu_bytes) else memory.cheapest_change(pipeline, "ppo", strategy="ddp",
                                                                          processes=8, gpu_bytes=gpu_bytes)
    print(memory.render(estimate, gpu_bytes=gpu_bytes, change=change))

What it counts, per GPU, at the moment of the loop where the most is held (each term below says why, with its
shapes): the weights, gradients and AdamW states of what trains (fp32 master weights: rlhf/training/models.py
loads trained weights in fp32 and bf16 is autocast), sharded as the strategy shards them; in PPO the frozen
reference (absent under LoRA) and reward model (bf16 under bf16, else fp32) and the trained value model; the
activations saved for the backward pass, with and without gradient checkpointing; the logits, or TRL's fused
output head that never builds them; the KV cache of generation. It counts tensors, as torch's allocator does
(`torch.cuda.max_memory_allocated`): `fits` adds the CUDA context and the allocator's slack. Batches are assumed
full-length (max_length, max_prompt_length + max_new_tokens), the largest batch a run can meet. The models'
sizes come from rlhf/pipeline/model_shape.py.

Measured against real stage runs on the CPU (bench/memory.py, docs/memory.md); the bf16 and sharded terms are
read from the code of torch, transformers, TRL, accelerate and DeepSpeed, not measured (no GPU was lent).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from rlhf.errors import ConfigError
from rlhf.pipeline.config import Pipeline, PPOStage, TrainStage
from rlhf.pipeline.model_shape import ModelShape, Shapes, resolve_shapes
from rlhf.pipeline.order import ROUND_ONE
from rlhf.pipeline.registry import is_entry_id

Strategy = Literal["single", "ddp", "zero2", "zero3", "fsdp2"]
Device = Literal["cuda", "cpu"]
STAGES = ROUND_ONE  # the stages estimated; DPO and collect are not
GiB = 2**30

FP32, HALF = 4, 2  # bytes per element
# trl/trainer/utils.py and trl/kernels/chunked_logprob.py (TRL 1.16): the fused LM head projects 4,096 tokens
# at a time onto 32,768 vocabulary columns, into one buffer of that full size whatever the vocabulary.
FUSED_HEAD_TOKENS, FUSED_HEAD_VOCAB = 4096, 32768
# Temporaries of that head's torch fallback (no Triton: the CPU), each (tokens, vocab) fp32, alive at once in its
# backward (`_backward_tile`: y, z, log_p, p, grad, the target mask and a product); measured, bench/memory.py.
FUSED_HEAD_CPU_TEMPORARIES = 7
# DeepSpeed's default reduce_bucket_size (elements); accelerate's ZeRO configs leave it unset.
DEEPSPEED_BUCKET = 500_000_000
# What `fits` keeps aside: the CUDA context and cuBLAS workspaces live outside torch's allocator, and the caching
# allocator reserves more than it hands out (fragmentation, rounding to blocks).
CUDA_CONTEXT = GiB // 2
ALLOCATOR_SLACK = 0.10


# --- strategy and precision ---------------------------------------------------------------------------------------

def strategy_from_accelerate(path: str | Path) -> Strategy:
    """The sharding strategy an accelerate config file asks for (its `distributed_type`, ZeRO stage, FSDP)."""
    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"accelerate config {path}: cannot be read: {err}") from None
    kind = str(config.get("distributed_type", "NO")).upper()
    if kind == "DEEPSPEED":
        settings = config.get("deepspeed_config") or {}
        stage = settings.get("zero_stage")
        if stage is None and settings.get("deepspeed_config_file"):
            file = Path(path).parent / settings["deepspeed_config_file"]
            stage = json.loads(file.read_text(encoding="utf-8")).get("zero_optimization", {}).get("stage", 0)
        return "zero3" if int(stage or 0) >= 3 else "zero2" if int(stage or 0) >= 1 else "ddp"
    if kind == "FSDP":
        return "fsdp2"
    return "ddp" if kind in ("MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU") else "single"


def strategy_of(pipeline: Pipeline) -> Strategy:
    """The pipeline's strategy: its accelerate config's, or one process without one."""
    return strategy_from_accelerate(pipeline.accelerate_config) if pipeline.accelerate_config else "single"


def resolve_precision(precision: str, *, device: Device) -> str:
    """`auto` is bf16 on a GPU (one with native bf16, as every GPU this pipeline targets) and fp32 on the CPU."""
    if precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return precision


# --- the terms: each a few lines, in bytes ----------------------------------------------------------------------

def block_activations(shape: ModelShape, tokens: int, *, mixed: bool, padded: bool = True,
                      frozen_norms: bool = False) -> int:
    """What one block saves for backward, per `tokens` tokens (fp32 measured on Llama, Qwen2 and BERT blocks,
    bench/memory.py; the bf16 sizes are read from the code).

    Decoder, fp32 (elements per token): the block input x, the norm's normalised and scaled outputs (2H), the
    rotated q (H), k and v (2 kv_dim), attention's output (H) and its contiguous copy (H), the residual sum (H),
    the second norm's two (2H), and the MLP's gate, up, silu and product (4I): 8H + 2 kv_dim + 4I. Under bf16
    autocast the linear outputs are 2 bytes, the norms and residual stream stay fp32 (RMSNorm upcasts), and the
    rotated q, k are re-cast for attention: 28H + 4 kv_dim + 8I bytes. Plus attention's log-sum-exp (fp32).
    With grouped-query attention and a padded batch, transformers repeats k and v to every query head before
    attention (its sdpa path uses enable_gqa only without a mask), so those are saved at the query width.
    With LoRA the norms' weights are frozen and autograd does not keep their normalised inputs (2H fp32 less).
    Encoder (BERT): x, q, k, v, attention's output and copy, the two residual sums and a LayerNorm output (9H), the
    GELU's input and output (2I)."""
    h, i = shape.hidden_size, shape.intermediate_size
    kv = shape.num_heads * shape.head_dim if padded else shape.kv_dim
    lse = FP32 * shape.num_heads
    if shape.family == "encoder":
        per_token = (FP32 * (9 * h + 2 * i)) if not mixed else (FP32 * 5 * h + HALF * (5 * h + 2 * i))
    else:
        per_token = FP32 * (8 * h + 2 * kv + 4 * i) if not mixed else 28 * h + 4 * kv + 8 * i
        per_token -= 2 * h * FP32 if frozen_norms else 0
    return tokens * (per_token + lse)


def block_backward_temporaries(shape: ModelShape, tokens: int, *, mixed: bool) -> int:
    """Gradients in flight inside one block's backward pass, measured: about two (tokens, I) tensors in a decoder
    block (the SwiGLU's), one in an encoder block."""
    return tokens * (2 if shape.family == "decoder" else 1) * shape.intermediate_size * (HALF if mixed else FP32)


def block_working_set(shape: ModelShape, tokens: int, *, act_bytes: int) -> int:
    """A block's forward without gradients (generation, scoring): the MLP's three (tokens, I) tensors and a few
    (tokens, H) ones alive at once, freed before the next block."""
    return tokens * (3 * shape.intermediate_size + 3 * shape.hidden_size) * act_bytes


def final_norm_activations(shape: ModelShape, tokens: int, *, mixed: bool) -> int:
    """Outside the blocks. Decoder: the last block's output and the final norm's two outputs (the head's input;
    re-cast to bf16 under autocast). Encoder: the embeddings' LayerNorm input (there is no final norm, and the
    pooler reads one token)."""
    if shape.family == "encoder":
        return tokens * shape.hidden_size * FP32
    return tokens * shape.hidden_size * (2 * FP32 + (HALF if mixed else FP32))


def checkpointed_activations(shape: ModelShape, tokens: int, *, layers: int) -> int:
    """Gradient checkpointing keeps only each block's input (the fp32 residual stream, (tokens, H)); each block's
    activations are recomputed in turn during the backward pass."""
    return layers * tokens * shape.hidden_size * FP32


def attention_masks(rows: int, seq: int, *, layers: int, mixed: bool) -> int:
    """A padded batch gives attention a (rows, 1, T, T) mask, which torch turns into a float mask of the compute
    dtype for every block, and which memory-efficient attention keeps for its backward."""
    return layers * rows * seq * seq * (HALF if mixed else FP32)


def fused_head(shape: ModelShape, tokens: int, *, mixed: bool, device: Device) -> int:
    """TRL's fused LM head (SFTTrainer): log-probs without the (tokens, V) logits. Its backward holds a
    (min(tokens, 4096), 32768) projection buffer of the compute dtype; without Triton (the CPU) also seven fp32
    temporaries of (min(tokens, 4096), min(V, 32768))."""
    rows = min(tokens, FUSED_HEAD_TOKENS)
    buffer = rows * FUSED_HEAD_VOCAB * (HALF if mixed else FP32)
    if device == "cpu":
        buffer += FUSED_HEAD_CPU_TEMPORARIES * rows * min(shape.vocab_size, FUSED_HEAD_VOCAB) * FP32
    return buffer


def logits(rows: int, tokens: int, vocab: int) -> int:
    """One fp32 (rows, tokens, V) tensor of logits or of something as large (a softmax, a gradient)."""
    return rows * tokens * vocab * FP32


def kv_cache(shape: ModelShape, rows: int, seq: int, *, key_bytes: int, value_bytes: int) -> int:
    """Keys and values of every block for `rows` sequences of `seq` tokens, plus one block's worth again while
    the cache grows (transformers' DynamicCache concatenates). Under bf16 autocast the keys are fp32 (RoPE
    multiplies them by fp32 cos/sin), the values bf16."""
    return (shape.num_layers + 1) * rows * seq * shape.kv_dim * (key_bytes + value_bytes)


def autocast_weight_copies(shape: ModelShape, *, layers: int, lm_head: bool) -> int:
    """Under bf16 autocast every linear casts its fp32 weight to bf16 in the forward pass, and the backward pass
    needs that copy (grad_input = grad_output @ W): 2 bytes per weight of the `layers` blocks that record a graph
    (and of the output head), held until their backward. DeepSpeed and FSDP2 hold bf16 weights: no copies."""
    per_block = shape.block_parameters() - 2 * shape.hidden_size  # its linears (norm weights are not cast)
    return HALF * (layers * per_block + (shape.vocab_size * shape.hidden_size if lm_head else 0))


def lora_parameters(shape: ModelShape, *, rank: int) -> int:
    """LoRA on every linear of every block (`all-linear`): rank x (in + out) per matrix."""
    h, i, q = shape.hidden_size, shape.intermediate_size, shape.num_heads * shape.head_dim
    per_block = (h + q) + 2 * (h + shape.kv_dim) + (q + h) + 2 * (h + i) + (i + h)
    return shape.num_layers * rank * per_block


def trainable_parameters(shape: ModelShape, *, head: Literal["lm", "score"], mode: str, top_n: int,
                         rank: int) -> int:
    """Parameters the optimiser steps: all; LoRA's adapters (+ a classifier's score head, which PEFT trains
    whole); or with top_n the last blocks, the final norm and an untied head (rlhf/training/models.py)."""
    if mode == "lora":
        return lora_parameters(shape, rank=rank) + (shape.hidden_size if head == "score" else 0)
    if mode == "top_n":
        untied = head == "score" or not shape.tied_embeddings
        return min(top_n, shape.num_layers) * shape.block_parameters() + shape.hidden_size \
            + (shape.hidden_size * (1 if head == "score" else shape.vocab_size) if untied else 0)
    return shape.parameters(head=head)


@dataclass(frozen=True)
class Held:
    """What a trained model holds on one GPU between steps, and what it adds while computing."""

    weights: int  # its parameters (shards of them under ZeRO-3 / FSDP2)
    gradients: int  # after a full backward pass
    optimiser: int  # AdamW's two moments (+ DeepSpeed's fp32 master copy)
    buffers: int  # gradient communication buckets
    gathered: int  # whole weights gathered for a forward/backward (ZeRO-3, FSDP2)
    weights_detail: str
    optimiser_detail: str


def trained_model(params: int, trainable: int, *, strategy: Strategy, processes: int, mixed: bool,
                  block: int, unsharded_root: int) -> Held:
    """Weights, gradients and AdamW states of a trained model under a strategy, per GPU (the ZeRO paper's
    accounting, Rajbhandari et al. 2020 section 5, and DeepSpeed's default buckets; read, not measured).
    `block`: one transformer block's parameters; `unsharded_root`: embeddings, final norm and head."""
    n, compute = max(processes, 1), HALF if mixed else FP32
    adam = 2 * FP32 * trainable
    if strategy in ("single", "ddp"):  # DDP (gradient_as_bucket_view off) copies the gradients into its buckets
        bucket = FP32 * trainable if strategy == "ddp" and n > 1 else 0
        return Held(FP32 * params, FP32 * trainable, adam, bucket, 0, "fp32, the master copy (bf16 is autocast)",
                    "AdamW m and v, fp32")
    master = f"fp32 master copy + AdamW m and v, sharded over {n}"
    if strategy == "zero2":  # DeepSpeed casts the model to bf16 and keeps an fp32 copy of its own partition
        bucket = min(DEEPSPEED_BUCKET, trainable) * compute
        return Held(compute * params, compute * trainable // n, (FP32 * trainable + adam) // n, bucket, 0,
                    f"{'bf16' if mixed else 'fp32'}, whole on every GPU", master)
    if strategy == "zero3":  # everything sharded; a block and the next (prefetched) gathered, and the embedding
        bucket = min(DEEPSPEED_BUCKET, trainable) * compute
        return Held(compute * params // n, compute * trainable // n, (FP32 * trainable + adam) // n, bucket,
                    compute * (2 * block + unsharded_root), f"{'bf16' if mixed else 'fp32'} shards over {n}", master)
    # fsdp2: fp32 shards; the root (embeddings, head) and two blocks unsharded in the compute dtype
    return Held(FP32 * params // n, FP32 * trainable // n, adam // n, 0, compute * (2 * block + unsharded_root),
                f"fp32 shards over {n}", f"AdamW m and v, sharded over {n}")


def optimiser_step_temporaries(shape: ModelShape, trainable: int, *, implementation: str) -> int:
    """AdamW's scratch memory while stepping: none fused (the Trainer's adamw_torch_fused); one fp32 copy of every
    trained parameter with foreach (torch's default on a GPU: the square roots of v); a few copies of the largest
    tensor single-tensor (torch's default on the CPU: sqrt, its quotient, the clip)."""
    if implementation == "fused":
        return 0
    if implementation == "foreach":
        return FP32 * trainable
    return 3 * FP32 * min(shape.largest_tensor(), trainable)


# --- the estimate -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Component:
    name: str
    bytes: int
    detail: str  # how it was counted, with shapes


@dataclass(frozen=True)
class StageMemory:
    """The estimated peak of one stage's training loop on one GPU, broken down at the moment it happens."""

    stage: str
    strategy: Strategy
    processes: int
    device: Device
    precision: str  # as resolved for the device: bf16, fp16 or fp32
    mode: str  # full, lora or top_n
    phase: str  # the part of the loop where the peak is
    components: tuple[Component, ...]  # what is held at that moment; they sum to `total`
    phases: dict[str, int]  # the peak of each part of the loop
    checkpointing: bool  # whether the stage checkpoints its activations (gradient_checkpointing)
    other_checkpointing: int  # the peak with gradient_checkpointing the other way
    notes: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()  # where the model shapes came from

    @property
    def total(self) -> int:
        return sum(c.bytes for c in self.components)

    def needs(self) -> int:
        """GPU memory to ask for: the tensors, the allocator's slack and the CUDA context."""
        return math.ceil(self.total * (1 + ALLOCATOR_SLACK)) + (CUDA_CONTEXT if self.device == "cuda" else 0)

    def fits(self, total_gpu_bytes: int) -> bool:
        return self.needs() <= total_gpu_bytes


@dataclass
class _Phase:
    name: str
    parts: list[Component]

    @property
    def total(self) -> int:
        return sum(c.bytes for c in self.parts)


def _c(name: str, value: int, detail: str) -> Component:
    return Component(name=name, bytes=int(value), detail=detail)


def estimate_stage(pipeline: Pipeline, stage: str, *, strategy: Strategy, processes: int,
                   device: Device = "cuda", shapes: Shapes | None = None) -> StageMemory:
    """The peak memory per GPU of `stage`'s training loop (`sft`, `rm` or `ppo`) under `strategy` over
    `processes` GPUs. `shapes` replaces the shapes read from the pipeline (e.g. from a built checkpoint's
    config.json); without it a model whose config.json cannot be found raises ShapeNotFound."""
    if stage not in STAGES:
        raise ConfigError(f"memory estimate: unknown stage '{stage}' (stages: {', '.join(STAGES)})")
    cfg = getattr(pipeline, stage)
    if cfg is None:
        raise ConfigError(f"memory estimate: the pipeline has no '{stage}' section")
    notes: list[str] = []
    if shapes is None:
        shapes, notes = resolve_shapes(pipeline, stage)
    if processes > 1 and strategy == "single":
        strategy = "ddp"
    precision = resolve_precision(cfg.precision, device=device)
    phases = _phases(pipeline, stage, cfg, shapes, strategy=strategy, processes=processes, precision=precision,
                     device=device, notes=notes)
    flipped = dataclasses.replace(cfg, gradient_checkpointing=not cfg.gradient_checkpointing)
    other = _phases(pipeline, stage, flipped, shapes, strategy=strategy, processes=processes, precision=precision,
                    device=device, notes=[])
    peak = max(phases, key=lambda p: p.total)
    return StageMemory(stage=stage, strategy=strategy, processes=processes, device=device, precision=precision,
                       mode=cfg.mode, phase=peak.name, components=tuple(c for c in peak.parts if c.bytes),
                       phases={p.name: p.total for p in phases}, checkpointing=cfg.gradient_checkpointing,
                       other_checkpointing=max(p.total for p in other), notes=tuple(notes),
                       sources=tuple(dict.fromkeys(x.source for x in (shapes.policy, shapes.reward) if x)))


def _phases(pipeline: Pipeline, stage: str, cfg: TrainStage | PPOStage, shapes: Shapes, *, strategy: Strategy,
            processes: int, precision: str, device: Device, notes: list[str]) -> list[_Phase]:
    if stage == "ppo":
        return _ppo_phases(cfg, shapes, strategy=strategy, processes=processes, precision=precision,
                           device=device, notes=notes, rm_init=pipeline.rm.init if pipeline.rm else "sft")
    shape = shapes.policy if stage == "sft" else (shapes.reward or shapes.policy)
    return _trainer_phases(cfg, shape, stage=stage, strategy=strategy, processes=processes, precision=precision,
                           device=device)


def _trainer_phases(cfg: TrainStage, shape: ModelShape, *, stage: str, strategy: Strategy, processes: int,
                    precision: str, device: Device) -> list[_Phase]:
    """SFT and RM on TRL's trainers: `batch_size` sequences of `max_length` tokens per forward pass (RM: chosen and
    rejected together, 2 x batch_size), `gradient_accumulation_steps` passes per optimiser step (fused AdamW)."""
    mixed = precision != "fp32"
    head: Literal["lm", "score"] = "lm" if stage == "sft" else "score"
    rows = cfg.batch_size * (2 if stage == "rm" else 1)
    seq = cfg.max_length
    params = shape.parameters(head=head)
    trained = trainable_parameters(shape, head=head, mode=cfg.mode, top_n=cfg.top_n_layers, rank=cfg.lora.r)
    held = trained_model(params, trained, strategy=strategy, processes=processes, mixed=mixed,
                         block=shape.block_parameters(), unsharded_root=params - shape.num_layers *
                         shape.block_parameters())
    layers = min(cfg.top_n_layers, shape.num_layers) if cfg.mode == "top_n" else shape.num_layers
    static = [_c("weights", held.weights, f"{params / 1e6:,.1f}M parameters, {held.weights_detail}"),
              _c("optimiser states", held.optimiser, f"{held.optimiser_detail}, of {trained / 1e6:,.2f}M "
                                                     f"trained parameters")]
    if held.buffers:
        static.append(_c("communication buffers", held.buffers, f"{strategy} gradient buckets"))
    if held.gathered:
        static.append(_c("gathered weights", held.gathered, "whole blocks gathered to compute"))

    regularised = stage == "rm" and cfg.lm_regularised  # rm.lm_loss_coef: the chosen half's next-token logits
    if regularised:
        static.append(_c("regulariser head", FP32 * shape.vocab_size * shape.hidden_size,
                         "rm.lm_loss_coef: a frozen fp32 copy of the starting policy's output embedding"))
    backward = _backward_activations(shape, rows=rows, seq=seq, layers=layers, mixed=mixed,
                                     checkpointing=cfg.gradient_checkpointing, device=device,
                                     fused_lm_head=stage == "sft", lora=cfg.mode == "lora")
    if regularised:
        backward.saved.append(_c("regulariser logits", 3 * logits(cfg.batch_size, seq, shape.vocab_size),
                                 f"({cfg.batch_size}, {seq}, {shape.vocab_size}) fp32 logits of the chosen half, "
                                 "their log-softmax and its gradient"))
    if mixed and strategy in ("single", "ddp"):  # the fused head casts its weight chunk by chunk, uncached
        backward.saved.append(_c("bf16 weight copies", autocast_weight_copies(shape, layers=layers, lm_head=False),
                                 f"autocast's copies of {layers} blocks' linear weights, kept for the backward"))
    # The output head's gradient is made first, at the start of the backward pass, when the head trains.
    head_trains = stage == "sft" and (cfg.mode == "full" or cfg.mode == "top_n" and not shape.tied_embeddings)
    head_grad = FP32 * shape.vocab_size * shape.hidden_size if head_trains else 0
    per_block = lora_parameters(shape, rank=cfg.lora.r) // shape.num_layers if cfg.mode == "lora" \
        else shape.block_parameters()
    backward_phase = _backward_phase("forward and backward", static, backward, grads=held.gradients,
                                     head_grad=head_grad, block_grads=held.gradients * per_block // max(trained, 1),
                                     accumulation=cfg.gradient_accumulation_steps)
    step = _Phase("optimiser step", static + [
        _c("gradients", held.gradients, f"of {trained / 1e6:,.2f}M trained parameters"),
        _c("optimiser step scratch", optimiser_step_temporaries(shape, trained, implementation="fused"), "fused")])
    return [backward_phase, step]


@dataclass
class _Backward:
    """What a forward pass leaves for the backward pass, and what the backward pass adds."""

    saved: list[Component]  # activations (and logits) saved by the forward pass
    scratch: Component  # the largest scratch at its start (the head's, or a block's)
    last_block: int  # at its end: the first block's activations (saved or recomputed) and gradients in flight


def _backward_activations(shape: ModelShape, *, rows: int, seq: int, layers: int, mixed: bool, checkpointing: bool,
                          device: Device, fused_lm_head: bool = False, response: int = 0,
                          lora: bool = False) -> _Backward:
    """What `rows` padded sequences of `seq` tokens through `layers` trained blocks leave for the backward pass;
    the head is TRL's fused one, or logits over `response` tokens, or a score head."""
    tokens = rows * seq
    block = block_activations(shape, tokens, mixed=mixed, frozen_norms=lora)
    blocks = checkpointed_activations(shape, tokens, layers=layers) if checkpointing else layers * block
    saved = [_c("activations", blocks + final_norm_activations(shape, tokens, mixed=mixed),
                f"{layers} blocks x {rows} x {seq} tokens" + (", checkpointed" if checkpointing else "")),
             _c("attention masks", attention_masks(rows, seq, layers=layers, mixed=mixed),
                f"{layers} x ({rows}, {seq}, {seq}) float masks of a padded batch")]
    in_block = (block if checkpointing else 0) + block_backward_temporaries(shape, tokens, mixed=mixed)
    if fused_lm_head:  # every position but the last predicts a token; its input is saved with the final norm
        scored = tokens - rows
        head = fused_head(shape, scored, mixed=mixed, device=device) + scored * shape.hidden_size * FP32
        detail = f"fused head buffers for {scored} tokens (no logits tensor) and its input's gradient"
    elif response:
        head = 3 * logits(rows, response, shape.vocab_size)
        saved.append(_c("logits", 2 * logits(rows, response, shape.vocab_size),
                        f"({rows}, {response}, {shape.vocab_size}) fp32 logits and their tempered copy"))
        detail = "the logits' gradients and softmax"
    else:
        head, detail = 0, ""
    if head < in_block:
        head = in_block
        detail = "a block's recomputed activations and gradients" if checkpointing else "a block's gradients"
    last = block + block_backward_temporaries(shape, tokens, mixed=mixed) \
        + (checkpointed_activations(shape, tokens, layers=1) if checkpointing else 0)
    return _Backward(saved=saved, scratch=_c("backward scratch", head, detail), last_block=last)


def _backward_phase(name: str, static: list[Component], backward: _Backward, *, grads: int, head_grad: int,
                    block_grads: int, accumulation: int) -> _Phase:
    """The backward pass's peak. With gradient accumulation the earlier micro batches' gradients are held
    throughout, and the peak is at its start. Without, gradients are made as activations are freed, block by block
    from the top: the peak is at its start (every activation, the head's gradient) or at its end (every gradient
    but the first block's, whose activations are still held, or recomputed under checkpointing)."""
    start = static + backward.saved + [backward.scratch]
    if accumulation > 1:
        return _Phase(name, start + [_c("gradients", grads, "held across the accumulated micro batches")])
    start = start + [_c("gradients", head_grad, "the output head's, made first")]
    end = static + [_c("gradients", grads - block_grads, "all but the first block's, at the end of the backward"),
                    _c("activations", backward.last_block, "the first block's, and its gradients in flight")]
    return _Phase(name, max(start, end, key=lambda parts: sum(c.bytes for c in parts)))


def _ppo_phases(cfg: PPOStage, shapes: Shapes, *, strategy: Strategy, processes: int, precision: str,
                device: Device, notes: list[str], rm_init: str) -> list[_Phase]:
    """One PPO step (rlhf/training/ppo/trainer.py): generation of `rollout_batch_size` responses at once, scoring
    in micro batches, and the update: forward/backward of policy and value model on `micro_batch_size` episodes
    of max_prompt_length + max_new_tokens tokens, `mini_batch_size / micro_batch_size` passes per AdamW step."""
    mixed = precision != "fp32"
    policy, reward = shapes.policy, shapes.reward or shapes.policy
    shares_tokenizer = rm_init in ("sft", "base") or is_entry_id(rm_init)
    from_rm = cfg.value_init == "rm" or (cfg.value_init == "auto" and shares_tokenizer)
    value = reward if from_rm else policy
    critic = cfg.algorithm == "ppo"  # grpo, rloo and reinforce_pp load no value model
    if critic and value.family == "encoder":
        value = policy
        notes.append("value_init rm with an encoder reward model: the stage refuses it; estimated from the policy")
    p_policy, p_value = policy.parameters(head="lm"), value.parameters(head="score") if critic else 0
    t_policy = lora_parameters(policy, rank=cfg.lora.r) if cfg.mode == "lora" else p_policy
    trained, params = t_policy + p_value, p_policy + p_value
    root = p_policy + p_value - policy.num_layers * policy.block_parameters() - (
        value.num_layers * value.block_parameters() if critic else 0)
    held = trained_model(params, trained, strategy=strategy, processes=processes, mixed=mixed,
                         block=max(policy.block_parameters(), value.block_parameters() if critic else 0),
                         unsharded_root=root)
    frozen_bytes = HALF if precision == "bf16" else FP32
    weights = "policy + value weights" if critic else "policy weights (no value model)"
    static = [_c(weights, held.weights, f"{p_policy / 1e6:,.1f}M + {p_value / 1e6:,.1f}M "
                 f"parameters, {held.weights_detail}"),
              _c("optimiser states", held.optimiser, f"{held.optimiser_detail}, of {trained / 1e6:,.2f}M "
                                                     f"trained parameters")]
    if cfg.mode != "lora":
        static.append(_c("reference", frozen_bytes * p_policy, "the frozen SFT policy, whole on every GPU"))
    static.append(_c("reward model", frozen_bytes * reward.parameters(head="score"),
                     "frozen, whole on every GPU"))
    if held.buffers:
        static.append(_c("communication buffers", held.buffers, f"{strategy} gradient buckets"))

    seq, response, rows = cfg.max_prompt_length + cfg.max_new_tokens, cfg.max_new_tokens, cfg.micro_batch_size
    accumulation = cfg.mini_batch_size // max(cfg.micro_batch_size, 1)
    # update: both models' activations; the policy's logits only over the response (logits_to_keep)
    backward = _backward_activations(policy, rows=rows, seq=seq, layers=policy.num_layers, mixed=mixed,
                                     checkpointing=cfg.gradient_checkpointing, device=device, response=response,
                                     lora=cfg.mode == "lora")
    if cfg.entropy_coef > 0:  # the bonus's entropy is in the graph: its softmax and products are kept for backward
        backward.saved.append(_c("entropy bonus", 2 * logits(rows, response, policy.vocab_size),
                                 "the softmax and its products, kept for the bonus's gradient"))
    if critic:
        value_backward = _backward_activations(value, rows=rows, seq=seq, layers=value.num_layers, mixed=mixed,
                                               checkpointing=cfg.gradient_checkpointing, device=device)
        backward = _Backward(saved=_merge(backward.saved, value_backward.saved),
                             scratch=max(backward.scratch, value_backward.scratch, key=lambda c: c.bytes),
                             last_block=backward.last_block)  # the value model's blocks go first, the policy's last
    if mixed and strategy in ("single", "ddp"):
        copies = autocast_weight_copies(policy, layers=policy.num_layers, lm_head=True) + (
            autocast_weight_copies(value, layers=value.num_layers, lm_head=False) if critic else 0)
        backward.saved.append(_c("bf16 weight copies", copies, "autocast's copies of both models' linear weights "
                                                               "(and the output head), kept for the backward"))
    static_update = static + ([_c("gathered weights", held.gathered, "whole blocks gathered to compute")]
                              if held.gathered else [])
    head_grad = FP32 * policy.vocab_size * policy.hidden_size if cfg.mode != "lora" else 0
    per_block = lora_parameters(policy, rank=cfg.lora.r) // policy.num_layers if cfg.mode == "lora" \
        else policy.block_parameters()
    update = _backward_phase("update", static_update, backward, grads=held.gradients, head_grad=head_grad,
                             block_grads=held.gradients * per_block // max(trained, 1), accumulation=accumulation)
    # after the first epoch's backward: the entropy's softmax over the logits, with every gradient held
    entropy = _Phase("update", static_update + [
        _c("gradients", held.gradients, "all, after the backward pass"),
        _c("logits", 2 * logits(rows, response, policy.vocab_size), "kept for the entropy"),
        _c("entropy scratch", 3 * logits(rows, response, policy.vocab_size), "its softmax and products")])
    # PPO steps torch's fused AdamW on whole parameters (one process, DDP: rlhf/training/ppo/sharding.py
    # fused_optimiser); DeepSpeed and FSDP2 the default, foreach on a GPU
    whole = strategy in ("single", "ddp")
    implementation = "fused" if whole else "foreach" if device == "cuda" else "single"
    step = _Phase("optimiser step", static + [
        _c("gradients", held.gradients, f"of {trained / 1e6:,.2f}M trained parameters"),
        _c("optimiser step scratch", optimiser_step_temporaries(policy, trained, implementation=implementation),
           f"torch AdamW ({implementation})")])

    # generation: every prompt of the rollout in one generate call, the policy's KV cache growing to seq tokens
    act = HALF if mixed else FP32
    key_bytes, value_bytes = (FP32, HALF) if mixed else (FP32, FP32)
    gathered = [] if strategy in ("single", "ddp", "zero2") else [
        _c("gathered weights", act * params, "policy and value gathered whole for the rollout")]
    generation = _Phase("generation", static + gathered + [
        _c("KV cache", kv_cache(policy, cfg.rollout_batch_size, seq, key_bytes=key_bytes, value_bytes=value_bytes),
           f"{policy.num_layers} blocks x {cfg.rollout_batch_size} x {seq} tokens"),
        _c("generation scratch", block_working_set(policy, cfg.rollout_batch_size * cfg.max_prompt_length,
                                                   act_bytes=act), "one block of the prompts' prefill")])
    scoring = _Phase("scoring", static + gathered + [
        _c("scoring scratch", block_working_set(policy, rows * seq, act_bytes=act)
           + 3 * logits(rows, response, policy.vocab_size), "a micro batch's forward: one block, the logits")])
    return [update if update.total >= entropy.total else entropy, step, generation, scoring]


def _merge(first: list[Component], second: list[Component]) -> list[Component]:
    """Components of the same name added (the policy's and the value model's activations)."""
    merged: dict[str, Component] = {}
    for c in first + second:
        old = merged.get(c.name)
        merged[c.name] = c if old is None else _c(c.name, old.bytes + c.bytes, old.detail + " (+ value model)")
    return list(merged.values())


# --- when it does not fit: the cheapest change that does ----------------------------------------------------------

@dataclass(frozen=True)
class Change:
    """Settings under which a stage fits, and its estimate with them."""

    what: str  # in words: "gradient checkpointing, batch_size 4 x accumulation 8"
    overrides: tuple[str, ...]  # pipeline overrides for SET= / the command line
    strategy: Strategy
    processes: int
    memory: StageMemory


def cheapest_change(pipeline: Pipeline, stage: str, *, strategy: Strategy, processes: int, gpu_bytes: int,
                    device: Device = "cuda", shapes: Shapes | None = None) -> Change | None:
    """The first setting, in order of cost, under which `stage` fits in `gpu_bytes`: gradient checkpointing, then
    smaller micro batches (the batch per optimiser step kept by more accumulation), then LoRA, then ZeRO-3, then
    ZeRO-3 over 2, 4, 8 times the GPUs; each of the later ones tried alone first, then with the earlier cheap
    ones. None when nothing there fits."""
    cfg = getattr(pipeline, stage)
    bigs: list[tuple[str, tuple[str, ...], dict, Strategy, int]] = [("", (), {}, strategy, processes)]
    if cfg.mode != "lora":
        bigs.append(("LoRA", (f"{stage}.mode=lora",), {"mode": "lora"}, strategy, processes))
    if strategy != "zero3" and processes > 1:
        bigs.append(("ZeRO-3", ("accelerate_config=accelerate/zero3.yaml",), {}, "zero3", processes))
    with_processes = "processes" in {f.name for f in dataclasses.fields(pipeline)}  # the pipeline's process count
    for factor in (2, 4, 8):
        more = ("accelerate_config=accelerate/zero3.yaml",) + ((f"processes={processes * factor}",)
                                                              if with_processes else ())
        bigs.append((f"ZeRO-3 over {processes * factor} GPUs", more, {}, "zero3", processes * factor))
    for big, big_overrides, big_fields, big_strategy, big_processes in bigs:
        for small, small_overrides, small_fields in _cheap_changes(cfg, stage):
            if not big and not small:
                continue
            changed = dataclasses.replace(pipeline, **{stage: dataclasses.replace(cfg, **big_fields,
                                                                                   **small_fields)})
            memory = estimate_stage(changed, stage, strategy=big_strategy, processes=big_processes, device=device,
                                    shapes=shapes)
            if memory.fits(gpu_bytes):
                return Change(what=", ".join(w for w in (small, big) if w),
                              overrides=big_overrides + small_overrides, strategy=big_strategy,
                              processes=big_processes, memory=memory)
    return None


def _cheap_changes(cfg: TrainStage | PPOStage, stage: str) -> list[tuple[str, tuple[str, ...], dict]]:
    """Nothing; gradient checkpointing; then halved micro batches down to 1 (with checkpointing)."""
    found: list[tuple[str, tuple[str, ...], dict]] = [("", (), {})]
    ckpt: tuple[str, tuple[str, ...], dict] = ("", (), {})
    if not cfg.gradient_checkpointing:
        ckpt = ("gradient checkpointing", (f"{stage}.gradient_checkpointing=true",),
                {"gradient_checkpointing": True})
        found.append(ckpt)
    if isinstance(cfg, PPOStage):  # micro batches must divide the minibatch
        for micro in (m for m in range(cfg.micro_batch_size - 1, 0, -1) if cfg.mini_batch_size % m == 0):
            found.append(_with(ckpt, f"micro batch {micro}", (f"ppo.micro_batch_size={micro}",),
                               {"micro_batch_size": micro}))
        return found
    batch, accumulation = cfg.batch_size, cfg.gradient_accumulation_steps
    while batch > 1:
        batch, accumulation = batch // 2, accumulation * 2
        found.append(_with(ckpt, f"batch_size {batch} x accumulation {accumulation}",
                           (f"{stage}.batch_size={batch}", f"{stage}.gradient_accumulation_steps={accumulation}"),
                           {"batch_size": batch, "gradient_accumulation_steps": accumulation}))
    return found


def _with(base: tuple[str, tuple[str, ...], dict], what: str, overrides: tuple[str, ...],
          fields: dict) -> tuple[str, tuple[str, ...], dict]:
    return (", ".join(w for w in (base[0], what) if w), base[1] + overrides, {**base[2], **fields})


# --- the text `rlhf plan` prints ----------------------------------------------------------------------------------

def size(value: int) -> str:
    """Bytes as GiB (one decimal), or MiB below one GiB."""
    return f"{value / GiB:.1f} GiB" if value >= GiB else f"{value / 2**20:.1f} MiB"


def render(memory: StageMemory, *, gpu_bytes: int | None = None, change: Change | None = None,
           verbose: bool = False) -> str:
    """A few lines for one stage: the peak and where it is, what it is made of, whether it fits, and if not the
    cheapest change that does. `verbose` adds how each part was counted."""
    where = "CPU" if memory.device == "cpu" else "GPU"
    how = "1 process" if memory.processes == 1 else f"{memory.strategy} x {memory.processes} processes"
    head = (f"{memory.stage}: peak about {size(memory.total)} per {where} ({memory.phase}); "
            f"{memory.precision}, {memory.mode}, {how}")
    if gpu_bytes is not None:
        verdict = "fits" if memory.fits(gpu_bytes) else "DOES NOT FIT"
        head += f"; {verdict} in {size(gpu_bytes)} (needs {size(memory.needs())} with CUDA context and slack)" \
            if memory.device == "cuda" else f"; {verdict} in {size(gpu_bytes)}"
    parts = [f"{c.name} {size(c.bytes)}" for c in memory.components]
    parts[-1] += f"; {'without' if memory.checkpointing else 'with'} gradient checkpointing: " \
                 f"{size(memory.other_checkpointing)}"
    lines = [head] + _wrap(parts, width=110)
    if verbose:
        lines += [f"    {c.name}: {size(c.bytes)}: {c.detail}" for c in memory.components]
        lines.append("    peaks by phase: " + ", ".join(f"{k} {size(v)}" for k, v in memory.phases.items()))
        lines.append("    model shapes from: " + "; ".join(memory.sources))
    lines += [f"  note: {note}" for note in memory.notes]
    if gpu_bytes is not None and not memory.fits(gpu_bytes):
        if change is None:
            lines.append("  nothing from gradient checkpointing to ZeRO-3 over 8x the GPUs fits; the stage still "
                         "runs if you insist")
        else:
            lines.append(f"  fits with {change.what}: peak about {size(change.memory.total)} "
                         f"(SET=\"{' '.join(change.overrides)}\")")
    return "\n".join(lines)


def _wrap(parts: list[str], *, width: int) -> list[str]:
    """`parts` joined with commas into indented lines of at most `width`, never breaking inside one."""
    lines = ["  "]
    for i, part in enumerate(parts):
        text = part + ("," if i < len(parts) - 1 else "")
        if len(lines[-1]) > 2 and len(lines[-1]) + 1 + len(text) > width:
            lines.append("  ")
        lines[-1] += ("" if len(lines[-1]) == 2 else " ") + text
    return lines
