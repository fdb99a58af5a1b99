"""How big a model is, read without loading its weights: from the pipeline's `tiny` and `rm.encoder` sections,
a model folder's config.json, or the Hugging Face cache (nothing is downloaded). No torch.

    from rlhf.pipeline.model_shape import resolve_shapes
    shapes, notes = resolve_shapes(pipeline, "ppo")
    shapes.policy.parameters(head="lm")

The peak-memory estimate (rlhf/pipeline/memory.py) and `rlhf plan` read their sizes from here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rlhf.errors import ModelError
from rlhf.pipeline.config import Pipeline, TinyEncoderSpec, TinyModelSpec
from rlhf.pipeline.registry import is_entry_id


class ShapeNotFound(ModelError):
    """The model's shape (its config.json) cannot be found without downloading it."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes the estimate needs, as a Hugging Face config.json gives them."""

    family: Literal["decoder", "encoder"]  # a Llama/Qwen2-style causal LM, or a BERT-style encoder
    vocab_size: int  # rows of the embedding (and of an untied output head)
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool  # the output head shares the embedding matrix
    qkv_bias: bool = False  # Qwen2: biases on the query, key and value projections
    max_positions: int = 512  # BERT's learned position embeddings
    source: str = ""  # where the shape came from, for the notes

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def block_parameters(self) -> int:
        """One transformer block: attention, MLP and norms."""
        h, i, q = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim
        if self.family == "encoder":  # q, k, v, o with biases; MLP in and out with biases; two LayerNorms
            return 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
        attention = h * q + 2 * h * self.kv_dim + q * h + ((q + 2 * self.kv_dim) if self.qkv_bias else 0)
        return attention + 3 * h * i + 2 * h  # SwiGLU: gate, up, down; two RMSNorms

    def parameters(self, *, head: Literal["lm", "score"]) -> int:
        """Every parameter of the causal LM (`lm`) or of the one-score sequence classifier (`score`)."""
        h, v = self.hidden_size, self.vocab_size
        if self.family == "encoder":  # word, position, type embeddings + LayerNorm; pooler; 1-label classifier
            return (v + self.max_positions + 2) * h + 2 * h + self.num_layers * self.block_parameters() \
                + (h * h + h) + (h + 1)
        body = v * h + self.num_layers * self.block_parameters() + h  # embedding, blocks, final norm
        if head == "score":
            return body + h  # a bias-free (H -> 1) score head
        return body + (0 if self.tied_embeddings else v * h)

    def largest_tensor(self) -> int:
        """Elements of the largest single weight: the embedding, or an MLP matrix."""
        return max(self.vocab_size * self.hidden_size, self.hidden_size * self.intermediate_size)


@dataclass(frozen=True)
class Shapes:
    """The shapes a stage needs: the policy (SFT, PPO) and the reward model's backbone (RM, PPO)."""

    policy: ModelShape
    reward: ModelShape | None = None


def tiny_shape(spec: TinyModelSpec) -> ModelShape:
    """The tiny Llama (or Qwen2) of rlhf/training/tiny.py. Its embedding has `model_vocab_size` rows, else one per
    token of the tokenizer trained on the pipeline's texts, which has at most `vocab_size` (a small corpus gives
    fewer merges): an upper bound until the base model is built (then read its config.json)."""
    resolved = spec.resolved()  # a `shape` preset written out
    vocab = resolved.model_vocab_size or resolved.vocab_size
    return ModelShape(family="decoder", vocab_size=vocab, hidden_size=resolved.hidden_size,
                      intermediate_size=resolved.intermediate_size, num_layers=resolved.num_hidden_layers,
                      num_heads=resolved.num_attention_heads, num_kv_heads=resolved.num_key_value_heads,
                      head_dim=resolved.hidden_size // resolved.num_attention_heads,
                      tied_embeddings=resolved.tie_word_embeddings, qkv_bias=resolved.architecture == "qwen2",
                      source="the pipeline's tiny section")


def encoder_shape(spec: TinyEncoderSpec) -> ModelShape:
    """The tiny BERT-style reward encoder (`rm.init: tiny-encoder`); `vocab_size` is again an upper bound."""
    return ModelShape(family="encoder", vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                      intermediate_size=spec.intermediate_size, num_layers=spec.num_hidden_layers,
                      num_heads=spec.num_attention_heads, num_kv_heads=spec.num_attention_heads,
                      head_dim=spec.hidden_size // spec.num_attention_heads, tied_embeddings=True,
                      max_positions=spec.max_position_embeddings, source="rm.encoder (tiny-encoder)")


