"""Model cases on the tiny model: what `model:` may name, the training modes, pad tokens, precision, counts.

    .venv/bin/python -m pytest -q tests/test_models.py
"""

from __future__ import annotations

import socket

import pytest
import torch
from peft import LoraConfig, TaskType
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rlhf.errors import ConfigError, ModelError
from rlhf.pipeline.config import DataSource, LoraSettings, SFTStage
from rlhf.training.models import (
    PAD_TOKEN,
    ModelRef,
    ensure_pad_token,
    freeze_all_but_top,
    load_causal_lm,
    parameter_counts,
    prepare_mode,
    resolve_model_ref,
    resolve_precision,
)
from rlhf.training.tiny import TinyModelSpec, build_model, build_tokenizer

TEXTS = [f"Describe the {c} {a}.\nthe {a} is {adj}." for c in ("red", "grey", "young")
         for a in ("fox", "owl", "cat", "goat") for adj in ("kind", "brave", "calm")]
SPEC = TinyModelSpec()  # hidden 64, MLP 256, 4 layers, 4 query and 4 key/value heads, tied head

# Parameters of one Llama decoder layer at SPEC's sizes (no biases):
#   attention q, k, v, o: 4 * 64 * 64    = 16,384
#   MLP gate, up, down:   3 * 64 * 256   = 49,152
#   two RMSNorm weights:  2 * 64         =    128
LAYER_PARAMS = 16_384 + 49_152 + 128  # 65,664
FINAL_NORM_PARAMS = 64


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture
def model(tokenizer):
    return build_model(SPEC, tokenizer, seed=0)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network touched: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def stage(**kwargs) -> SFTStage:
    return SFTStage(dataset=DataSource(path="x.jsonl"), lora=LoraSettings(r=4, alpha=8), **kwargs)


# ---- what `model:` may name --------------------------------------------------------------------------


def test_tiny_is_its_own_kind():
    assert resolve_model_ref("tiny", where="p.yaml") == ModelRef("tiny", "tiny")


def test_a_saved_model_folder_resolves_to_its_absolute_path(tmp_path, monkeypatch, model, tokenizer):
    folder = tmp_path / "base"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_ref("base", where="p.yaml") == ModelRef("folder", str(folder.resolve()))
    assert resolve_model_ref(str(folder), where="p.yaml") == ModelRef("folder", str(folder.resolve()))


def test_a_folder_without_config_json_is_named(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=f"p.yaml: model folder {folder} has no config.json"):
        resolve_model_ref(str(folder), where="p.yaml")


def test_a_hub_id_is_taken_as_it_is_without_the_network(tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)  # no folder of that name can shadow it
    assert resolve_model_ref("Qwen/Qwen2.5-0.5B", where="p.yaml") == ModelRef("hub", "Qwen/Qwen2.5-0.5B")
    assert resolve_model_ref("gpt2", where="p.yaml") == ModelRef("hub", "gpt2")


@pytest.mark.parametrize("value", ["./missing-dir", "not a model!", "../x", "/no/such/folder", "a/b/c", "org/x..y"])
def test_a_value_that_is_neither_folder_nor_hub_id_is_named(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="p.yaml: model .* is neither 'tiny', an existing model folder, nor a hub id"):
        resolve_model_ref(value, where="p.yaml")


# ---- training modes ------------------------------------------------------------------------------------


def trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_top_1_of_4_layers_trains_only_layer_3_and_the_final_norm(model):
    freeze_all_but_top(model, 1)
    # Layer 3 holds 9 tensors (q, k, v, o, gate, up, down and two norms); above it sits the final norm.
    layer_3 = {name for name, _ in model.named_parameters() if name.startswith("model.layers.3.")}
    assert len(layer_3) == 9
    assert trainable_names(model) == layer_3 | {"model.norm.weight"}
    # The head is the embedding matrix itself, so freezing the embeddings freezes the head too.
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.lm_head.weight.requires_grad
    trainable, _ = parameter_counts(model)
    assert trainable == LAYER_PARAMS + FINAL_NORM_PARAMS  # 65,664 + 64 = 65,728


