"""Hostile input: arbitrary JSON, unicode, huge strings, wrong types and nested junk thrown at the data
loaders, the labels reader and the pipeline-file parser. Every case loads or fails with the project's
own error (RLHFError, printed as one line by the CLI); never an unhandled traceback."""

from __future__ import annotations

import contextlib
import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf.errors import RLHFError
from rlhf.pipeline import labels
from rlhf.pipeline.config import DataSource, load_pipeline
from rlhf.pipeline.data import comparison_set, load_records, prompt_rows, sft_rows

SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=4), max_leaves=12)
FIELDS = ("prompt", "completion", "chosen", "rejected", "margin", "messages", "role", "content")
# Records shaped like ours but with any value in any field: where the interesting mistakes are.
NEAR = st.dictionaries(st.sampled_from(FIELDS), JSON | st.text(max_size=200) | st.lists(
    st.dictionaries(st.sampled_from(("role", "content")), SCALARS | st.text(max_size=20), max_size=2), max_size=3),
    max_size=5)
HOSTILE = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def load_with_every_reader(path) -> None:
    try:
        records = load_records(DataSource(path=str(path)))
    except RLHFError:
        return
    for reader in (sft_rows, prompt_rows, comparison_set, lambda r: comparison_set(r, skip_invalid=True)):
        with contextlib.suppress(RLHFError):
            reader(records)


@HOSTILE
@given(rows=st.lists(NEAR | JSON, max_size=6))
def test_any_json_lines_load_or_fail_with_our_error(tmp_path, rows):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    load_with_every_reader(path)


@HOSTILE
@given(text=st.text(max_size=300) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_any_file_text_loads_or_fails_with_our_error(tmp_path, text):
    for name in ("data.jsonl", "data.json"):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        load_with_every_reader(path)


def test_huge_strings_and_unicode_are_data(tmp_path):
    huge = "é🦊\u202e" * 200_000  # 600k characters with a right-to-left override
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"prompt": huge, "chosen": huge + "a", "rejected": huge + "b"}) + "\n"
                    + json.dumps({"prompt": "p", "chosen": "x", "rejected": "y"}) + "\n", encoding="utf-8")
    rows = comparison_set(load_records(DataSource(path=str(path)))).rows
    assert rows[0]["chosen"] == huge + "a"


@HOSTILE
@given(records=st.lists(st.dictionaries(st.sampled_from(("id", "round", "choice")), JSON | st.sampled_from(
    ("r2-00000", "r2-00001", "a", "b", "skip", "tie", 2, 3))), max_size=4) | st.lists(JSON, max_size=3))
def test_any_labels_file_loads_or_fails_with_our_error(tmp_path, records):
    pairs = [labels.CandidatePair(f"r2-0000{i}", 2, "p", f"a{i}", f"b{i}") for i in range(2)]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    with contextlib.suppress(RLHFError):
        labels.read_labels(path, pairs, round=2)


SECTION_KEYS = ("dataset", "epochs", "learning_rate", "mode", "lora", "batch_size", "episodes", "kl_coef",
                "labeller", "num_prompts", "eval_fraction", "nonsense")


@HOSTILE
@given(doc=st.dictionaries(
    st.sampled_from(("name", "model", "seed", "tiny", "sft", "rm", "ppo", "rounds", "junk")),
    JSON | st.dictionaries(st.sampled_from(SECTION_KEYS), JSON | st.text(max_size=30), max_size=4), max_size=6),
    overrides=st.lists(st.text(max_size=30), max_size=3))
def test_any_pipeline_file_loads_or_fails_with_our_error(tmp_path, doc, overrides):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    with contextlib.suppress(RLHFError):
        load_pipeline(path, overrides)


@pytest.mark.parametrize("text", ["name: [unclosed", "- a\n- b", "\t\tname: x", "name: !!python/object:os.system x",
                                  "a: &x [*x]"])
def test_broken_or_unsafe_yaml_is_our_error(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RLHFError, match=str(path)):
        load_pipeline(path)
