"""What every stage does around its training: skip when up to date, resume a killed attempt,
mark the registry entry complete only after the checkpoint is saved, failed on any error."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.errors import StageError
from rlhf.pipeline import model_card, run_tags
from rlhf.pipeline.registry import Entry, Registry, parents_of
from rlhf.training import dist

CHECKPOINTS = "checkpoints"  # sub-folder of an entry's folder holding resumable trainer checkpoints


@dataclass(frozen=True)
class StageInputs:
    """What identifies a stage execution: same inputs as a complete entry means up to date."""

    stage: str
    pipeline: str
    roles: dict[str, str]  # parent role -> entry id, e.g. {"policy": sft.id, "reward": rm.id, "reference": sft.id}
    config: dict  # the resolved stage config (hashed)
    config_hash: str
    data_fingerprint: str
    round: int = 1
    info: dict = field(default_factory=dict)  # facts for people (mode, plan, where the backbone came from)

    @property
    def parents(self) -> list[str]:
        return parents_of(self.roles)


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


def run_stage(registry: Registry, inputs: StageInputs, *, force: bool, train: Train, restart: bool = False,
              keep_checkpoints: bool = False) -> Entry:
    """Run `train` inside a registry entry; it returns the final metrics after saving the model.

    Under several processes the main one decides (skip, resume or create) and the others follow.
    """
    decision = dist.decide(lambda: _decide(registry, inputs, force=force, restart=restart))
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


@dataclass(frozen=True)
class Decision:
    """What running a stage with these inputs does: `up_to_date` (nothing; `entry` is the complete entry),
    `resume` (the interrupted attempt `entry`), `busy` (another live process runs `entry`), or `train` (a new
    entry; `superseded` is the interrupted attempt a restart gives up)."""

    action: str
    entry: Entry | None = None
    superseded: Entry | None = None


def decide(registry: Registry, inputs: StageInputs, *, force: bool, restart: bool) -> Decision:
    """Make-like, and side-effect free (`rlhf plan` shows it): a complete entry with the same config, data and
    parents is up to date unless forced; an interrupted attempt with the same inputs resumes, forced or not, since
    a cluster requeues a preempted job with its command line unchanged; only `restart` starts over."""
    key = dict(stage=inputs.stage, pipeline=inputs.pipeline, config_hash=inputs.config_hash,
               data_fingerprint=inputs.data_fingerprint, parents=inputs.parents)
    if not (force or restart):
        done = registry.find_complete(**key)
        if done is not None:
            return Decision("up_to_date", done)
    for other in registry.entries(stage=inputs.stage, pipeline=inputs.pipeline, status="running"):
        if other.config_hash == inputs.config_hash and registry.is_alive(other):
            return Decision("busy", other)
    earlier = registry.find_resumable(**key)
    if earlier is not None and not restart:
        return Decision("resume", earlier)
    return Decision("train", superseded=earlier)


def _decide(registry: Registry, inputs: StageInputs, *, force: bool, restart: bool) -> dict:
    """Carry out `decide`: skip, claim the interrupted attempt, or create the new entry."""
    decision = decide(registry, inputs, force=force, restart=restart)
    if decision.action == "up_to_date":
        done = decision.entry
        print(f"{inputs.stage}: up to date: {done.id} has the same config, data and parents "
              f"({done.path}); FORCE=1 retrains")
        return {"id": done.id, "up_to_date": True, "resumed": False}
    if decision.action == "busy":
        other = decision.entry
        raise StageError(f"{inputs.stage}: another process (pid {other.pid}) is already running this stage "
                         f"as {other.id}; wait for it or stop it")
    if decision.action == "resume":
        entry = registry.claim(decision.entry.id)
        print(f"{inputs.stage}: resuming {entry.id} (attempt {entry.attempts}) in {entry.path}; "
              "RESTART=1 starts over instead")
        return {"id": entry.id, "up_to_date": False, "resumed": True}
    if decision.superseded is not None:
        registry.fail(decision.superseded.id, error="superseded by a restart")
        print(f"{inputs.stage}: restarting: the interrupted attempt {decision.superseded.id} is marked failed")
    tag = run_tags.resolve([registry.get(p) for p in inputs.parents])
    entry = registry.create(stage=inputs.stage, pipeline=inputs.pipeline, roles=inputs.roles, round=inputs.round,
                            run=tag, config=inputs.config, config_hash=inputs.config_hash,
                            data_fingerprint=inputs.data_fingerprint, info=inputs.info)
    print(f"{inputs.stage}: new entry {entry.id} in {entry.path} (pipeline run {tag})")
    return {"id": entry.id, "up_to_date": False, "resumed": False}


def _raise_on_sigterm(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")
