"""The few multi-process facts a stage needs: which process writes, and agreeing on one value.

Under `accelerate launch` every process runs the stage; only the main one touches the registry,
builds the base model or saves files, and the others wait for it and read what it decided.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as torch_dist
from accelerate import PartialState


def state() -> PartialState:
    # cpu=True on a machine without CUDA: processes started by `accelerate launch` (torchrun) then join
    # one gloo group instead of each running alone.
    return PartialState(cpu=not torch.cuda.is_available())


def is_main() -> bool:
    return state().is_main_process


def world_size() -> int:
    return state().num_processes


def barrier() -> None:
    if world_size() > 1:
        state().wait_for_everyone()


def share(value: Any) -> Any:
    """The main process's `value`, on every process (JSON-able or picklable values)."""
    if world_size() == 1:
        return value
    box = [value if is_main() else None]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]
