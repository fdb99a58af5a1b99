"""Run a stage under `accelerate launch` when the pipeline names an accelerate config.

Scale goes through accelerate's own launcher (DDP, DeepSpeed ZeRO, FSDP); this only re-runs the same
`rlhf` command under it, once, and marks the children so they do not launch again. The config files keep
the strategy; the process count is decided here (`Launch`), per machine, and passed as `--num_processes`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from rlhf.errors import ConfigError

MARK = "RLHF_LAUNCHED"


@dataclass(frozen=True)
class Launch:
    """How many processes `accelerate launch` starts, and why that many."""

    config_file: str
    processes: int  # on this machine
    machines: int  # num_machines of the config file; accelerate's --num_processes counts all of them
    reason: str  # where the count came from, for the launch line

    @property
    def total(self) -> int:
        return self.processes * self.machines


def already_launched() -> bool:
    """True inside a process started by accelerate/torchrun or by `relaunch`."""
    return MARK in os.environ or "LOCAL_RANK" in os.environ


def read_config(config_file: str) -> dict:
    """The accelerate config file as a mapping; a missing or unreadable file is an error naming it."""
    path = Path(config_file)
    if not path.is_file():
        shipped = ", ".join(sorted(str(p) for p in Path("accelerate").glob("*.yaml"))) or "none here"
        raise ConfigError(f"accelerate_config file {config_file} not found (shipped configs: {shipped})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"accelerate_config file {config_file}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"accelerate_config file {config_file}: must be a mapping of accelerate settings")
    return data


def wants_gpus(config: dict) -> bool:
    """Whether an accelerate config is meant for GPUs: it names `gpu_ids` or asks for bf16/fp16 mixed precision
    (the shipped ddp, zero2, zero3 and fsdp files), and does not say `use_cpu: true` (accelerate/cpu2.yaml
    names neither, and runs on whatever the machine has)."""
    if config.get("use_cpu") is True:
        return False
    return config.get("gpu_ids") is not None or str(config.get("mixed_precision", "no")) in ("bf16", "fp16")


def relaunch(launch: Launch, argv: list[str]) -> int:
    """Run `rlhf <argv>` under `accelerate launch`; returns its exit code."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", launch.config_file,
               "--num_processes", str(launch.total), "-m", "rlhf.cli", *argv]
    machines = f" on each of {launch.machines} machines" if launch.machines > 1 else ""
    print(f"launching {launch.processes} process(es){machines} ({launch.reason}): " + " ".join(command[2:]),
          flush=True)
    return subprocess.call(command, env={**os.environ, MARK: "1"})
