"""Weights & Biases set-up that never blocks: offline without an API key, off with WANDB_MODE=disabled.

Each stage execution is one wandb run (group = pipeline run, job_type = stage). The trainer's wandb
callback finds the run already started and logs into it.

Tracking never stops training (issue #14): a server that does not answer within seconds means offline
logging, with one warning that gives the `wandb sync` command to upload later, and any failure of a wandb
call (start, log, artifact, finish) is one warning, after which wandb is off for the rest of the stage.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROBE_TIMEOUT_S = 5.0  # the pre-flight's request to the server
INIT_TIMEOUT_S = 30.0  # wandb.init online (wandb's default is 90 s); then offline
FINISH_TIMEOUT_S = 120.0  # uploading at the end (wandb's default waits forever); the rest stays on disk to sync
UNREACHABLE = "RLHF_WANDB_UNREACHABLE"  # set by the pre-flight, read by the stage processes it starts
_state: dict[str, Any] = {"off": False, "sync_dir": None, "job_type": "stage"}  # this process's current run


def wandb_mode() -> str:
    """`disabled`, `offline` or `online`: the user's WANDB_MODE wins; no API key means offline."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("disabled", "offline", "online", "dryrun"):
        return "offline" if mode == "dryrun" else mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    return "offline"


def server_url() -> str:
    """The wandb server this process would talk to: WANDB_BASE_URL, else wandb's default."""
    url = os.environ.get("WANDB_BASE_URL", "").strip()
    if url:
        return url.rstrip("/")
    import wandb

    return wandb.Settings().base_url


def check_server(*, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Online only: ask the wandb server for any answer within `timeout` seconds. When none comes, this process
    and those it starts log offline (WANDB_MODE=offline) and the stage's run says so; returns why, else None."""
    if wandb_mode() != "online":
        return None
    url = server_url()
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # the server answered, if only with an error status
    except Exception as err:  # noqa: BLE001 -- refused, timed out, no route, no such host, bad URL
        reason = getattr(err, "reason", err)  # urllib wraps the socket's error
        go_offline(f"{url}: " + (f"no answer within {timeout:g} s" if isinstance(reason, TimeoutError)
                                 else _first_line(reason)))
        return os.environ[UNREACHABLE]
    return None


def go_offline(reason: str) -> None:
    """Log offline from now on, in this process and those it starts, remembering why for the stage's warning."""
    os.environ["WANDB_MODE"] = "offline"
    os.environ[UNREACHABLE] = reason


def start_run(*, project: str, group: str, job_type: str, name: str, config: dict[str, Any],
              folder: Path, resume_id: str | None = None) -> str | None:
    """Start this stage's wandb run, or continue run `resume_id` (a resumed stage); returns its id
    (None when disabled, or when wandb could not start even offline)."""
    _state.update(off=False, sync_dir=None, job_type=job_type)
    mode = wandb_mode()
    if mode == "disabled":
        return None
    os.environ["WANDB_MODE"] = mode  # the trainer callback reads the environment too
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb  # imported late: it is slow to import and unused when disabled

    folder.mkdir(parents=True, exist_ok=True)
    settings = wandb.Settings(console="off", x_disable_stats=True, init_timeout=INIT_TIMEOUT_S,
                              finish_timeout=FINISH_TIMEOUT_S, finish_timeout_raises=True)

    def init(mode: str):
        return wandb.init(project=project, group=group, job_type=job_type, name=name, config=config,
                          dir=str(folder), mode=mode, id=resume_id, resume="allow" if resume_id else None,
                          settings=settings)

    run = None
    if mode == "online":
        try:
            run = init("online")
        except Exception as err:  # noqa: BLE001 -- CommError, timeouts, auth: all mean "log offline instead"
            go_offline(f"{server_url()}: {_first_line(err)}")
    if run is None:
        with _guarded("start offline"):
            run = init("offline")
    if run is None:
        return None
    _state["sync_dir"] = run.settings.sync_dir
    if os.environ.get(UNREACHABLE):
        print(f"{job_type}: warning: wandb cannot reach its server ({os.environ[UNREACHABLE]}); logging offline, "
              f"upload later with: wandb sync {run.settings.sync_dir}", flush=True)
    return run.id


@contextmanager
def _guarded(action: str) -> Iterator[None]:
    """A wandb call that fails becomes one warning and turns wandb off for the rest of the stage: training and
    the registry come first."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 -- wandb raises many types, and none may stop a stage
        if not _state["off"]:  # one warning per stage
            sync = f"; what was logged is in {_state['sync_dir']}, for `wandb sync`" if _state["sync_dir"] else ""
            print(f"{_state['job_type']}: warning: wandb {action} failed ({_first_line(err)}); wandb is off for the "
                  f"rest of this stage{sync}", flush=True)
        _state["off"] = True


def _off() -> bool:
    return _state["off"] or wandb_mode() == "disabled"


def _first_line(err: object) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text and text != "<no message>" else type(err).__name__  # wandb's empty CommError


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
    if wandb_mode() != "online" or _state["off"]:
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
    if _off():
        return
    import wandb

    if wandb.run is not None:
        with _guarded("summary"):
            wandb.run.summary.update(metrics)


def finish(*, failed: bool = False) -> None:
    if wandb_mode() == "disabled":  # after a failure too: the run is closed if it can be
        return
    import wandb

    if wandb.run is not None:
        with _guarded("finish"):
            wandb.finish(exit_code=1 if failed else 0)


def log(metrics: dict[str, Any], *, step: int) -> None:
    """Log one step's metrics to the current run (stages that run their own loop, such as PPO)."""
    if _off():
        return
    import wandb

    if wandb.run is not None:
        with _guarded("log"):
            wandb.log(metrics, step=step)


def log_table(name: str, *, columns: list[str], rows: list[list[Any]], step: int) -> None:
    """Log a table (sample completions) to the current run."""
    if _off():
        return
    import wandb

    if wandb.run is not None:
        with _guarded("log"):
            wandb.log({name: wandb.Table(columns=columns, data=rows)}, step=step)
