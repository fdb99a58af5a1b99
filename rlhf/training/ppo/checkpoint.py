"""Resumable PPO checkpoints: accelerate's state (models, optimiser, scheduler, RNG of every process), each
process's minibatch-order generator, and our own step state, written last so that a checkpoint without it is known
to be incomplete. A resumed run continues exactly as the uninterrupted one would have (tested on the CPU)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from rlhf.pipeline.checkpoints import STATE_FILE, last_checkpoint


@dataclass(frozen=True)
class LoopState:
    step: int  # PPO steps done
    prompt_position: int  # prompts consumed by the stream (all processes)
    kl_controller: dict
    episodes: int
    train_seconds: float  # time spent in the loop so far, for episodes/s across resumes
    alarms: dict | None = None  # the alarm watch (rlhf/core/alarms.py); None in checkpoints made before 2026-11-30


def save(accelerator: Accelerator, folder: Path, state: LoopState, *, shuffle: torch.Generator) -> Path:
    """Write checkpoint-<step> under `folder` and drop older ones once it is complete."""
    target = folder / f"checkpoint-{state.step}"
    accelerator.save_state(str(target))
    # accelerate keeps the global RNG of every process; the minibatch order has a generator of its own per process.
    torch.save(shuffle.get_state(), target / _shuffle_file(accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = target / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
        os.replace(tmp, target / STATE_FILE)
        for older in folder.glob("checkpoint-*"):
            if older != target:
                shutil.rmtree(older, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def load_latest(accelerator: Accelerator, folder: Path, *, shuffle: torch.Generator, seed: int) -> LoopState | None:
    """Restore the newest complete checkpoint into the prepared objects and the generator (`seed`: the one it was
    made with); None when there is none."""
    found = last_checkpoint(folder)
    if found is None:
        return None
    accelerator.load_state(str(found))
    state = LoopState(**json.loads((found / STATE_FILE).read_text(encoding="utf-8")))
    saved = found / _shuffle_file(accelerator.process_index)
    if saved.is_file():
        shuffle.set_state(torch.load(saved, weights_only=True))
    else:  # written before 2026-11-29, or by another process count: a fresh order, seeded by the step
        shuffle.manual_seed(seed + 7919 * state.step)
    return state


def _shuffle_file(rank: int) -> str:
    return f"minibatch_order_{rank}.pt"