def shape_from_config(config: dict, *, source: str) -> ModelShape:
    """A shape from the fields of a config.json (Llama, Qwen2, Mistral and other decoders; BERT)."""
    if "text_config" in config:  # multimodal wrappers keep the language model's sizes here
        config = {**config, **config["text_config"]}
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        common = dict(vocab_size=int(config["vocab_size"]), hidden_size=hidden,
                      intermediate_size=int(config.get("intermediate_size") or 4 * hidden),
                      num_layers=int(config["num_hidden_layers"]), num_heads=heads, source=source)
    except (KeyError, TypeError, ValueError) as err:
        raise ShapeNotFound(f"{source}: config.json lacks {err} (need hidden_size, num_attention_heads, "
                            f"num_hidden_layers, vocab_size)") from None
    if config.get("model_type") in ("bert", "roberta", "distilbert", "electra"):
        return ModelShape(family="encoder", num_kv_heads=heads, head_dim=hidden // heads, tied_embeddings=True,
                          max_positions=int(config.get("max_position_embeddings", 512)), **common)
    return ModelShape(family="decoder", num_kv_heads=int(config.get("num_key_value_heads") or heads),
                      head_dim=int(config.get("head_dim") or hidden // heads),
                      tied_embeddings=bool(config.get("tie_word_embeddings", True)),
                      qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias")),
                      **common)


def shape_from_folder(folder: str | Path) -> ModelShape:
    """The shape in a model folder's config.json (a registry checkpoint, a local copy of a hub model)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShapeNotFound(f"{folder}: no config.json (not a Hugging Face model folder)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ShapeNotFound(f"{path}: not readable as JSON: {err}") from None
    return shape_from_config(config, source=str(path))


def hub_cache() -> Path:
    """Where huggingface_hub keeps downloads: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def model_shape(model: str, *, tiny: TinyModelSpec | None = None, cache: Path | None = None) -> ModelShape:
    """The shape of a `model:` value: `tiny`, a local folder, or a hub id whose config.json is in the local
    cache (nothing is downloaded). When none holds it, one line says what to fetch."""
    if model == "tiny":
        return tiny_shape(tiny or TinyModelSpec())
    folder = Path(model).expanduser()
    if folder.is_dir():
        return shape_from_folder(folder)
    repo = (cache or hub_cache()) / ("models--" + model.replace("/", "--"))
    snapshots = repo / "snapshots"
    main = repo / "refs" / "main"
    preferred = [snapshots / main.read_text(encoding="utf-8").strip()] if main.is_file() else []
    for snapshot in preferred + (sorted(snapshots.iterdir()) if snapshots.is_dir() else []):
        if (snapshot / "config.json").is_file():
            return shape_from_folder(snapshot)
    raise ShapeNotFound(f"model '{model}': no config.json in a local folder or in the Hugging Face cache "
                        f"({cache or hub_cache()}); to estimate memory without the weights, download it with "
                        f"`hf download {model} config.json`")


def resolve_shapes(pipeline: Pipeline, stage: str, *, cache: Path | None = None) -> tuple[Shapes, list[str]]:
    """The shapes `stage` needs, and notes on what was assumed."""
    policy = model_shape(pipeline.model, tiny=pipeline.tiny, cache=cache)
    notes = [f"vocabulary {policy.vocab_size}: an upper bound (the tiny tokenizer may have fewer tokens)"] \
        if pipeline.model == "tiny" and not pipeline.tiny.resolved().model_vocab_size else []
    if stage == "sft":
        return Shapes(policy=policy), notes
    init = pipeline.rm.init if pipeline.rm is not None else "sft"
    if init in ("sft", "base"):
        reward = policy
    elif init == "tiny-encoder":
        reward = encoder_shape(pipeline.rm.encoder)
    elif is_entry_id(init):
        reward = policy
        notes.append(f"rm.init {init}: a registry entry, assumed to have the policy's shape")
    else:
        reward = model_shape(init, cache=cache)
    return Shapes(policy=policy, reward=reward), notes
