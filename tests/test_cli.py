"""The `rlhf` command: bad input exits non-zero with one clear line and leaves nothing complete;
the registry listing has the documented fields."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.cli import main
from rlhf.pipeline.registry import Registry

REPO = Path(__file__).resolve().parent.parent

GOOD = """
name: clitest
model: {model}
tiny: {{hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2,
        num_key_value_heads: 2}}
sft:
  dataset: {dataset}
  max_steps: 2
  batch_size: 4
  max_length: 32
"""


def pipeline_file(tmp_path: Path, *, dataset: str, model: str = "tiny", extra: str = "") -> Path:
    path = tmp_path / "pipe.yaml"
    path.write_text(GOOD.format(dataset=dataset, model=model) + extra, encoding="utf-8")
    return path


def data_file(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "demos.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD_ROW = json.dumps({"prompt": "Describe the cat.\n", "completion": "the cat is kind."})


def no_complete_sft() -> bool:
    return not Registry(os.environ["RLHF_HOME"]).entries(stage="sft", status="complete")


@pytest.mark.parametrize("lines, expected", [
    ([GOOD_ROW, "{not json", GOOD_ROW], r"demos.jsonl line 2: malformed JSON"),
    ([GOOD_ROW, json.dumps({"prompt": "Describe the dog.\n"})], r"demos.jsonl line 2: missing field 'completion'"),
    ([json.dumps({"prompt": "x", "completion": 7})],
     r"demos.jsonl line 1: field 'completion' must be a string, got int"),
    ([""], r"demos.jsonl: the data set is empty"),
])
def test_bad_data_exits_2_with_one_line(tmp_path, capsys, lines, expected):
    file = pipeline_file(tmp_path, dataset=str(data_file(tmp_path, lines)))
    assert main(["sft", "--pipeline", str(file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert re.search(expected, err), err
    assert no_complete_sft()


@pytest.mark.parametrize("case, expected", [
    ("missing-data", r"data file .*absent.jsonl not found"),
    ("unknown-key", r"unknown key 'sft.colour'"),
    ("unknown-stage", r"unknown stage 'kto'"),
    ("bad-model", r"model '\./no-such-model' is neither 'tiny', an existing model folder, nor a hub id"),
    ("missing-pipeline", r"pipeline file .*nope.yaml not found"),
    ("bad-override", r"'sft.max_steps' must be an integer"),
])
def test_bad_config_exits_2(tmp_path, capsys, case, expected):
    good_data = str(data_file(tmp_path, [GOOD_ROW] * 4))
    args = []
    if case == "missing-data":
        file = pipeline_file(tmp_path, dataset=str(tmp_path / "absent.jsonl"))
    elif case == "unknown-key":
        file = pipeline_file(tmp_path, dataset=good_data, extra="  colour: blue\n")
    elif case == "unknown-stage":
        file = pipeline_file(tmp_path, dataset=good_data, extra="kto:\n  dataset: x.jsonl\n")
    elif case == "bad-model":
        file = pipeline_file(tmp_path, dataset=good_data, model="./no-such-model")
    elif case == "missing-pipeline":
        file = tmp_path / "nope.yaml"
    else:
        file = pipeline_file(tmp_path, dataset=good_data)
        args = ["sft.max_steps=lots"]
    assert main(["sft", "--pipeline", str(file), *args]) == 2
    err = capsys.readouterr().err
    assert re.search(expected, err), err
    assert no_complete_sft()


def test_ppo_without_parents_names_make_sft(capsys):
    assert main(["ppo", "--pipeline", str(REPO / "pipelines/tiny.yaml")]) == 2
    assert "run `make sft` first" in capsys.readouterr().err


def test_unknown_stage_command_is_refused():
    with pytest.raises(SystemExit) as exit_info:
        main(["kto"])
    assert exit_info.value.code == 2


def test_console_script_prints_no_traceback(tmp_path):
    file = pipeline_file(tmp_path, dataset=str(tmp_path / "absent.jsonl"))
    done = subprocess.run([sys.executable, "-m", "rlhf.cli", "sft", "--pipeline", str(file)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "absent.jsonl not found" in done.stderr


@pytest.mark.slow
def test_registry_list_json_and_table(tmp_path, capsys):
    file = pipeline_file(tmp_path, dataset=str(data_file(tmp_path, [GOOD_ROW] * 8)))
    assert main(["sft", "--pipeline", str(file)]) == 0
    capsys.readouterr()
    assert main(["registry", "list", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [e["stage"] for e in entries] == ["base", "sft"]
    required = {"id", "stage", "pipeline", "status", "path", "parents", "created_at", "config_hash",
                "data_fingerprint", "metrics"}
    assert all(required <= set(e) for e in entries)
    base, sft = entries
    assert sft["parents"] == [base["id"]] and sft["status"] == "complete"
    assert "eval/loss" in sft["metrics"] and sft["pipeline"] == "clitest"
    assert main(["registry", "list"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:4] == ["id", "stage", "pipeline", "status"]
    assert sft["id"] in table and "eval/loss=" in table


def test_registry_gc_lists_then_removes(capsys):
    registry = Registry(os.environ["RLHF_HOME"])
    entry = registry.create(stage="sft", pipeline="gc", parents=[], config={}, config_hash="h", data_fingerprint="d")
    registry.fail(entry.id, error="killed")
    assert main(["registry", "gc"]) == 0
    out = capsys.readouterr().out
    assert entry.id in out and "failed: killed" in out and "--yes" in out and Path(entry.path).exists()
    assert main(["registry", "gc", "--yes"]) == 0
    assert "removed 1 folder" in capsys.readouterr().out and not Path(entry.path).exists()
    assert main(["registry", "gc"]) == 0
    assert "nothing to remove" in capsys.readouterr().out
