"""Comparing stage metrics without wandb: run tags, metric histories, `rlhf compare` (table, JSON, CSV,
filters), `rlhf plot`, model cards, and wandb lineage artifacts (online only) on a hand-made registry."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from rlhf.cli import main
from rlhf.errors import ConfigError
from rlhf.pipeline import compare, history, lineage, model_card, run_tags, tracking
from rlhf.pipeline import registry as registry_module
from rlhf.pipeline.registry import Registry


@pytest.fixture(autouse=True)
def clock(monkeypatch):
    """Each registry call sees a clock one second later, so entries never tie on created_at."""
    times = (datetime(2026, 11, 23, 9, 0, 0, tzinfo=timezone.utc) + timedelta(seconds=i) for i in range(10**6))
    monkeypatch.setattr(registry_module, "_now", lambda: next(times))


def add(reg: Registry, stage: str, *, run: str, parents=(), metrics=None, pipeline="tiny", status="complete",
        steps: list[dict] | None = None):
    entry = reg.create(stage=stage, pipeline=pipeline, parents=list(parents), config={"model": "tiny", stage: {}},
                       config_hash=stage + run, data_fingerprint="d", run=run)
    for row in steps or []:
        history.append(entry.path, step=row["step"], metrics={k: v for k, v in row.items() if k != "step"})
    if status == "complete":
        return reg.complete(entry.id, metrics=metrics or {})
    return reg.fail(entry.id, error="killed") if status == "failed" else entry


@pytest.fixture
def reg(registry_home) -> Registry:
    """Two pipeline runs of `tiny` (the second reuses the first's SFT), one of `other`, one failed PPO."""
    reg = Registry(registry_home)
    base = add(reg, "base", run="", metrics={})
    sft = add(reg, "sft", run="r1", parents=[base.id], metrics={"eval/loss": 2.5, "eval/base_loss": 6.0},
              steps=[{"step": 0, "eval/loss": 6.0}, {"step": 10, "train/loss": 4.0}, {"step": 40, "eval/loss": 2.5}])
    rm1 = add(reg, "rm", run="r1", parents=[sft.id], metrics={"eval/accuracy": 0.9, "eval/margin": 2.0},
              steps=[{"step": 10, "train/loss": 0.5, "train/accuracy": 0.7}, {"step": 20, "eval/accuracy": 0.9}])
    add(reg, "ppo", run="r1", parents=[sft.id, rm1.id],
        metrics={"eval/score": 1.2, "eval/kl": 3.0, "eval/gold": 1.5, "eval/sft_gold": -0.2, "eval/gold_gain": 1.7},
        steps=[{"step": s, "objective/score": 0.1 * s, "objective/kl": 0.2 * s, "objective/gold": 0.3 * s}
               for s in range(1, 5)])
    rm2 = add(reg, "rm", run="r2", parents=[sft.id], metrics={"eval/accuracy": 0.92, "eval/margin": 2.2})
    add(reg, "ppo", run="r2", parents=[sft.id, rm2.id], status="failed")
    add(reg, "sft", run="x", pipeline="other", parents=[base.id], metrics={"eval/loss": 3.0})
    return reg


def test_runs_group_by_tag_and_fill_reused_stages_from_the_lineage(reg):
    found = compare.pipeline_runs(reg.entries())
    assert [(r.pipeline, r.run) for r in found] == [("tiny", "r1"), ("tiny", "r2"), ("other", "x")]
    r1, r2, _ = found
    assert {s: r.reused for s, r in r1.stages.items()} == {"sft": False, "rm": False, "ppo": False}
    assert r1.stages["ppo"].metrics["eval/gold_gain"] == 1.7
    # r2 trained only an RM (its PPO failed): the SFT comes through the RM's parent, marked reused.
    assert set(r2.stages) == {"sft", "rm"} and r2.stages["sft"].reused and not r2.stages["rm"].reused
    assert r2.stages["sft"].id == r1.stages["sft"].id


def test_filters(reg):
    assert [r.run for r in compare.pipeline_runs(reg.entries(), pipeline="tiny")] == ["r1", "r2"]
    assert [r.run for r in compare.pipeline_runs(reg.entries(), stage="ppo")] == ["r1"]
    assert [r.run for r in compare.pipeline_runs(reg.entries(), stage="sft")] == ["r1", "x"]  # r2 reused its SFT
    assert [r.run for r in compare.pipeline_runs(reg.entries(), last=2)] == ["r2", "x"]


def test_compare_cli_table_json_and_csv(reg, capsys):
    assert main(["compare", "--pipeline", "tiny"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:5] == ["pipeline", "run", "round", "sft", "eval/loss"]
    assert "collect" not in table[0] and "previous_rm_accuracy" not in table[0]  # no round 2 here: no columns
    r1 = next(line for line in table if line.startswith("tiny") and " r1 " in line).split()
    assert r1[:5] == ["tiny", "r1", "1", "2.5", "6"] and "1.7" in r1
    r2 = next(line for line in table if " r2 " in line).split()
    assert r2[3] == "2.5*" and "0.92" in r2 and r2[-1] == "-"  # reused SFT starred; no PPO
    assert table[-1].startswith("* ")

    assert main(["compare", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["run"] for d in data] == ["r1", "r2", "x"]
    assert data[0]["stages"]["rm"] == {"id": data[0]["stages"]["rm"]["id"], "reused": False,
                                       "metrics": {"eval/accuracy": 0.9, "eval/margin": 2.0}}

    assert main(["compare", "--csv", "--stage", "rm"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["run"], r["rm eval/accuracy"]) for r in rows] == [("r1", "0.9"), ("r2", "0.92")]
    assert "sft eval/loss" not in rows[0]

    assert main(["compare", "--last", "0"]) == 2
    assert "--last" in capsys.readouterr().err


def test_compare_perf_view_shows_speed_and_memory_not_learning(reg, capsys):
    fast = add(reg, "sft", run="r3", parents=[reg.entries(stage="base")[0].id],
               metrics={"eval/loss": 2.0, "train/tokens_per_s": 1234.5, "train/peak_memory_mb": 512.0})
    add(reg, "ppo", run="r3", parents=[fast.id], metrics={"train/episodes_per_s": 70.0, "train/generate_share": 0.6,
                                                            "eval/gold": 1.0})
    assert main(["compare", "--perf", "--pipeline", "tiny", "--last", "1"]) == 0
    out = capsys.readouterr().out
    for needle in ("sft train/tokens_per_s", "1234", "ppo train/generate_share", "0.6", "70"):
        assert needle in out, out
    assert "eval/loss" not in out and "eval/gold" not in out
    [run] = compare.pipeline_runs(reg.entries(), pipeline="tiny", last=1, view="perf")
    assert run.stages["sft"].metrics == {"train/tokens_per_s": 1234.5, "train/peak_memory_mb": 512.0}


def test_compare_on_an_empty_registry(capsys):
    assert main(["compare"]) == 0
    assert "no complete stage entries" in capsys.readouterr().out


def test_plot_writes_a_png_into_the_run_folder(reg, capsys):
    assert main(["plot", "--run", "r1"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == reg.root / "tiny" / "run-r1" / "stages.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000  # six drawn panels
    assert main(["plot", "--run", "nope"]) == 2
    assert "no run 'nope'" in capsys.readouterr().err


def test_history_names_truncation_and_torn_lines(tmp_path):
    assert history.wandb_names({"loss": 1.0, "eval_accuracy": 0.5, "objective/kl": 2.0}) == {
        "train/loss": 1.0, "eval/accuracy": 0.5, "objective/kl": 2.0}
    for step in (1, 2, 3):
        history.append(tmp_path, step=step, metrics={"x": float(step), "bad": float("nan"), "skip": [1]})
    with open(history.path_of(tmp_path), "a") as f:
        f.write('{"step": 4, "x"')  # a kill in the middle of a write
    assert [r["step"] for r in history.read(tmp_path)] == [1, 2, 3]
    assert history.read(tmp_path)[0] == {"step": 1, "x": 1.0, "bad": None}  # NaN kept valid JSON; lists dropped
    history.truncate_after(tmp_path, step=2)
    assert [r["step"] for r in history.read(tmp_path)] == [1, 2]
    assert history.read(tmp_path / "missing") == []


def test_run_tags(monkeypatch, reg):
    assert run_tags.check_tag("lr-sweep_1.2", where="x") == "lr-sweep_1.2"
    for bad in ("../x", "/abs", "a/b", "", "-x", "a" * 65, "a..b"):
        with pytest.raises(ConfigError, match="run tag"):
            run_tags.check_tag(bad, where="--run")
    sft = lineage.newest(reg, stage="sft", pipeline="tiny")
    base = reg.get(sft.parents[0])
    monkeypatch.delenv(run_tags.ENV, raising=False)
    assert run_tags.resolve([sft]) == "r1"  # inherited from the parent
    assert run_tags.resolve([base]) != ""  # a base entry has no run: a new tag
    monkeypatch.setenv(run_tags.ENV, "mine")
    assert run_tags.resolve([sft]) == "mine"
    monkeypatch.setenv(run_tags.ENV, "../escape")
    with pytest.raises(ConfigError, match=r"\$RLHF_RUN"):
        run_tags.resolve([sft])


def test_model_card_says_what_where_from_metrics_and_how_to_load(reg):
    ppo_entry = lineage.newest(reg, stage="ppo", pipeline="tiny")
    parents = [reg.get(p) for p in ppo_entry.parents]
    text = model_card.render(ppo_entry, parents=parents, metrics={"eval/gold": 1.5, "note": "x|y"})
    assert text.startswith(f"# tiny · ppo · {ppo_entry.id}")
    for needle in ("| pipeline run | r1 |", f"`{parents[0].id}`", f"`{parents[1].id}`", "| `eval/gold` | 1.5 |",
                   "x\\|y", "AutoModelForCausalLM.from_pretrained(FOLDER)", "value_model"):
        assert needle in text
    path = model_card.write(ppo_entry, parents=parents, metrics={})
    assert path == Path(ppo_entry.path) / "README.md" and path.read_text().startswith("# tiny")


class FakeRun:
    def __init__(self):
        self.used, self.logged = [], []

    def use_artifact(self, artifact):
        self.used.append(artifact)

    def log_artifact(self, artifact, aliases):
        self.logged.append((artifact, aliases))


def test_lineage_artifacts_by_reference_online_and_skipped_offline(monkeypatch, tmp_path):
    import wandb

    checkpoint = tracking.Checkpoint(id="ppo-20261123T090000-abcdef", stage="ppo", pipeline="tiny",
                                     path=str(tmp_path))
    parents = [tracking.Checkpoint(id="sft-20261123T090000-abcdef", stage="sft", pipeline="tiny", path=str(tmp_path)),
               tracking.Checkpoint(id="base-20261123T090000-abcdef", stage="base", pipeline="tiny",
                                   path="org/model")]
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "config.json").write_text("{}")
    fake = FakeRun()
    monkeypatch.setattr(wandb, "run", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.log_lineage(checkpoint, inputs=parents) is False and not fake.used  # offline: skipped
    monkeypatch.setenv("WANDB_MODE", "online")
    assert tracking.log_lineage(checkpoint, inputs=parents) is True
    assert [a.name for a in fake.used] == [p.id for p in parents]
    (artifact, aliases), = fake.logged
    assert artifact.name == checkpoint.id and aliases == ["latest", "ppo"]
    refs = sorted(e.ref for e in artifact.manifest.entries.values())
    folder = tmp_path.resolve().as_uri()
    assert refs == [f"{folder}/config.json", f"{folder}/model.safetensors"]  # references, not copies
    hub = [e.ref for e in fake.used[1].manifest.entries.values()]
    assert hub == ["https://huggingface.co/org/model"]

    def broken(artifact):
        raise ConnectionError("no network")

    fake.use_artifact = broken
    assert tracking.log_lineage(checkpoint, inputs=parents) is False  # a warning, never a failed stage
