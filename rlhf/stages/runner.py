"""What every stage does around its training: skip when up to date, resume a killed attempt,
mark the registry entry complete only after the checkpoint is saved, failed on any error."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlhf.errors import StageError
from rlhf.pipeline import model_card, runs
from rlhf.pipeline.registry import Entry, Registry
from rlhf.training import dist

CHECKPOINTS = "checkpoints"  # sub-folder of an entry's folder holding resumable trainer checkpoints


@dataclass(frozen=True)
class StageInputs:
    """What identifies a stage execution: same inputs as a complete entry means up to date."""

    stage: str
    pipeline: str
    parents: list[str]
    config: dict
    config_hash: str
    data_fingerprint: str
    info: dict


@dataclass(frozen=True)
class Attempt:
    """The entry this process trains into, and whether it continues an earlier attempt."""

    entry: Entry
    resumed: bool

    @property
    def folder(self) -> Path:
        return Path(self.entry.path)

    @property
    def checkpoints(self) -> Path:
        return self.folder / CHECKPOINTS


Train = Callable[[Attempt], dict]


def run_stage(registry: Registry, inputs: StageInputs, *, force: bool, train: Train,
              keep_checkpoints: bool = False) -> Entry:
    """Run `train` inside a registry entry; it returns the final metrics after saving the model.

    Under several processes the main one decides (skip, resume or create) and the others follow.
    """
    decision = dist.decide(lambda: _decide(registry, inputs, force=force))
    entry = registry.get(decision["id"])
    if decision["up_to_date"]:
        return entry
    attempt = Attempt(entry=entry, resumed=decision["resumed"])

    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        metrics = train(attempt)
    except OSError as err:  # a full disk, an unwritable folder: the user can fix it and resume
        if dist.is_main():
            registry.fail(entry.id, error=f"{type(err).__name__}: {err}")
        raise StageError(f"{inputs.stage}: {err} while training into {attempt.folder}; entry {entry.id} is marked "
                         "failed, earlier checkpoints and entries are untouched; fix it and run the same command "
                         "to resume") from err
    except BaseException as err:
        if dist.is_main():
            registry.fail(entry.id, error=str(err) or type(err).__name__)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    dist.barrier()
    if not dist.is_main():
        return entry
    try:
        model_card.write(registry.get(entry.id), parents=[registry.get(p) for p in inputs.parents],
                         metrics=metrics)
    except OSError as err:
        registry.fail(entry.id, error=f"writing the model card failed: {err}")
        raise StageError(f"{inputs.stage}: cannot write the model card into {attempt.folder}: {err}") from err
    if not keep_checkpoints:
        shutil.rmtree(attempt.checkpoints, ignore_errors=True)
    done = registry.complete(entry.id, metrics=metrics)
    print(f"{inputs.stage}: complete: {done.id} -> {done.path}")
    return done


def _decide(registry: Registry, inputs: StageInputs, *, force: bool) -> dict:
    """Skip (up to date), resume a dead attempt with the same inputs, or create a new entry."""
    key = dict(stage=inputs.stage, pipeline=inputs.pipeline, config_hash=inputs.config_hash,
               data_fingerprint=inputs.data_fingerprint, parents=inputs.parents)
    if not force:
        done = registry.find_complete(**key)
        if done is not None:
            print(f"{inputs.stage}: up to date: {done.id} has the same config, data and parents "
                  f"({done.path}); FORCE=1 retrains")
            return {"id": done.id, "up_to_date": True, "resumed": False}
    for other in registry.entries(stage=inputs.stage, pipeline=inputs.pipeline, status="running"):
        if other.config_hash == inputs.config_hash and registry.is_alive(other):
            raise StageError(f"{inputs.stage}: another process (pid {other.pid}) is already running this stage "
                             f"as {other.id}; wait for it or stop it")
    earlier = registry.find_resumable(**key)
    if earlier is not None and not force:
        entry = registry.claim(earlier.id)
        print(f"{inputs.stage}: resuming {entry.id} (attempt {entry.attempts}) in {entry.path}")
        return {"id": entry.id, "up_to_date": False, "resumed": True}
    if earlier is not None:
        registry.fail(earlier.id, error="superseded by a forced retrain")
    tag = runs.resolve([registry.get(p) for p in inputs.parents])
    entry = registry.create(stage=inputs.stage, pipeline=inputs.pipeline, parents=inputs.parents,
                            config=inputs.config, config_hash=inputs.config_hash,
                            data_fingerprint=inputs.data_fingerprint, info={**inputs.info, "run": tag})
    print(f"{inputs.stage}: new entry {entry.id} in {entry.path} (pipeline run {tag})")
    return {"id": entry.id, "up_to_date": False, "resumed": False}


def _raise_on_sigterm(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")


def require_parent(registry: Registry, *, stage: str, pipeline: str, explicit: str | None,
                   make_target: str) -> Entry:
    """The parent entry: the explicit id if given, else the newest complete `stage` entry of the pipeline."""
    if explicit:
        entry = registry.get(explicit)
        if entry.status != "complete":
            raise StageError(f"parent {explicit} is {entry.status}, not complete; run `{make_target}` to finish it")
        return entry
    entry = registry.latest(stage=stage, pipeline=pipeline)
    if entry is None:
        running = registry.entries(stage=stage, pipeline=pipeline, status="running")
        hint = f" ({running[-1].id} is still running)" if running else ""
        raise StageError(f"no complete {stage} checkpoint for pipeline '{pipeline}'{hint}; "
                         f"run `{make_target}` first")
    return entry
