"""The few multi-process facts a stage needs: which process writes, and agreeing on one value.

Under `accelerate launch` every process runs the stage; only the main one touches the registry,
builds the base model or saves files, and the others wait for it and read what it decided.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as torch_dist
from accelerate import PartialState

from rlhf.errors import StageError


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


def decide(compute: Callable[[], Any]) -> Any:
    """`compute()` run on the main process, its result on every process. An error there is raised on every
    process: the others would otherwise wait forever for a broadcast that never comes."""
    if world_size() == 1:
        return compute()
    outcome: dict = {"value": None, "error": None}
    failure: BaseException | None = None
    if is_main():
        try:
            outcome["value"] = compute()
        except Exception as err:  # noqa: BLE001 -- re-raised below, after the others are told
            failure, outcome["error"] = err, str(err) or type(err).__name__
    box = [outcome if is_main() else None]
    torch_dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    if box[0]["error"] is not None:
        raise StageError(f"the main process stopped: {box[0]['error']}")
    return box[0]["value"]
