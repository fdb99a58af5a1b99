"""Models: resolve `model:` to a registered base, load and save checkpoints, apply full/LoRA/top-N modes."""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, Trainer

from rlhf.errors import ConfigError, ModelError
from rlhf.pipeline.config import LoraSettings, TrainStage

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
PAD_TOKEN = "<|pad|>"
ARGS_PICKLE = "training_args.bin"  # what Trainer.save_model writes beside the weights


@dataclass(frozen=True)
class ModelRef:
    kind: str  # "tiny" | "folder" | "hub"
    value: str  # "tiny", an absolute folder path, or a hub id


def resolve_model_ref(model: str, *, where: str) -> ModelRef:
    """Tell a `model:` value apart: `tiny`, an existing folder, or a hub id; anything else is an error."""
    if model == "tiny":
        return ModelRef("tiny", "tiny")
    folder = Path(model).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{where}: model folder {folder} has no config.json (not a Hugging Face model folder)")
        return ModelRef("folder", str(folder.resolve()))
    if model.startswith((".", "/", "~")) or not _HUB_ID.match(model) or ".." in model:
        raise ConfigError(f"{where}: model '{model}' is neither 'tiny', an existing model folder, "
                          f"nor a hub id like Qwen/Qwen2.5-0.5B")
    return ModelRef("hub", model)


def load_tokenizer(path: str, *, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # hub and file errors come in many types
        raise ModelError(f"could not load the tokenizer of '{path}': {err}") from None
    return tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Give the tokenizer a pad token distinct from EOS (padding with EOS masks real EOS tokens out)."""
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # never shrink a padded vocabulary
            model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # torch.load/pickle formats


def refuse_pickles(path: str) -> None:
    """A local model folder holding pickle files is refused: unpickling can run any code. Safetensors only."""
    folder = Path(path)
    if not folder.is_dir():
        return
    found = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    if found:
        raise ModelError(f"model folder {folder} holds pickle files ({', '.join(found)}), which can run code when "
                         "loaded; use safetensors weights, or set `allow_pickle: true` in the pipeline file if you "
                         "trust them")


def load_model(auto_class: type, path: str, *, trust_remote_code: bool, allow_pickle: bool = False,
               dtype: torch.dtype = torch.float32, **kwargs) -> PreTrainedModel:
    """Load weights with `auto_class` (AutoModelForCausalLM, AutoModelForSequenceClassification, ...):
    safetensors only, unless `allow_pickle`.

    In fp32 unless `dtype` says otherwise: transformers 5 would keep the checkpoint's own dtype (bf16 for most
    hub models), and an optimiser stepping bf16 weights rounds updates below ~1/256 of a weight away (at lr
    3e-6 nearly all of them). Mixed precision computes in bf16 with these fp32 weights as the master copy."""
    if not allow_pickle:
        refuse_pickles(path)
    try:
        return auto_class.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=dtype,
                                          use_safetensors=None if allow_pickle else True, **kwargs)
    except Exception as err:
        hint = "" if allow_pickle else " (only safetensors weights are loaded unless `allow_pickle: true`)"
        raise ModelError(f"could not load model '{path}' with {auto_class.__name__}: {err}{hint}") from None


def load_causal_lm(path: str, *, trust_remote_code: bool, allow_pickle: bool = False,
                   dtype: torch.dtype = torch.float32, **kwargs) -> PreTrainedModel:
    return load_model(AutoModelForCausalLM, path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                      dtype=dtype, **kwargs)


def load_policy(path: str, *, trust_remote_code: bool,
                allow_pickle: bool = False) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """A causal LM (fp32) and its tokenizer, with a pad token distinct from EOS: what every stage that trains or
    samples a policy starts from."""
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    model = load_causal_lm(path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    ensure_pad_token(tokenizer, model)
    return tokenizer, model


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; `parameters()` yields a shared (tied) tensor once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def decoder_layers(model: PreTrainedModel) -> tuple[str, torch.nn.ModuleList]:
    """The stack of transformer blocks: the ModuleList whose length is config.num_hidden_layers."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return name, module
    raise ModelError(f"cannot find the {n} transformer layers of {type(model).__name__} for mode top_n")


def freeze_all_but_top(model: PreTrainedModel, n_layers: int) -> None:
    """Train only the last `n_layers` blocks and what sits above them (final norm, untied head).

    Embeddings stay frozen, and so does an output head tied to them.
    """
    prefix, layers = decoder_layers(model)
    if n_layers > len(layers):
        raise ConfigError(f"top_n_layers is {n_layers} but the model has only {len(layers)} layers")
    first_trained = len(layers) - n_layers
    for name, param in model.named_parameters():
        if name.startswith(prefix + "."):
            index = int(name[len(prefix) + 1:].split(".")[0])
            param.requires_grad = index >= first_trained
        else:
            param.requires_grad = "embed" not in name and "wte" not in name and "wpe" not in name


