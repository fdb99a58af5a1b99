"""Weights & Biases set-up that never blocks: offline without an API key, off with WANDB_MODE=disabled.

Each stage execution is one wandb run (group = pipeline run, job_type = stage). The trainer's wandb
callback finds the run already started and logs into it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def wandb_mode() -> str:
    """`disabled`, `offline` or `online`: the user's WANDB_MODE wins; no API key means offline."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("disabled", "offline", "online", "dryrun"):
        return "offline" if mode == "dryrun" else mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    return "offline"


def report_to() -> list[str]:
    """The `report_to` value for transformers' trainers."""
    return [] if wandb_mode() == "disabled" else ["wandb"]


def start_run(*, project: str, group: str, job_type: str, name: str, config: dict[str, Any],
              folder: Path, resume_id: str | None = None) -> str | None:
    """Start this stage's wandb run, or continue run `resume_id` (a resumed stage); returns its id
    (None when disabled)."""
    mode = wandb_mode()
    if mode == "disabled":
        return None
    os.environ["WANDB_MODE"] = mode  # the trainer callback reads the environment too
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb  # imported late: it is slow to import and unused when disabled

    folder.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, group=group, job_type=job_type, name=name, config=config,
                     dir=str(folder), mode=mode, id=resume_id, resume="allow" if resume_id else None,
                     settings=wandb.Settings(console="off", x_disable_stats=True))
    return run.id


@dataclass(frozen=True)
class Checkpoint:
    """What a wandb artifact needs to know of a registry entry."""

    id: str
    stage: str
    pipeline: str
    path: str  # a folder, or a hub id for a base model that was never copied


def log_lineage(output: Checkpoint, *, inputs: list[Checkpoint]) -> bool:
    """Online only: log the checkpoint as a wandb artifact by reference (no copy of the weights) and
    declare its parents' artifacts as inputs, so that wandb's lineage graph shows base -> sft -> rm -> ppo.

    Offline runs cannot hold artifacts, so this is skipped there; a failure is a warning, never an error.
    Returns whether the artifacts were logged.
    """
    if wandb_mode() != "online":
        return False
    import wandb

    if wandb.run is None:
        return False
    try:
        for parent in inputs:  # same name and reference as when the parent logged it: the same version
            wandb.run.use_artifact(reference_artifact(parent))
        wandb.run.log_artifact(reference_artifact(output), aliases=["latest", output.stage])
    except Exception as err:  # noqa: BLE001 -- lineage is a convenience; the checkpoint is already saved
        print(f"{output.stage}: warning: wandb artifacts not logged: {err}")
        return False
    return True


def reference_artifact(checkpoint: Checkpoint):
    """An artifact named by the registry id that points at the checkpoint folder (or hub page)."""
    import wandb

    artifact = wandb.Artifact(name=checkpoint.id, type="model",
                              metadata={"stage": checkpoint.stage, "pipeline": checkpoint.pipeline})
    folder = Path(checkpoint.path)
    uri = folder.resolve().as_uri() if folder.is_absolute() else f"https://huggingface.co/{checkpoint.path}"
    artifact.add_reference(uri, checksum=False)  # no hashing of gigabytes of weights; versioned by path
    return artifact


def log_summary(metrics: dict[str, Any]) -> None:
    if wandb_mode() == "disabled":
        return
    import wandb

    if wandb.run is not None:
        wandb.run.summary.update(metrics)


def finish(*, failed: bool = False) -> None:
    if wandb_mode() == "disabled":
        return
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)


def log(metrics: dict[str, Any], *, step: int) -> None:
    """Log one step's metrics to the current run (stages that run their own loop, such as PPO)."""
    if wandb_mode() == "disabled":
        return
    import wandb

    if wandb.run is not None:
        wandb.log(metrics, step=step)


def log_table(name: str, *, columns: list[str], rows: list[list[Any]], step: int) -> None:
    """Log a table (sample completions) to the current run."""
    if wandb_mode() == "disabled":
        return
    import wandb

    if wandb.run is not None:
        wandb.log({name: wandb.Table(columns=columns, data=rows)}, step=step)
