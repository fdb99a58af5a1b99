"""The tiny pipeline run offline, as in CI: one wandb run per stage read back from disk (group, job_type,
name, config, metric names, summary), a metric history and a model card in every checkpoint folder, and
`rlhf compare` / `rlhf plot` over the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.cli import main
from rlhf.pipeline import history
from rlhf.pipeline.registry import Registry

REPO = Path(__file__).resolve().parent.parent
WANDB = Path(sys.executable).parent / "wandb"
pytestmark = pytest.mark.slow

SMALL = ["sft.epochs=1", "rm.epochs=1", "rm.max_train_samples=800", "ppo.episodes=128", "ppo.rollout_batch_size=32",
         "ppo.max_eval_prompts=32", "ppo.save_steps=100"]
EXPECTED_NAMES = {  # per stage, metric names that must appear in the wandb history and in history.jsonl
    "sft": {"train/loss", "train/learning_rate", "eval/loss"},
    "rm": {"train/loss", "train/accuracy", "eval/accuracy", "eval/loss"},
    "ppo": {"objective/score", "objective/kl", "objective/gold", "policy/entropy", "policy/approx_kl",
            "policy/clipfrac", "value/clipfrac", "loss/policy", "loss/value", "response/length",
            "charts/learning_rate", "perf/episodes_per_s", "perf/tokens_per_s"},
}


def read_wandb_run(folder: Path) -> dict:
    """The run's records as `wandb leet inspect --json` prints them (wandb 0.31), folded into one dict."""
    out = subprocess.run([str(WANDB), "leet", "inspect", "--json", str(folder)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    run = next(r["run"] for r in records if r["type"] == "run")
    config: dict = {}
    for r in records:
        if r["type"] == "run":
            config.update(r["run"].get("config", {}).get("update", {}))
        elif r["type"] == "config":
            config.update(r["config"].get("update", {}))
    summary: dict = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    names = {k for r in records if r["type"] == "history" for k in r["history"]["item"] if not k.startswith("_")}
    return {"run": run, "config": config, "summary": summary, "history_names": names}


SECRETS = {"WANDB_API_KEY": "wandb-secret-3f9a1c7e5b2d4f6a8c0e1b3d5f7a9c2e4b6d8f0a",
           "HF_TOKEN": "hf_secretTokenThatMustNeverBeWritten0123456789"}


def test_offline_pipeline_run_reads_back_and_compares(registry_home, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")  # a key is set (below), so without this wandb would go online
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    for stage in ("sft", "rm", "ppo"):
        assert main([stage, "--run", "ci-1", *SMALL]) == 0
    registry = Registry(registry_home)
    entries = {e.stage: e for e in registry.entries(status="complete") if e.stage != "base"}
    assert set(entries) == {"sft", "rm", "ppo"}

    for stage, entry in entries.items():
        assert entry.run == "ci-1"
        [folder] = Path(entry.info["wandb_dir"]).glob(f"wandb/offline-run-*-{entry.info['wandb_run_id']}")
        got = read_wandb_run(folder)
        run = got["run"]
        assert (run["run_group"], run["job_type"], run["display_name"]) == ("tiny-ci-1", stage,
                                                                           f"tiny-{stage}-{entry.id}")
        assert got["config"][stage] == entry.config[stage] and got["config"]["parents"] == entry.parents
        assert got["config"]["run"] == "ci-1"
        assert EXPECTED_NAMES[stage] <= got["history_names"], EXPECTED_NAMES[stage] - got["history_names"]
        for key, value in entry.metrics.items():  # the summary holds the registry's final metrics, same names
            if isinstance(value, float):
                assert got["summary"][key] == pytest.approx(value), key
        # Without wandb: the same names in history.jsonl, and a model card beside the weights.
        logged = {k for row in history.read(entry.path) for k in row}
        assert EXPECTED_NAMES[stage] <= logged, EXPECTED_NAMES[stage] - logged
        card = (Path(entry.path) / "README.md").read_text()
        assert entry.id in card and "## Final metrics" in card and "## How to load" in card

    # Secrets never leave the environment: not in the registry, checkpoints, model cards, histories, plots,
    # logs or wandb's run files (its config, its debug logs).
    files = [p for p in registry_home.rglob("*") if p.is_file()]
    assert len(files) > 50 and any(p.suffix == ".wandb" for p in files) and any(p.suffix == ".log" for p in files)
    for path in files:
        data = path.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in data, f"{name} written to {path}"
    printed = capsys.readouterr()
    assert not any(v in printed.out + printed.err for v in SECRETS.values())

    assert main(["compare", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["run"] == "ci-1" and all(not s["reused"] for s in row["stages"].values())
    assert row["stages"]["ppo"]["metrics"]["eval/gold"] == entries["ppo"].metrics["eval/gold"]
    assert main(["plot"]) == 0
    assert Path(capsys.readouterr().out.strip()) == registry_home / "tiny" / "run-ci-1" / "stages.png"


def test_make_gives_one_tag_to_the_stages_it_runs(tmp_path):
    """`make sft rm` with no RUN: both stages get the same tag, the time make started (dry run)."""
    out = subprocess.run(["make", "-n", "sft", "rm", "VENV=" + str(Path(sys.executable).parent.parent)],
                         cwd=REPO, capture_output=True, text=True, env={**os.environ, "RUN": ""})
    tags = [line.split("--run ")[1].split()[0] for line in out.stdout.splitlines() if "--run " in line]
    assert len(tags) == 2 and tags[0] == tags[1] and len(tags[0]) == len("20261123-091502"), out.stdout
