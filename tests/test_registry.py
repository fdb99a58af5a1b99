"""Registry cases on tiny inputs: transitions, lookups, crash safety and concurrent writers.

    .venv/bin/python -m pytest -q tests/test_registry.py
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlhf.pipeline import lineage
from rlhf.pipeline import registry as registry_module
from rlhf.pipeline.registry import (
    STAGES,
    Entry,
    Registry,
    RegistryError,
    default_root,
    fingerprint_files,
    hash_config,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clock(monkeypatch):
    """Each registry call sees a clock one second later, so 'newest' is never a tie within a second."""
    times = (datetime(2026, 11, 23, 9, 5, 12, tzinfo=timezone.utc) + timedelta(seconds=i) for i in range(10**6))
    monkeypatch.setattr(registry_module, "_now", lambda: next(times))


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(tmp_path / "runs")


def make(reg: Registry, *, stage="sft", pipeline="tiny", parents=(), config=None, data="d0", info=None) -> Entry:
    config = config if config is not None else {"lr": 1e-4}
    return reg.create(stage=stage, pipeline=pipeline, parents=list(parents), config=config,
                      config_hash=hash_config(config), data_fingerprint=data, info=info)


def dead_pid() -> int:
    """A pid that was just used by a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- transitions ----------------------------------------------------------------------------------


def test_create_records_a_running_entry_with_its_folder_and_file(reg):
    e = make(reg, info={"mode": "lora"})
    assert e.status == "running" and e.pid == os.getpid() and e.host == socket.gethostname()
    assert e.attempts == 1 and e.error is None
    assert e.id.startswith("sft-20261123T090512-") and len(e.id) == len("sft-20261123T090512-a1b2c3")
    assert e.created_at == e.updated_at == "2026-11-23T09:05:12Z"
    assert Path(e.path) == reg.root / "tiny" / e.id and Path(e.path).is_dir()
    on_disk = json.loads((reg.root / "registry" / f"{e.id}.json").read_text())
    assert on_disk == e.to_dict()
    assert reg.get(e.id) == e


def test_complete_and_fail_transitions(reg):
    a, b = make(reg), make(reg)
    done = reg.complete(a.id, metrics={"eval_loss": 1.5})
    assert (done.status, done.pid, done.metrics) == ("complete", None, {"eval_loss": 1.5})
    assert done.updated_at > done.created_at
    failed = reg.fail(b.id, error="CUDA out of memory")
    assert (failed.status, failed.error) == ("failed", "CUDA out of memory")
    assert reg.get(a.id) == done and reg.get(b.id) == failed


def test_claim_resumes_a_failed_entry_and_refuses_complete_or_live_ones(reg):
    e = make(reg)
    reg.fail(e.id, error="killed")
    claimed = reg.claim(e.id)
    assert (claimed.status, claimed.error, claimed.attempts, claimed.pid) == ("running", None, 2, os.getpid())
    other = make(reg)
    reg.update(other.id, pid=1)  # pid 1 always exists, so another live process owns the entry
    with pytest.raises(RegistryError, match="still running as pid 1"):
        reg.claim(other.id)
    reg.complete(e.id, metrics={})
    with pytest.raises(RegistryError, match="is complete"):
        reg.claim(e.id)


def test_attempt_log_shows_each_attempt_and_how_it_ended(reg):
    e = make(reg)
    reg.update(e.id, pid=2**22 + 12345)  # a process that does not exist: the first attempt was killed
    reg.claim(e.id)
    reg.fail(reg.get(e.id).id, error="no space left on device")
    reg.claim(e.id)
    done = reg.complete(e.id, metrics={})
    log = done.info["attempt_log"]
    assert [(i["attempt"], i["outcome"]) for i in log] == [
        (1, "killed: its process ended without finishing"), (2, "failed: no space left on device"), (3, "complete")]
    assert done.attempts == 3 and log[0]["pid"] == 2**22 + 12345