def test_an_untied_head_trains_with_the_top_layers(tokenizer):
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    freeze_all_but_top(model, 2)
    assert model.lm_head.weight.requires_grad
    assert not model.model.embed_tokens.weight.requires_grad
    assert not any(name.startswith("model.layers.0.") for name in trainable_names(model))
    assert any(name.startswith("model.layers.1.") for name in trainable_names(model))


def test_more_top_layers_than_the_model_has_is_named(model):
    with pytest.raises(ConfigError, match="top_n_layers is 5 but the model has only 4 layers"):
        freeze_all_but_top(model, 5)


def test_lora_mode_returns_the_stage_adapter_and_freezes_nothing(model):
    config = prepare_mode(model, stage(mode="lora"), task_type=TaskType.CAUSAL_LM)
    assert isinstance(config, LoraConfig)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.0)
    assert config.target_modules == "all-linear"  # PEFT's shorthand is a string, not a one-item list
    assert config.task_type == TaskType.CAUSAL_LM
    assert all(p.requires_grad for p in model.parameters())  # the TRL trainer wraps and freezes


def test_lora_mode_passes_named_target_modules(model):
    settings = LoraSettings(r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    config = prepare_mode(model, SFTStage(dataset=DataSource(path="x.jsonl"), mode="lora", lora=settings),
                          task_type=TaskType.SEQ_CLS)
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    assert config.task_type == TaskType.SEQ_CLS


def test_top_n_mode_freezes_and_full_mode_leaves_everything_trainable(tokenizer):
    full, top = build_model(SPEC, tokenizer, seed=0), build_model(SPEC, tokenizer, seed=0)
    assert prepare_mode(full, stage(mode="full"), task_type=TaskType.CAUSAL_LM) is None
    assert all(p.requires_grad for p in full.parameters())
    assert prepare_mode(top, stage(mode="top_n", top_n_layers=2), task_type=TaskType.CAUSAL_LM) is None
    assert parameter_counts(top)[0] == 2 * LAYER_PARAMS + FINAL_NORM_PARAMS  # 131,328 + 64 = 131,392


# ---- pad token -----------------------------------------------------------------------------------------


def tokenizer_without_pad() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with an EOS token and no pad token, as many hub base models ship."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(TEXTS, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|eos|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|eos|>")


