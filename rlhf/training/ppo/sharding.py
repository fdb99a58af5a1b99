"""Whole weights for the rollout and the evaluation when the trained model is sharded (FSDP2, DeepSpeed ZeRO-3).

Generation and the rollout's forward passes call the policy directly (`policy.generate`, the LoRA reference
with its adapter disabled), not through the wrapped module whose hooks would gather its shards; and each
process samples its own prompts, so their generate loops run for different numbers of tokens. Inside
`gathered(model)` every parameter is whole on every process (FSDP2: all groups unsharded and kept so; ZeRO-3:
`deepspeed.zero.GatheredParameters`), and `generate` is told `synced_gpus` so that a process whose responses
ended keeps stepping with the others while any collective could still be pending. Outside it the weights go
back to their shards. Under DDP or a single process this is a no-op.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch import nn

from rlhf.errors import ConfigError

Sharding = Literal["whole", "fsdp2", "zero3"]


def sharding_of(model: nn.Module) -> Sharding:
    """How `model`'s parameters are held: whole, FSDP2 shards, or ZeRO-3 partitions."""
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in model.modules()):
        return "fsdp2"
    if any(hasattr(p, "ds_id") for p in model.parameters()):  # deepspeed's partitioned parameters carry ds_*
        return "zero3"
    return "whole"


def will_shard(accelerator) -> bool:
    """Whether `accelerator` will shard the models it prepares (FSDP, or DeepSpeed ZeRO-3), known before any is
    loaded: generation then runs synced over gathered weights."""
    kind = str(accelerator.distributed_type)
    if kind.endswith("FSDP"):
        return True
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return kind.endswith("DEEPSPEED") and plugin is not None and plugin.zero_stage == 3


def fused_optimiser(accelerator) -> bool:
    """Whether the optimiser may use torch's fused AdamW: whole parameters (one process or DDP) on a CPU or CUDA
    device. DeepSpeed steps its own flattened partitions, FSDP2 DTensor shards: they keep the default."""
    kind = str(accelerator.distributed_type)
    return accelerator.device.type in ("cpu", "cuda") and not kind.endswith(("FSDP", "DEEPSPEED"))


@contextmanager
def gathered(model: nn.Module, *, reshard_after_forward: bool = True) -> Iterator[bool]:
    """Whole parameters on every process for the duration; yields whether generation must be synced
    (`synced_gpus`). Every process must enter it together (it all-gathers). `model` is the prepared model
    (under ZeRO-3 the DeepSpeed engine, whose hooks are lifted meanwhile) or the module it wraps.
    `reshard_after_forward` is what the FSDP2 blocks are set back to on the way out (the root keeps its own
    False)."""
    sharding = sharding_of(model)
    if sharding == "whole":
        yield False
    elif sharding == "fsdp2":
        with _fsdp2_unsharded(model, reshard_after_forward=reshard_after_forward):
            yield True
    else:
        import deepspeed

        if isinstance(model, deepspeed.DeepSpeedEngine):
            # Its hooks would hand each block back to its partitions after every use, and generation would
            # all-gather every block again for every token: they are taken off while the weights are whole.
            with deepspeed.zero.unwrap_model_for_generation(model):
                yield True
        else:
            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                yield True


@contextmanager
def _fsdp2_unsharded(model: nn.Module, *, reshard_after_forward: bool) -> Iterator[None]:
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        # FSDP2 picks its root at the first forward it sees; generation would start in a decoder block, which
        # would then take itself for a root and make the next forward through `model` fail. No public call
        # settles the root, so its (idempotent) lazy initialisation is run here.
        model._get_fsdp_state()._lazy_init()
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)  # forward hooks keep what we gather
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(reshard_after_forward and module is not model, recurse=False)


def check_launch(env: Mapping[str, str]) -> None:
    """Refuse, before anything is written, a launch the PPO stage cannot run: FSDP version 1 (its flat
    parameters need `summon_full_params` for generation, which this stage does not do)."""
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and env.get("FSDP_VERSION", "1") != "2":
        raise ConfigError("the PPO stage runs under FSDP version 2 only: set `fsdp_version: 2` in the accelerate "
                          "config (accelerate/fsdp.yaml does)")


def fsdp_reshard_after_forward(accelerator: Accelerator) -> bool:
    """The FSDP2 `reshard_after_forward` the run was configured with (True when not under FSDP)."""
    value = getattr(getattr(accelerator.state, "fsdp_plugin", None), "reshard_after_forward", True)
    return value if isinstance(value, bool) else True


def configure_deepspeed(accelerator: Accelerator, *, micro_batch_size: int, max_grad_norm: float) -> None:
    """Fill what accelerate cannot guess for DeepSpeed before `prepare`: the micro batch (it reads it from a
    data loader, and PPO has none) and the gradient clipping (DeepSpeed clips inside its own step; 0 turns it
    off). Values a user wrote into a DeepSpeed config file are kept."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    config = plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = max(max_grad_norm, 0.0)


def device_settings(env: Mapping[str, str]) -> dict:
    """Accelerator arguments for the machine: the CPU without CUDA (its processes in one gloo group), except
    under DeepSpeed, which accelerate only enables off the CPU path; without CUDA it then runs on the CPU
    with a gloo group too (how the tests run ZeRO-3)."""
    if torch.cuda.is_available():
        return {}
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return {"cpu": True}
    return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