def test_gc_lists_and_removes_failed_abandoned_and_orphaned_folders_only(reg):
    done = make(reg)
    reg.complete(done.id, metrics={})
    failed = make(reg)
    reg.fail(failed.id, error="boom")
    dead = make(reg)
    reg.update(dead.id, pid=2**22 + 12345)
    live = make(reg)  # owned by this (live) process
    orphan = reg.root / "p" / "sft-20261123T090000-abcdef"  # a folder the registry does not know
    orphan.mkdir(parents=True)
    (Path(failed.path) / "weights").write_bytes(b"x" * 1000)
    found = reg.garbage()
    assert {(g.entry_id, g.reason) for g in found} == {
        (failed.id, "failed: boom"), (dead.id, "abandoned: its process is gone"), (None, "not in the registry")}
    assert {g.path for g in found} == {Path(failed.path), Path(dead.path), orphan}
    assert next(g for g in found if g.entry_id == failed.id).bytes >= 1000
    for item in found:
        reg.remove_garbage(item)
    assert not Path(failed.path).exists() and not Path(dead.path).exists() and not orphan.exists()
    assert Path(done.path).exists() and Path(live.path).exists()
    assert {e.id for e in reg.entries()} == {done.id, live.id}  # the registry stays readable
    with pytest.raises(RegistryError, match="complete"):
        reg.remove_garbage(type(found[0])(entry_id=done.id, path=Path(done.path), reason="x", bytes=0))


def test_update_refuses_unknown_fields_and_statuses(reg):
    e = make(reg)
    with pytest.raises(RegistryError, match="cannot update colour"):
        reg.update(e.id, colour="red")
    with pytest.raises(RegistryError, match="unknown status 'done'"):
        reg.update(e.id, status="done")


# -- names and ids --------------------------------------------------------------------------------


def test_get_of_a_missing_id_names_it_and_the_root(reg):
    missing = "sft-20261123T090512-abcdef"
    with pytest.raises(RegistryError, match=f"no registry entry '{missing}' in {reg.root}"):
        reg.get(missing)


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "sft-20261123T090512-abcdef/../../etc", "", "/etc/passwd"])
def test_bad_ids_are_refused_before_touching_files(reg, bad):
    with pytest.raises(RegistryError, match="is not a registry entry id"):
        reg.get(bad)
    with pytest.raises(RegistryError, match="is not a registry entry id"):
        make(reg, parents=[bad])


@pytest.mark.parametrize("bad", ["../evil", "a/b", "..", "a..b", ".hidden", "", "x" * 101, "sp ace"])
def test_bad_pipeline_names_are_refused(reg, bad):
    with pytest.raises(RegistryError, match="pipeline name"):
        make(reg, pipeline=bad)
    assert not (reg.root / "registry").exists() or reg.entries() == []


def test_every_stage_can_be_registered(reg):
    assert {make(reg, stage=s).stage for s in STAGES} == set(STAGES)


def test_unknown_stage_is_refused(reg):
    with pytest.raises(RegistryError, match="unknown stage 'kto'"):
        make(reg, stage="kto")


