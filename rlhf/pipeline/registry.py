"""Checkpoint registry: what each stage produced, from which parents, config and data.

    reg = Registry(default_root())                      # $RLHF_HOME, else ./runs
    e = reg.create(stage="sft", pipeline="tiny", roles={"base": base.id}, config=cfg,
                   config_hash=hash_config(cfg), data_fingerprint=fingerprint_files(files), run="my-run")
    ...train into e.path...
    reg.complete(e.id, metrics={"loss": 1.2})

One JSON file per entry in `<root>/registry/<id>.json`; checkpoints in `<root>/<pipeline>/<id>/`.
Written by hand because no maintained library offers make-like, inter-process-safe lineage on plain files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from rlhf.errors import RLHFError
from rlhf.pipeline.order import ROLES, STAGES

STATUSES = ("running", "complete", "failed")
LOCK_TIMEOUT_S = 60.0  # a registry write takes milliseconds; a minute means something is wrong

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # pipeline names: they become folder names
_ENTRY_ID = re.compile(rf"^({'|'.join(STAGES)})-\d{{8}}T\d{{6}}-[0-9a-f]{{6}}$")
_log = logging.getLogger(__name__)


def is_entry_id(text: str) -> bool:
    """True when `text` has the shape of a registry entry id (it may still not exist)."""
    return isinstance(text, str) and bool(_ENTRY_ID.match(text))


class RegistryError(RLHFError):
    """The registry cannot do what was asked; the message says which entry, file or value."""


def default_root() -> Path:
    """`$RLHF_HOME` if set, else `./runs`."""
    home = os.environ.get("RLHF_HOME")
    return Path(home) if home else Path.cwd() / "runs"


def hash_config(config: dict) -> str:
    """Short sha256 of the config as canonical JSON, so key order never changes the hash."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint_files(paths: list[Path]) -> str:
    """Short sha256 over each file's basename, size and bytes, in the order given."""
    digest = hashlib.sha256()
    for path in map(Path, paths):
        try:
            # Name and size go in with separators so that moving bytes between files changes the hash.
            digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        except OSError as err:
            raise RegistryError(f"cannot fingerprint data file {path}: {err.strerror or err}") from err
    return digest.hexdigest()[:16]


def _now() -> datetime:
    """UTC now at second precision (tests replace this to order entries)."""
    return datetime.now(timezone.utc).replace(microsecond=0)


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)  # signal 0 checks existence without touching the process
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists but belongs to another user
    return True