def small_model(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("pad", ["none", "eos"])
def test_a_missing_or_eos_pad_gets_a_new_token_and_the_embeddings_grow(pad):
    tokenizer = tokenizer_without_pad()
    if pad == "eos":
        tokenizer.pad_token = tokenizer.eos_token
    assert tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id
    vocab = len(tokenizer)
    model = small_model(vocab)

    ensure_pad_token(tokenizer, model)

    # One token is added, at the end of the vocabulary: its id is the old size.
    assert tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.pad_token_id == vocab != tokenizer.eos_token_id
    assert len(tokenizer) == vocab + 1
    assert model.get_input_embeddings().weight.shape[0] == vocab + 1
    assert model.get_output_embeddings().weight.shape[0] == vocab + 1
    assert model.config.pad_token_id == vocab
    assert model.generation_config.pad_token_id == vocab
    padded = tokenizer(["<|eos|>", "the fox<|eos|>"], padding=True)["input_ids"]
    assert padded[0][-1] == vocab and padded[1][-1] == tokenizer.eos_token_id  # EOS stays EOS


def test_a_distinct_pad_is_kept_and_recorded_in_the_config(tokenizer, model):
    vocab, pad_id = len(tokenizer), tokenizer.pad_token_id
    model.config.pad_token_id = None
    ensure_pad_token(tokenizer, model)
    assert len(tokenizer) == vocab
    assert model.get_input_embeddings().weight.shape[0] == vocab
    assert model.config.pad_token_id == pad_id


# ---- precision -----------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers; this machine has CUDA")
def test_precision_on_a_machine_without_cuda():
    assert resolve_precision("auto") == (False, False)
    assert resolve_precision("fp32") == (False, False)
    for half in ("bf16", "fp16"):
        with pytest.raises(ConfigError, match=f"precision {half} needs a GPU and none is visible"):
            resolve_precision(half)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_precision_on_a_cuda_machine():
    assert resolve_precision("bf16") == (True, False)
    assert resolve_precision("fp16") == (False, True)
    assert resolve_precision("fp32") == (False, False)


def test_a_checkpoint_saved_in_bf16_loads_in_fp32_unless_asked(tmp_path, model, tokenizer):
    """Hub checkpoints are mostly stored in bf16, and transformers 5 keeps that dtype by default; trained in bf16
    an update of 3e-6 to a weight of 0.02 is rounded away. Trainable weights load in fp32 (the master copy)."""
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    weight = torch.full((1,), 0.02, dtype=torch.bfloat16)
    assert torch.equal(weight + 3e-6, weight)  # why it matters
    loaded = load_causal_lm(str(tmp_path), trust_remote_code=False)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    frozen = load_causal_lm(str(tmp_path), trust_remote_code=False, dtype=torch.bfloat16)
    assert {p.dtype for p in frozen.parameters()} == {torch.bfloat16}


# ---- parameter counts ----------------------------------------------------------------------------------


def test_tied_weights_are_counted_once(model, tokenizer):
    # Embeddings V * 64, four layers, the final norm; the tied head adds nothing.
    embeddings = len(tokenizer) * 64
    expected = embeddings + 4 * LAYER_PARAMS + FINAL_NORM_PARAMS  # 64 V + 262,656 + 64
    assert parameter_counts(model) == (expected, expected)
    # Counting the state dict instead would see the tied matrix twice (embed_tokens and lm_head).
    assert sum(t.numel() for t in model.state_dict().values()) == expected + embeddings
    untied = LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "tie_word_embeddings": False}))
    assert parameter_counts(untied) == (expected + embeddings, expected + embeddings)


# ---- safetensors only --------------------------------------------------------------------------------

def save_pickled(model, folder):
    """A model folder as older checkpoints ship it: config.json and a pickled pytorch_model.bin."""
    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")


def test_a_folder_with_pickled_weights_is_refused_unless_allowed(tmp_path, model, tokenizer):
    safe, pickled = tmp_path / "safe", tmp_path / "pickled"
    model.save_pretrained(safe)  # safetensors
    save_pickled(model, pickled)
    assert (pickled / "pytorch_model.bin").is_file() and not list(safe.glob("*.bin"))
    assert load_causal_lm(str(safe), trust_remote_code=False).config.vocab_size == model.config.vocab_size
    with pytest.raises(ModelError, match=r"holds pickle files \(pytorch_model.bin\).*allow_pickle: true"):
        load_causal_lm(str(pickled), trust_remote_code=False)
    (safe / "optimizer.pt").write_bytes(b"")  # any pickle beside safetensors weights is refused too
    with pytest.raises(ModelError, match=r"optimizer.pt"):
        load_causal_lm(str(safe), trust_remote_code=False)
    loaded = load_causal_lm(str(pickled), trust_remote_code=False, allow_pickle=True)  # the user's explicit choice
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_a_pipeline_on_a_pickled_base_model_exits_2_with_one_line(tmp_path, model, tokenizer, capsys, monkeypatch):
    from rlhf.cli import main

    folder = tmp_path / "pickled"
    save_pickled(model, folder)
    tokenizer.save_pretrained(folder)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(f'{{"prompt": "p{i}", "completion": "c{i}"}}\n' for i in range(4)))
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"name: pickled\nmodel: {folder}\nsft: {{dataset: {data}, max_steps: 1}}\n")
    assert main(["sft", "--pipeline", str(pipeline)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pytorch_model.bin" in err[0] and "allow_pickle" in err[0]