def test_default_root_prefers_rlhf_home(monkeypatch, tmp_path):
    monkeypatch.delenv("RLHF_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_root() == tmp_path / "runs"
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home"


# -- lookups --------------------------------------------------------------------------------------


def test_latest_returns_the_newest_complete_entry_of_that_stage_and_pipeline(reg):
    assert lineage.newest(reg, stage="sft", pipeline="tiny") is None
    old = reg.complete(make(reg).id, metrics={})
    new = reg.complete(make(reg).id, metrics={})
    reg.fail(make(reg).id, error="boom")  # newer, but failed
    make(reg)  # newer still, but running
    reg.complete(make(reg, stage="rm").id, metrics={})  # other stage
    reg.complete(make(reg, pipeline="other").id, metrics={})  # other pipeline
    assert lineage.newest(reg, stage="sft", pipeline="tiny") == new
    assert [e.id for e in reg.entries(stage="sft", pipeline="tiny", status="complete")] == [old.id, new.id]
    assert lineage.newest(reg, stage="ppo", pipeline="tiny") is None


def test_entries_are_oldest_first_and_filtered(reg):
    made = [make(reg, stage=s) for s in ("rm", "sft", "rm")]
    assert [e.id for e in reg.entries()] == [e.id for e in made]
    assert [e.id for e in reg.entries(stage="rm")] == [made[0].id, made[2].id]
    assert reg.entries(pipeline="nope") == [] and reg.entries(status="complete") == []


def test_find_complete_matches_only_identical_inputs(reg):
    base = reg.complete(make(reg, stage="base").id, metrics={})
    cfg = {"lr": 1e-4, "epochs": 1}
    key = dict(stage="sft", pipeline="tiny", config_hash=hash_config(cfg), data_fingerprint="d0", parents=[base.id])
    assert reg.find_complete(**key) is None
    running = make(reg, config=cfg, parents=[base.id])
    assert reg.find_complete(**key) is None  # running entries are never up to date
    done = reg.complete(running.id, metrics={})
    assert reg.find_complete(**key) == done
    assert reg.find_complete(**{**key, "config_hash": hash_config({**cfg, "lr": 2e-4})}) is None
    assert reg.find_complete(**{**key, "data_fingerprint": "d1"}) is None
    assert reg.find_complete(**{**key, "parents": []}) is None
    assert reg.find_complete(**{**key, "parents": [base.id, base.id]}) is None
    failed = make(reg, config=cfg, parents=[base.id])
    reg.fail(failed.id, error="x")
    assert reg.find_complete(**key) == done  # a newer failed attempt does not hide the good one


def test_find_complete_compares_parents_in_order(reg):
    a = reg.complete(make(reg, stage="sft").id, metrics={})
    b = reg.complete(make(reg, stage="rm").id, metrics={})
    ppo = reg.complete(make(reg, stage="ppo", parents=[a.id, b.id]).id, metrics={})
    key = dict(stage="ppo", pipeline="tiny", config_hash=ppo.config_hash, data_fingerprint="d0")
    assert reg.find_complete(**key, parents=[a.id, b.id]) == ppo
    assert reg.find_complete(**key, parents=[b.id, a.id]) is None


def test_find_resumable_offers_failed_and_orphaned_entries_only(reg):
    key = dict(stage="sft", pipeline="tiny", config_hash=hash_config({"lr": 1e-4}), data_fingerprint="d0", parents=[])
    mine = make(reg)
    assert reg.is_alive(mine)
    assert reg.find_resumable(**key) is None  # this live process owns it

    orphan = reg.update(mine.id, pid=dead_pid())
    assert not reg.is_alive(orphan)
    assert reg.find_resumable(**key) == orphan

    elsewhere = reg.update(mine.id, pid=dead_pid(), host="another-host.invalid")
    assert reg.is_alive(elsewhere)  # we cannot check another host, so assume it still runs
    assert reg.find_resumable(**key) is None

    failed = reg.fail(mine.id, error="killed")
    assert reg.find_resumable(**key) == failed
    assert reg.find_resumable(**{**key, "data_fingerprint": "d1"}) is None
    reg.complete(mine.id, metrics={})
    assert reg.find_resumable(**key) is None


def test_lineage_base_sft_rm_ppo_is_recorded_and_readable(reg):
    base = reg.complete(make(reg, stage="base", parents=[]).id, metrics={})
    sft = reg.complete(make(reg, stage="sft", parents=[base.id]).id, metrics={})
    rm = reg.complete(make(reg, stage="rm", parents=[sft.id]).id, metrics={})
    ppo = reg.complete(make(reg, stage="ppo", parents=[sft.id, rm.id]).id, metrics={})

    def ancestry(entry_id: str) -> list[str]:
        entry = Registry(reg.root).get(entry_id)  # a fresh instance reads only what is on disk
        return [entry.stage] + [stage for p in entry.parents for stage in ancestry(p)]

    assert ancestry(ppo.id) == ["ppo", "sft", "base", "rm", "sft", "base"]
    assert reg.get(rm.id).parents == [sft.id]


# -- files ----------------------------------------------------------------------------------------


def test_a_crash_mid_write_keeps_the_previous_file_and_leaves_no_entry_behind(reg, monkeypatch):
    e = make(reg)
    file = reg.root / "registry" / f"{e.id}.json"
    before = file.read_text()

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(RegistryError, match=f"cannot write registry file {file}"):
        reg.complete(e.id, metrics={"eval_loss": 0.1})
    monkeypatch.undo()
    assert file.read_text() == before
    assert reg.get(e.id).status == "running"
    # A temp file left by a process killed mid-write must not be read as an entry.
    (reg.root / "registry" / f".{e.id}.abc123.tmp").write_text(before[: len(before) // 2])
    assert [x.id for x in reg.entries()] == [e.id]
    assert sorted(p.name for p in (reg.root / "registry").iterdir() if p.name != ".lock") == [
        f".{e.id}.abc123.tmp", f"{e.id}.json"]


def test_an_unparseable_file_is_skipped_by_entries_but_named_by_get(reg, caplog):
    good = make(reg)
    broken = "sft-20261123T090599-abcdef"
    (reg.root / "registry" / f"{broken}.json").write_text('{"id": "sft-2026')
    with caplog.at_level(logging.WARNING, logger="rlhf.pipeline.registry"):
        assert [e.id for e in reg.entries()] == [good.id]
    assert f"{broken}.json" in caplog.text
    with pytest.raises(RegistryError, match=f"registry file .*{broken}.json is unreadable"):
        reg.get(broken)


def test_from_dict_ignores_unknown_keys_and_defaults_missing_optional_ones():
    minimal = {"id": "sft-20261123T090512-a1b2c3", "stage": "sft", "pipeline": "tiny", "status": "complete",
               "path": "/x", "created_at": "2026-11-23T09:05:12Z", "added_in_v2": 1}
    e = Entry.from_dict(minimal)
    assert (e.parents, e.metrics, e.error, e.attempts, e.updated_at) == ([], {}, None, 1, e.created_at)
    assert Entry.from_dict(e.to_dict()) == e
    with pytest.raises(RegistryError, match="lacks path"):
        Entry.from_dict({k: v for k, v in minimal.items() if k != "path"})


_WORKER = textwrap.dedent("""
    import sys
    from rlhf.pipeline.registry import Registry
    root, shared, worker = sys.argv[1], sys.argv[2], sys.argv[3]
    reg = Registry(root)
    for i in range(10):
        reg.create(stage="sft", pipeline=f"w{worker}", parents=[], config={"i": i}, config_hash=str(i),
                   data_fingerprint="d")
        reg.update_metrics(shared, {f"w{worker}_{i}": i})
""")


def test_concurrent_writers_lose_nothing(reg):
    shared = make(reg, pipeline="shared")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, str(reg.root), shared.id, str(w)], env=env)
               for w in range(4)]
    assert [p.wait(timeout=60) for p in workers] == [0, 0, 0, 0]
    assert len(reg.entries()) == 1 + 40
    for w in range(4):
        assert len(reg.entries(pipeline=f"w{w}")) == 10
    assert reg.get(shared.id).metrics == {f"w{w}_{i}": i for w in range(4) for i in range(10)}


