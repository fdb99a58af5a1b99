"""Data cases on tiny inputs: every local format loads, rows normalise to TRL's formats, bad input is named.

    .venv/bin/python -m pytest -q tests/test_data.py
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import datasets
import pytest
from conftest import HH_RLHF

from rlhf.errors import DataError
from rlhf.pipeline.config import DataSource
from rlhf.pipeline.data import all_texts, common_prefix_length, load_records, sft_rows, split_train_eval

ROWS = [
    {"prompt": "Describe the red fox.\n", "completion": "the fox is kind."},
    {"prompt": "Describe the grey owl.\n", "completion": "the owl is wise."},
    {"prompt": "Describe the young cat.\n", "completion": "my cat looks calm."},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def load(path: Path):
    return load_records(DataSource(path=str(path)))


def raises_data_error(*fragments: str):
    """pytest.raises for a DataError whose message holds every fragment (file, line or record, field)."""
    return pytest.raises(DataError, match=".*".join(re.escape(f) for f in fragments))


# ---- reading each local format ---------------------------------------------------------------------


def test_jsonl_rows_come_back_in_order_labelled_by_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    # A blank line 2 is skipped, so the third record sits on line 4 and its label says so.
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n" + json.dumps(ROWS[2]) + "\n")
    records = load(path)
    assert records.rows == ROWS
    assert records.origin == str(path)
    assert records.where(2) == f"{path} line 4"


def test_json_array_rows_are_labelled_by_record(tmp_path):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    records = load(path)
    assert records.rows == ROWS
    assert records.where(1) == f"{path} record 2"


def test_gzipped_jsonl_reads_like_plain_jsonl(tmp_path):
    path = tmp_path / "sft.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in ROWS)
    records = load(path)
    assert records.rows == ROWS
    assert records.where(0) == f"{path} line 1"


def test_parquet_rows_load_through_datasets(tmp_path):
    path = tmp_path / "sft.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    records = load(path)
    assert records.rows == ROWS
    assert records.where(2) == f"{path} record 3"  # parquet has no lines: rows are counted from 1


def test_a_non_ascii_record_round_trips(tmp_path):
    row = {"prompt": "Décris le renard 🦊\n", "completion": "il est gentil."}
    assert load(write_jsonl(tmp_path / "fr.jsonl", [row])).rows == [row]


# ---- files that cannot be read ---------------------------------------------------------------------


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.jsonl"
    with raises_data_error(str(path), "not found"):
        load(path)


def test_malformed_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "sft.jsonl"
    lines = [json.dumps(ROWS[0]), json.dumps(ROWS[1]), '{"prompt": "a", "completion": }']
    path.write_text("\n".join(lines) + "\n")
    # The third line breaks at its 31st character, the '}' where a value should be.
    with raises_data_error(str(path), "line 3", "malformed JSON", "column 31"):
        load(path)


def test_malformed_json_array_names_the_line(tmp_path):
    path = tmp_path / "sft.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a" "completion": "b"}\n]\n')
    with raises_data_error(str(path), "line 3", "malformed JSON"):
        load(path)


def test_a_list_record_in_jsonl_is_named_as_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [ROWS[0], ["prompt", "completion"]])
    with raises_data_error(str(path), "line 2", "must be a JSON object, got list"):
        load(path)


def test_a_list_as_the_first_jsonl_record_is_not_read_as_a_json_array(tmp_path):
    # Regression: a .jsonl file starting with '[' was parsed as one JSON array and failed at line 2 with
    # "Extra data", naming the wrong line and the wrong problem.
    path = write_jsonl(tmp_path / "sft.jsonl", [["a", "b"], ROWS[0]])
    with raises_data_error(str(path), "line 1", "must be a JSON object, got list"):
        load(path)


def test_a_non_object_in_a_json_array_is_named_by_record(tmp_path):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps([ROWS[0], ROWS[1], "just a string"]))
    with raises_data_error(str(path), "record 3", "must be a JSON object, got str"):
        load(path)


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9"}\n')  # latin-1 e-acute: not valid UTF-8
    with raises_data_error(str(path), "UTF-8"):
        load(path)


def test_a_corrupt_parquet_file_is_a_data_error_naming_it(tmp_path):
    # Regression: pyarrow's ArrowInvalid escaped as a traceback instead of a message naming the file.
    path = tmp_path / "sft.parquet"
    path.write_bytes(b"this is not parquet")
    with raises_data_error(str(path), "parquet"):
        load(path)


def test_an_empty_file_is_named_when_rows_are_asked_for(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("\n  \n")  # blank lines only: no records
    records = load(path)
    assert records.rows == []
    with raises_data_error(str(path), "empty"):
        sft_rows(records)


# ---- SFT rows: each accepted format, normalised ----------------------------------------------------


def test_standard_prompt_completion_rows_pass_through(tmp_path):
    extra = {**ROWS[0], "source": "hand"}  # fields beyond prompt/completion are dropped
    rows = sft_rows(load(write_jsonl(tmp_path / "sft.jsonl", [extra, ROWS[1]])))
    assert rows == [ROWS[0], ROWS[1]]


def test_conversational_prompt_completion_rows_keep_only_role_and_content(tmp_path):
    row = {
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Describe the fox."}],
        "completion": [{"role": "assistant", "content": "the fox is kind.", "name": "bot"}],
    }
    rows = sft_rows(load(write_jsonl(tmp_path / "chat.jsonl", [row])))
    assert rows == [{
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Describe the fox."}],
        "completion": [{"role": "assistant", "content": "the fox is kind."}],
    }]


def test_messages_rows_split_at_the_last_assistant_turn(tmp_path):
    messages = [
        {"role": "user", "content": "Describe the fox."},
        {"role": "assistant", "content": "the fox is kind."},
        {"role": "user", "content": "And the owl?"},
        {"role": "assistant", "content": "the owl is wise."},
    ]
    rows = sft_rows(load(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])))
    # The first three turns are the prompt, the earlier assistant turn included; only the last is trained on.
    assert rows == [{"prompt": messages[:3], "completion": messages[3:]}]


# ---- SFT rows: each bad record names file, line and field ------------------------------------------


def test_missing_completion_is_named(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [ROWS[0], {"prompt": "Describe the owl.\n"}])
    with raises_data_error(str(path), "line 2", "missing field 'completion'"):
        sft_rows(load(path))


def test_a_record_with_neither_prompt_nor_messages_lists_its_fields(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"question": "q", "answer": "a"}])
    with raises_data_error(str(path), "line 1", "missing field 'prompt'", "found fields: answer, question"):
        sft_rows(load(path))


def test_completion_of_the_wrong_type_is_named(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [ROWS[0], ROWS[1], {"prompt": "Describe the owl.\n", "completion": 7}])
    with raises_data_error(str(path), "line 3", "field 'completion' must be a string, got int"):
        sft_rows(load(path))


def test_a_blank_completion_is_named(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Describe the owl.\n", "completion": "  \n"}])
    with raises_data_error(str(path), "line 1", "field 'completion' is empty"):
        sft_rows(load(path))


def test_a_bad_role_names_the_message(tmp_path):
    messages = [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    with raises_data_error(str(path), "line 1", "field 'messages' message 2", "role"):
        sft_rows(load(path))


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "?"}],
    [{"role": "assistant", "content": "hello"}],  # an answer to nothing
], ids=["ends-with-user", "assistant-only"])
def test_messages_must_end_with_an_assistant_turn_after_another(tmp_path, messages):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    with raises_data_error(str(path), "line 1", "'messages' must end with an assistant message"):
        sft_rows(load(path))


def test_mixing_standard_and_conversational_rows_is_named(tmp_path):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "sft.jsonl", [ROWS[0], ROWS[1], chat])
    with raises_data_error(str(path), "line 3", "is conversational but earlier records are standard"):
        sft_rows(load(path))


# ---- train/eval split, texts, fingerprint ----------------------------------------------------------


def numbered(n: int) -> list[dict]:
    return [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(n)]


@pytest.mark.parametrize(("n", "fraction", "n_eval"), [
    (20, 0.1, 2),  # 20 * 0.1 = 2
    (10, 0.25, 2),  # 10 * 0.25 = 2.5, and Python's round() takes 2.5 to the even 2
    (5, 0.1, 1),  # 5 * 0.1 = 0.5 rounds to 0, raised to the minimum of 1
    (2, 0.9, 1),  # 2 * 0.9 = 1.8 rounds to 2, capped at n - 1 so one row is left to train on
])
def test_split_sizes_are_disjoint_and_cover_every_row(n, fraction, n_eval):
    rows = numbered(n)
    train, held = split_train_eval(rows, eval_rows=None, eval_fraction=fraction, seed=3, origin="x.jsonl")
    assert len(held) == n_eval
    assert len(train) == n - n_eval
    train_ids = {r["prompt"] for r in train}
    assert train_ids.isdisjoint(r["prompt"] for r in held)
    assert train_ids | {r["prompt"] for r in held} == {r["prompt"] for r in rows}
    assert train == [r for r in rows if r["prompt"] in train_ids]  # original order kept


def test_split_is_deterministic_for_a_seed_and_moves_with_it():
    rows = numbered(100)
    held = {seed: split_train_eval(rows, eval_rows=None, eval_fraction=0.1, seed=seed, origin="x")[1]
            for seed in (0, 1)}
    assert split_train_eval(rows, eval_rows=None, eval_fraction=0.1, seed=0, origin="x")[1] == held[0]
    # Two seeds picking the same 10 of 100 rows has probability 1 / C(100, 10), about 6e-14.
    assert held[0] != held[1]


def test_given_eval_rows_are_used_as_they_are():
    rows, given = numbered(4), [{"prompt": "e", "completion": "f"}]
    assert split_train_eval(rows, eval_rows=given, eval_fraction=0.5, seed=0, origin="x") == (rows, given)


def test_split_of_a_single_record_names_the_data_set():
    with raises_data_error("one.jsonl", "at least 2 records", "has 1"):
        split_train_eval(numbered(1), eval_rows=None, eval_fraction=0.1, seed=0, origin="one.jsonl")


def test_all_texts_walks_nested_rows_in_order_and_skips_non_strings():
    rows = [
        {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]},
        {"prompt": "p", "margin": 1.5, "tags": ["a", None, {"deep": "b"}]},
    ]
    assert all_texts(rows) == ["user", "hi", "assistant", "yo", "p", "a", "b"]


def test_fingerprint_follows_the_bytes(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", ROWS)
    first = load(path).fingerprint
    assert load(path).fingerprint == first  # same bytes, same fingerprint
    data = bytearray(path.read_bytes())
    at = data.index(b"kind")
    data[at] = ord("m")  # "kind" -> "mind": one byte, same size
    path.write_bytes(bytes(data))
    assert load(path).fingerprint != first


# ---- real-format data --------------------------------------------------------------------------------


@pytest.mark.skipif(not HH_RLHF.is_file(), reason=f"HH-RLHF test split not found at {HH_RLHF}")
def test_real_hh_rlhf_file_loads_with_chosen_and_rejected_dialogues():
    records = load_records(DataSource(path=str(HH_RLHF)))
    assert len(records.rows) > 1000
    for i, row in enumerate(records.rows):
        for field in ("chosen", "rejected"):
            assert isinstance(row[field], str), records.where(i)
            assert row[field].startswith("\n\nHuman:"), records.where(i)


@pytest.mark.parametrize("a, b, expected", [("Human: hi", "Human: ho", 8), ("", "abc", 0), ("abc", "abc", 3),
                                            ([1, 2, 3], [1, 2], 2), ([{"role": "user"}], [{"role": "bot"}], 0)])
def test_common_prefix_length_counts_leading_items_shared(a, b, expected):
    assert common_prefix_length(a, b) == expected