@dataclass(kw_only=True)
class Entry:
    """One stage execution: its output folder, inputs, state and results."""

    id: str  # f"{stage}-{UTC %Y%m%dT%H%M%S}-{6 hex}"
    stage: str  # one of STAGES
    pipeline: str
    status: str  # one of STATUSES
    path: str  # absolute checkpoint folder; a Hugging Face model folder once complete
    parents: list[str] = field(default_factory=list)  # ids of the entries this one was made from (roles' values)
    roles: dict[str, str] = field(default_factory=dict)  # what each parent is to this entry, e.g. {"reward": id}
    round: int = 1  # the round of RLHF (1: the first reward model and PPO; see lineage.py)
    run: str = ""  # the pipeline-run tag shared by the stages of one `make` command (see run_tags.py)
    created_at: str  # ISO-8601 UTC, e.g. "2026-11-23T09:05:12Z"
    updated_at: str = ""
    config_hash: str = ""  # hash_config of `config`; with data_fingerprint and parents, the make-like key
    data_fingerprint: str = ""
    config: dict = field(default_factory=dict)  # the resolved stage config
    metrics: dict = field(default_factory=dict)  # final metrics, str -> number or str
    info: dict = field(default_factory=dict)  # free-form facts, e.g. {"mode": "lora"}
    error: str | None = None  # why it failed
    pid: int | None = None  # process that owns a running entry
    host: str | None = None  # host of that process
    attempts: int = 1  # starts, counting resumes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Entry:
        """Build from a parsed file: unknown keys are ignored, missing optional keys get defaults, and entries
        written before roles, rounds and run tags were fields get them from where they were kept."""
        d = _migrate(d)
        fields = dataclasses.fields(cls)
        names = {f.name for f in fields}
        missing = [f.name for f in fields if f.name not in d
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise RegistryError(f"registry entry {d.get('id', '?')!r} lacks {', '.join(missing)}")
        entry = cls(**{k: v for k, v in d.items() if k in names})
        entry.updated_at = entry.updated_at or entry.created_at
        return entry


@dataclass(frozen=True)
class Garbage:
    """A folder `rlhf registry gc` may remove, and why."""

    entry_id: str | None  # None: a folder with no registry entry
    path: Path
    reason: str
    bytes: int


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


class Registry:
    """Entries under one root folder, safe to share between processes on one file system."""

    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser().absolute()
        self._dir = self.root / "registry"
        self._lock = FileLock(str(self._dir / ".lock"), timeout=LOCK_TIMEOUT_S)

    # -- writing ----------------------------------------------------------------------------------

    def create(self, *, stage: str, pipeline: str, config: dict, config_hash: str, data_fingerprint: str,
               roles: dict[str, str] | None = None, parents: list[str] | None = None, round: int = 1,
               run: str = "", info: dict | None = None) -> Entry:
        """Record a new running execution owned by this process and make its checkpoint folder. Parents are
        given by role (`roles`); `parents` alone (no roles) is for tests and tools."""
        if stage not in STAGES:
            raise RegistryError(f"unknown stage {stage!r}: expected one of {', '.join(STAGES)}")
        roles = dict(roles or {})
        unknown = sorted(set(roles) - set(ROLES))
        if unknown:
            raise RegistryError(f"unknown parent role {', '.join(unknown)}: expected one of {', '.join(ROLES)}")
        parents = parents_of(roles) if roles else list(parents or [])
        if not SAFE_NAME.match(pipeline) or ".." in pipeline:
            raise RegistryError(
                f"pipeline name {pipeline!r} is not safe as a folder name: use letters, digits, '.', '_' "
                "and '-', start with a letter or digit, at most 100 characters, no '..'"
            )
        for parent in parents:
            self._check_id(parent)
        with self._locked():
            now = _now()
            while True:  # ids carry 24 random bits; a clash is rare, so just draw again
                entry_id = f"{stage}-{now.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
                path = self.root / pipeline / entry_id
                if not self._file(entry_id).exists() and not path.exists():
                    break
            try:
                path.mkdir(parents=True)
            except OSError as err:
                raise RegistryError(f"cannot make checkpoint folder {path}: {err}") from err
            entry = Entry(
                id=entry_id, stage=stage, pipeline=pipeline, status="running", path=str(path),
                parents=parents, roles=roles, round=round, run=run, created_at=_iso(now), updated_at=_iso(now),
                config_hash=config_hash, data_fingerprint=data_fingerprint, config=config,
                info=dict(info or {}), pid=os.getpid(), host=socket.gethostname(),
            )
            self._write(entry)
        return entry

    def update(self, entry_id: str, **fields: Any) -> Entry:
        """Set the named Entry fields (read-modify-write under the lock) and bump updated_at."""
        allowed = {f.name for f in dataclasses.fields(Entry)} - {"id"}
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise RegistryError(f"cannot update {', '.join(unknown)} of registry entry {entry_id!r}")
        if "status" in fields and fields["status"] not in STATUSES:
            raise RegistryError(f"unknown status {fields['status']!r}: expected one of {', '.join(STATUSES)}")

        def assign(entry: Entry) -> None:
            for name, value in fields.items():
                setattr(entry, name, value)

        return self._modify(entry_id, assign)

    def update_metrics(self, entry_id: str, metrics: dict) -> Entry:
        """Merge `metrics` into the entry's metrics under the lock, so concurrent writers lose nothing."""
        return self._modify(entry_id, lambda e: e.metrics.update(metrics))

    def complete(self, entry_id: str, *, metrics: dict) -> Entry:
        """Mark the execution finished: its folder now holds the checkpoint."""

        def finish(entry: Entry) -> None:
            _log_attempt(entry, outcome="complete")
            entry.status, entry.metrics, entry.pid, entry.error = "complete", metrics, None, None

        return self._modify(entry_id, finish)

    def fail(self, entry_id: str, *, error: str) -> Entry:
        """Mark the execution failed with a reason; find_resumable can then offer it again."""

        def mark(entry: Entry) -> None:
            _log_attempt(entry, outcome=f"failed: {error}")
            entry.status, entry.error, entry.pid = "failed", error, None

        return self._modify(entry_id, mark)

    def claim(self, entry_id: str) -> Entry:
        """Take over a failed or abandoned entry to resume it in this process."""

        def take(entry: Entry) -> None:
            if entry.status == "complete":
                raise RegistryError(f"registry entry {entry_id!r} is complete; nothing to resume")
            mine = entry.pid == os.getpid() and entry.host == socket.gethostname()
            if self.is_alive(entry) and not mine:
                raise RegistryError(
                    f"registry entry {entry_id!r} is still running as pid {entry.pid} on {entry.host}; "
                    "stop that process, or mark the entry failed if it is gone"
                )
            if entry.status == "running":  # its owner died without a word: killed, or the machine went down
                _log_attempt(entry, outcome="killed: its process ended without finishing")
            entry.status, entry.error = "running", None
            entry.pid, entry.host = os.getpid(), socket.gethostname()
            entry.attempts += 1

        return self._modify(entry_id, take)

    # -- reading ----------------------------------------------------------------------------------

    def get(self, entry_id: str) -> Entry:
        """The entry with that id; the id is checked before it becomes a file name."""
        self._check_id(entry_id)
        path = self._file(entry_id)
        if not path.exists():
            raise RegistryError(f"no registry entry {entry_id!r} in {self.root}")
        return self._read(path)

    def entries(self, *, pipeline: str | None = None, stage: str | None = None,
                status: str | None = None) -> list[Entry]:
        """Matching entries, oldest first; unreadable files are skipped with a warning."""
        found = []
        for path in sorted(self._dir.glob("*.json")):  # temp files end in .tmp and never match
            try:
                entry = self._read(path)
            except RegistryError as err:
                _log.warning("skipping %s", err)
                continue
            if pipeline not in (None, entry.pipeline) or stage not in (None, entry.stage):
                continue
            if status not in (None, entry.status):
                continue
            found.append(entry)
        return sorted(found, key=lambda e: (e.created_at, e.id))

    def find_complete(self, *, stage: str, pipeline: str, config_hash: str, data_fingerprint: str,
                      parents: list[str]) -> Entry | None:
        """Newest complete entry made from exactly these inputs: the stage is up to date."""
        done = self.entries(stage=stage, pipeline=pipeline, status="complete")
        same = [e for e in done if _same_inputs(e, config_hash, data_fingerprint, parents)]
        return same[-1] if same else None

    def find_resumable(self, *, stage: str, pipeline: str, config_hash: str, data_fingerprint: str,
                       parents: list[str]) -> Entry | None:
        """Newest unfinished entry with exactly these inputs whose owner is gone (see is_alive)."""
        candidates = [
            e for e in self.entries(stage=stage, pipeline=pipeline)
            if e.status != "complete" and not self.is_alive(e)
            and _same_inputs(e, config_hash, data_fingerprint, parents)
        ]
        return candidates[-1] if candidates else None

    def is_alive(self, entry: Entry) -> bool:
        """Running and its owner process exists. On another host we cannot check, so assume it does."""
        if entry.status != "running":
            return False
        if entry.host != socket.gethostname():
            return True
        return _pid_alive(entry.pid)

    # -- garbage ----------------------------------------------------------------------------------

    def garbage(self) -> list[Garbage]:
        """Folders that no complete entry needs: failed attempts, abandoned ones (owner process gone on
        this host) and entry-shaped folders the registry does not know (a crash between mkdir and write)."""
        found, known = [], set()
        for entry in self.entries():
            known.add(Path(entry.path))
            if entry.status == "failed":
                reason = f"failed: {entry.error or 'no reason recorded'}"
            elif entry.status == "running" and entry.host == socket.gethostname() and not _pid_alive(entry.pid):
                reason = "abandoned: its process is gone"
            else:
                continue
            folder = Path(entry.path)
            found.append(Garbage(entry_id=entry.id, path=folder, reason=reason, bytes=_size(folder)))
        for folder in sorted(self.root.glob("*/*")):
            if folder.is_dir() and _ENTRY_ID.match(folder.name) and folder not in known:
                found.append(Garbage(entry_id=None, path=folder, reason="not in the registry", bytes=_size(folder)))
        return found

    def remove_garbage(self, item: Garbage) -> None:
        """Delete a garbage folder and, for an entry, its registry file. A complete entry is never touched."""
        with self._locked():
            if item.entry_id is not None:
                entry = self.get(item.entry_id)
                if entry.status == "complete" or self.is_alive(entry):
                    raise RegistryError(f"registry entry {entry.id} is {entry.status}; gc removes only failed or "
                                        "abandoned attempts")
                self._file(entry.id).unlink()
            if item.path.is_relative_to(self.root) and item.path.is_dir():
                shutil.rmtree(item.path)

    # -- files ------------------------------------------------------------------------------------

    def _check_id(self, entry_id: str) -> None:
        if not isinstance(entry_id, str) or not _ENTRY_ID.match(entry_id):
            raise RegistryError(
                f"{entry_id!r} is not a registry entry id: expected <stage>-<UTC time>-<6 hex>, "
                "e.g. sft-20261123T090512-a1b2c3"
            )

    def _file(self, entry_id: str) -> Path:
        return self._dir / f"{entry_id}.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the inter-process lock; a timeout becomes an error naming the lock file."""
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        except Timeout as err:
            raise RegistryError(f"registry lock {self._lock.lock_file} held by another process for over "
                                f"{LOCK_TIMEOUT_S:.0f} s; is a stage stuck?") from err
        except OSError as err:
            raise RegistryError(f"cannot lock the registry in {self._dir}: {err}") from err
        try:
            yield
        finally:
            self._lock.release()

    def _modify(self, entry_id: str, change: Callable[[Entry], Any]) -> Entry:
        with self._locked():
            entry = self.get(entry_id)
            change(entry)
            entry.updated_at = _iso(_now())
            self._write(entry)
        return entry

    def _read(self, path: Path) -> Entry:
        try:
            return Entry.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, AttributeError, RegistryError) as err:
            raise RegistryError(f"registry file {path} is unreadable: {err}") from err

    def _write(self, entry: Entry) -> None:
        """Write atomically: temp file, fsync, rename over, fsync the folder (a crash leaves old or new)."""
        target = self._file(entry.id)
        try:
            text = json.dumps(entry.to_dict(), indent=2, sort_keys=True, default=str)
        except (TypeError, ValueError) as err:
            raise RegistryError(f"registry entry {entry.id!r} holds a value JSON cannot store: {err}") from err
        fd, tmp = tempfile.mkstemp(dir=self._dir, prefix=f".{entry.id}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            dir_fd = os.open(self._dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as err:
            raise RegistryError(f"cannot write registry file {target}: {err}") from err
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _log_attempt(entry: Entry, *, outcome: str) -> None:
    """Record how the current attempt ended in `info.attempt_log` (one item per attempt, oldest first)."""
    log = [item for item in entry.info.get("attempt_log", []) if isinstance(item, dict)]
    if any(item.get("attempt") == entry.attempts for item in log):
        return  # this attempt's end is already recorded
    log.append({"attempt": entry.attempts, "pid": entry.pid, "host": entry.host, "ended_at": _iso(_now()),
                "outcome": outcome})
    entry.info = {**entry.info, "attempt_log": log}


def parents_of(roles: dict[str, str]) -> list[str]:
    """The parent ids of an entry, in role order, each once (round 1's PPO has the SFT policy as both its
    `policy` and its `reference`)."""
    return list(dict.fromkeys(roles.values()))


def _migrate(d: dict) -> dict:
    """An entry file as this version writes it. Before 2026-11-29 the round and run tag were kept in `info`
    and a parent's role was its place in `parents`, which each stage filled in its own order."""
    if not isinstance(d, dict) or all(key in d for key in ("roles", "round", "run")):
        return d
    info, parents = d.get("info") or {}, list(d.get("parents") or [])
    d = {**d, "round": d.get("round", int(info.get("round", 1))), "run": d.get("run", info.get("run", ""))}
    if "roles" not in d:
        d["roles"] = _old_roles(d.get("stage"), parents, info)
    return d


def _old_roles(stage: str | None, parents: list[str], info: dict) -> dict[str, str]:
    if not parents:
        return {}
    if stage == "collect":
        return {"policy": parents[0]}
    if stage == "rm":  # [the model it started from, the collected pairs of its round]
        return {"base": parents[0], **({"comparisons": parents[1]} if len(parents) > 1 else {})}
    if stage == "ppo":  # round 1: [sft, rm]; later rounds: [start, rm, reference], each once
        policy = info.get("start") or info.get("sft") or parents[0]
        reward = info.get("rm") or (parents[1] if len(parents) > 1 else parents[0])
        return {"policy": policy, "reward": reward, "reference": info.get("reference") or info.get("sft") or policy}
    return {"base": parents[0]}


def _same_inputs(entry: Entry, config_hash: str, data_fingerprint: str, parents: list[str]) -> bool:
    return (entry.config_hash, entry.data_fingerprint, list(entry.parents)) == (
        config_hash, data_fingerprint, list(parents)
    )