# -- hashes ---------------------------------------------------------------------------------------

_json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
_configs = st.dictionaries(st.text(max_size=8), st.recursive(
    _json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=10), max_size=6)


def _reversed_keys(value):
    if isinstance(value, dict):
        return {k: _reversed_keys(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reversed_keys(v) for v in value]
    return value


@given(_configs)
def test_hash_config_ignores_key_order_at_every_depth(config):
    assert hash_config(_reversed_keys(config)) == hash_config(config)


def test_hash_config_changes_with_a_value():
    config = {"sft": {"lr": 1e-4, "epochs": 1}, "seed": 0, "out": Path("/x")}
    assert len(hash_config(config)) == 16
    assert hash_config({**config, "seed": 1}) != hash_config(config)
    assert hash_config({**config, "sft": {"lr": 1e-4, "epochs": 2}}) != hash_config(config)


def test_fingerprint_files_changes_with_a_byte_a_name_or_a_boundary(tmp_path):
    size = 3 << 20  # three 1 MiB reads
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(b"x" * size)
    b.write_bytes(b"yz")
    first = fingerprint_files([a, b])
    assert len(first) == 16 and fingerprint_files([a, b]) == first
    a.write_bytes(b"x" * (size - 1) + b"X")  # the last byte of the last chunk
    assert fingerprint_files([a, b]) != first
    a.write_bytes(b"x" * size)
    assert fingerprint_files([a, b]) == first
    assert fingerprint_files([b, a]) != first
    renamed = a.rename(tmp_path / "renamed.jsonl")
    assert fingerprint_files([renamed, b]) != first
    renamed.write_bytes(b"x" * size + b"y")  # the same bytes in all, split between the files differently
    b.write_bytes(b"z")
    renamed.rename(a)
    assert fingerprint_files([a, b]) != first
    with pytest.raises(RegistryError, match="cannot fingerprint data file .*missing.jsonl"):
        fingerprint_files([tmp_path / "missing.jsonl"])