def prepare_mode(model: PreTrainedModel, stage: TrainStage, *, task_type: TaskType) -> LoraConfig | None:
    """Apply the stage's training mode; for LoRA return the adapter config for the TRL trainer to wrap."""
    if stage.mode == "top_n":
        freeze_all_but_top(model, stage.top_n_layers)
    return lora_config(stage.lora, task_type=task_type) if stage.mode == "lora" else None


def lora_config(settings: LoraSettings, *, task_type: TaskType) -> LoraConfig:
    """PEFT's adapter config from a stage's `lora` section (`all-linear` is PEFT's own shorthand, passed alone)."""
    targets = settings.target_modules
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=targets[0] if targets == ["all-linear"] else targets, task_type=task_type)


def save_final(trainer: Trainer, folder: Path) -> None:
    """Write a loadable Hugging Face folder (safetensors) from the main process. A LoRA model saves
    its adapter in `folder/adapter` and the merged weights in `folder` itself."""
    if not isinstance(trainer.model, PeftModel):
        trainer.save_model(str(folder))  # gathers sharded (FSDP/ZeRO) weights; writes on the main process
    else:
        trainer.save_model(str(folder / "adapter"))
        # Every process takes part in gathering the whole weights (the trained model may hold shards only);
        # the main one merges the adapter into a copy built from them.
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        if trainer.is_world_process_zero():
            with whole_models(trainer.accelerator):
                merged = lora_copy(trainer.model, state).merge_and_unload()
            merged.save_pretrained(folder, safe_serialization=True)
            trainer.processing_class.save_pretrained(folder)
    for leftover in (folder / ARGS_PICKLE, folder / "adapter" / ARGS_PICKLE):
        leftover.unlink(missing_ok=True)  # the trainer pickles its arguments; a checkpoint holds no pickle


def default_device() -> torch.device:
    """The GPU when there is one (a stage that runs outside accelerate's placement), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def mixed_precision(precision: str) -> str:
    """accelerate's name for a stage's precision: `bf16`, `fp16` or `no`."""
    bf16, fp16 = resolve_precision(precision)
    return "bf16" if bf16 else "fp16" if fp16 else "no"


def resolve_precision(precision: str) -> tuple[bool, bool]:
    """(bf16, fp16) for the trainer. `auto` picks bf16 on a GPU that has it, fp32 otherwise."""
    has_cuda = torch.cuda.is_available()
    if precision == "auto":  # native bf16 only: older GPUs (V100, T4) emulate it, far slower than fp32
        return has_cuda and torch.cuda.is_bf16_supported(including_emulation=False), False
    if precision in ("bf16", "fp16") and not has_cuda:
        raise ConfigError(f"precision {precision} needs a GPU and none is visible; use precision: auto or fp32")
    return precision == "bf16", precision == "fp16"


@contextmanager
def whole_models(accelerator) -> Iterator[None]:
    """Models built inside are whole and initialised on every process (`accelerator`: the run's Accelerator).

    - ZeRO-3: transformers builds every model already partitioned (accelerate registers the DeepSpeed config
      with it, whatever `zero3_init_flag` says), a collective step: the frozen reference and reward model, which
      never pass through `deepspeed.initialize`, would be left empty, and a model built on the main process
      alone (saving) would wait for the others forever.
    - FSDP with `cpu_ram_efficient_loading`: transformers leaves weights missing from a checkpoint (a value
      model's new head) on the meta device on every process but the first, expecting FSDP to broadcast them;
      the frozen models are never prepared. accelerate still loads the prepared model from the first process.
    The policy and value model load whole too, and `prepare` shards them."""
    with environment(FSDP_CPU_RAM_EFFICIENT_LOADING="false"):
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if plugin is None:
            yield
            return
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            plugin.set_deepspeed_weakref()


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """Environment variables set to `values` for the duration, then restored (or removed) as they were."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def lora_copy(model: PeftModel, state: dict[str, torch.Tensor]) -> PeftModel:
    """A CPU copy of a LoRA model made from `state`, its whole weights as accelerate gathers them for saving: the
    live model may hold shards only (FSDP, ZeRO-3), which merging in place cannot use, and it stays untouched.
    Build it inside `whole_models` (under ZeRO-3 a model built on one process alone would wait for the others)."""
    base = model.get_base_model()
    with torch.device("meta"):  # shapes only; the weights come from `state`
        skeleton = type(base)(copy.deepcopy(base.config))
    copied = get_peft_model(skeleton, copy.deepcopy(model.peft_config[model.active_adapter]))
    copied.load_state_dict({k: v.detach().to("cpu", copy=True) for k, v in state.items()}, strict=True, assign=True)
    copied.get_base_model().tie_weights()  # assign=True gave tied matrices a tensor each
    return copied
