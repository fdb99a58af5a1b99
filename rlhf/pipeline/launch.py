"""Run a stage under `accelerate launch` when the pipeline names an accelerate config.

Scale goes through accelerate's own launcher (DDP, DeepSpeed ZeRO, FSDP); this only re-runs the same
`rlhf` command under it, once, and marks the children so they do not launch again.
"""

from __future__ import annotations

import os
import subprocess
import sys

MARK = "RLHF_LAUNCHED"


def already_launched() -> bool:
    """True inside a process started by accelerate/torchrun or by `relaunch`."""
    return MARK in os.environ or "LOCAL_RANK" in os.environ


def relaunch(config_file: str, argv: list[str]) -> int:
    """Run `rlhf <argv>` under `accelerate launch --config_file config_file`; returns its exit code."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file,
               "-m", "rlhf.cli", *argv]
    print("launching: " + " ".join(command[2:]), flush=True)
    return subprocess.call(command, env={**os.environ, MARK: "1"})
