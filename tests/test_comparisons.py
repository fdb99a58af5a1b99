"""Ranked comparisons for the reward model: every format normalised, bad pairs named, truncation worked by hand.

    .venv/bin/python -m pytest -q tests/test_comparisons.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import HH_RLHF

from rlhf.errors import DataError
from rlhf.pipeline.config import DataSource
from rlhf.pipeline.data import comparison_rows, comparison_set, load_records

HH_CHOSEN = ("\n\nHuman: What do foxes eat?\n\nAssistant: Mostly small animals.\n\nHuman: And in winter?"
             "\n\nAssistant: Mice under the snow, and berries.")
HH_REJECTED = ("\n\nHuman: What do foxes eat?\n\nAssistant: Mostly small animals.\n\nHuman: And in winter?"
               "\n\nAssistant: Mostly nothing.")
HH_PROMPT = ("\n\nHuman: What do foxes eat?\n\nAssistant: Mostly small animals.\n\nHuman: And in winter?"
             "\n\nAssistant:")


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def load(tmp_path: Path, rows: list[dict]):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return load_records(DataSource(path=str(path)))


def pairs(tmp_path: Path, rows: list[dict]) -> list[dict]:
    return comparison_rows(load(tmp_path, rows))


# ---- every format, normalised exactly -------------------------------------------------------------


def test_explicit_standard_is_kept_and_an_empty_prompt_is_allowed(tmp_path):
    rows = [{"prompt": "Name a colour.", "chosen": " Blue.", "rejected": " Seven.", "id": 3},
            {"prompt": "", "chosen": "A fox.", "rejected": "A fix."}]
    assert pairs(tmp_path, rows) == [{"prompt": "Name a colour.", "chosen": " Blue.", "rejected": " Seven."},
                                     {"prompt": "", "chosen": "A fox.", "rejected": "A fix."}]


def test_explicit_conversational_keeps_role_and_content_only(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, user("Hi?")],
             "chosen": [{"role": "assistant", "content": "Hello.", "name": "bot"}],
             "rejected": [assistant("Go away.")]}]
    assert pairs(tmp_path, rows) == [{"prompt": [{"role": "system", "content": "Be brief."}, user("Hi?")],
                                      "chosen": [assistant("Hello.")], "rejected": [assistant("Go away.")]}]


def test_implicit_hh_texts_split_after_the_last_assistant_marker(tmp_path):
    # The common prefix runs on to "...\n\nAssistant: M" (both answers start with "M"); it is backed off to
    # the end of the last "\n\nAssistant:", so the prompt ends there and both responses start with " ".
    assert pairs(tmp_path, [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}]) == [
        {"prompt": HH_PROMPT, "chosen": " Mice under the snow, and berries.", "rejected": " Mostly nothing."}]


def test_an_answer_that_runs_on_past_its_turn_is_kept(tmp_path):
    # HH has answers that go on to write the next turns themselves; the texts part at the assistant's turn, so
    # the prompt is shared and the pair is valid.
    run_on = HH_PROMPT + " Mice.\n\nHuman: Thanks!\n\nAssistant: Any time."
    assert pairs(tmp_path, [{"chosen": run_on, "rejected": HH_REJECTED}]) == [
        {"prompt": HH_PROMPT, "chosen": " Mice.\n\nHuman: Thanks!\n\nAssistant: Any time.",
         "rejected": " Mostly nothing."}]


def test_implicit_plain_texts_back_off_to_whitespace_so_no_word_is_split(tmp_path):
    # Common prefix "The sky is blue" ends inside "blue today" / "bluish"; backed off to just after the last
    # whitespace: prompt "The sky is ", responses the whole words.
    rows = [{"chosen": "The sky is blue today", "rejected": "The sky is bluish"},
            # Prefix "Say hi " already ends in whitespace, so nothing is backed off.
            {"chosen": "Say hi please", "rejected": "Say hi now"}]
    assert pairs(tmp_path, rows) == [{"prompt": "The sky is ", "chosen": "blue today", "rejected": "bluish"},
                                     {"prompt": "Say hi ", "chosen": "please", "rejected": "now"}]


def test_implicit_conversations_split_after_the_shared_leading_messages(tmp_path):
    shared = [user("What do foxes eat?"), assistant("Small animals."), user("In winter?")]
    rows = [{"chosen": shared + [assistant("Mice.")], "rejected": shared + [assistant("Nothing.")]}]
    assert pairs(tmp_path, rows) == [{"prompt": shared, "chosen": [assistant("Mice.")],
                                      "rejected": [assistant("Nothing.")]}]


def test_margin_is_kept_as_a_float(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2},
            {"prompt": "p", "chosen": "c", "rejected": "d", "margin": 0.5}]
    assert [row["margin"] for row in pairs(tmp_path, rows)] == [2.0, 0.5]
    assert isinstance(pairs(tmp_path, rows)[0]["margin"], float)
    assert "margin" not in pairs(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b"}])[0]


# ---- bad input is named: file, line, field ----------------------------------------------------------

GOOD = {"prompt": "Name a colour.", "chosen": " Blue.", "rejected": " Seven."}
GOOD_IMPLICIT = {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}
GOOD_CONVERSATION = {"chosen": [user("Hi?"), assistant("Hello.")], "rejected": [user("Hi?"), assistant("No.")]}
BAD = {  # name: (rows, fragments the message holds in order); the bad record is always on line 2
    "missing chosen": ([GOOD, {"prompt": "p", "rejected": "r"}], ["line 2", "missing field 'chosen'"]),
    "missing rejected": ([GOOD_IMPLICIT, {"chosen": "a b"}], ["line 2", "missing field 'rejected'"]),
    "rejected a number": ([GOOD, {"prompt": "p", "chosen": "a", "rejected": 3}],
                          ["line 2", "field 'rejected' must be a string, got int"]),
    "rejected null": ([GOOD, {"prompt": "p", "chosen": "a", "rejected": None}], ["line 2", "field 'rejected' is null"]),
    "prompt a number": ([GOOD, {"prompt": 1, "chosen": "a", "rejected": "b"}],
                        ["line 2", "field 'prompt' must be a string, got int"]),
    "chosen not messages": ([GOOD_CONVERSATION, {"chosen": [user("Hi?")], "rejected": "Hi? No."}],
                            ["line 2", "field 'rejected' must be a non-empty list of messages"]),
    "explicit identical": ([GOOD, {"prompt": "p", "chosen": "same", "rejected": "same"}],
                           ["line 2", "chosen and rejected are identical"]),
    "implicit identical": ([GOOD_IMPLICIT, {"chosen": HH_CHOSEN, "rejected": HH_CHOSEN}],
                           ["line 2", "chosen and rejected are identical"]),
    "conversations identical": ([GOOD_CONVERSATION, {"chosen": [user("a"), assistant("b")],
                                                      "rejected": [user("a"), assistant("b")]}],
                                ["line 2", "chosen and rejected are identical"]),
    "no common prefix": ([GOOD_IMPLICIT, {"chosen": "Yes.", "rejected": "No."}],
                         ["line 2", "chosen and rejected share no common prefix, so the prompt cannot be extracted; "
                                    "give an explicit 'prompt' field"]),
    "prefix inside the first word": ([GOOD_IMPLICIT, {"chosen": "Foxes eat mice", "rejected": "Foxy"}],
                                     ["line 2", "share no common prefix", "'prompt'"]),
    "no common message": ([GOOD_CONVERSATION, {"chosen": [user("a"), assistant("b")],
                                                "rejected": [user("c"), assistant("b")]}],
                          ["line 2", "share no leading message", "'prompt'"]),
    "empty explicit chosen": ([GOOD, {"prompt": "p", "chosen": "  ", "rejected": "b"}],
                              ["line 2", "field 'chosen' is an empty response"]),
    "empty implicit chosen": ([GOOD_IMPLICIT, {"chosen": "\n\nHuman: Hi?\n\nAssistant: ",
                                               "rejected": "\n\nHuman: Hi?\n\nAssistant: Hello."}],
                              ["line 2", "field 'chosen' is an empty response once the shared prompt is removed"]),
    "empty implicit rejected turn": ([GOOD_CONVERSATION, {"chosen": [user("a"), assistant("b")],
                                                           "rejected": [user("a")]}],
                                     ["line 2", "field 'rejected' is an empty response"]),
    "texts part inside the last human turn": (
        [GOOD_IMPLICIT, {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Fox?\n\nAssistant: Red.",
                         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Owl?\n\nAssistant: Grey."}],
        ["line 2", "chosen and rejected diverge inside a '\\n\\nHuman:' turn, so they answer different prompts"]),
    "texts part inside the first human turn": ([GOOD_IMPLICIT, {"chosen": "\n\nHuman: Foxes?\n\nAssistant: Red.",
                                                               "rejected": "\n\nHuman: Fox?\n\nAssistant: Red."}],
                                               ["line 2", "diverge inside a '\\n\\nHuman:' turn"]),
    "conversations part at a user turn": ([GOOD_CONVERSATION, {"chosen": [user("a"), assistant("b"), user("c")],
                                                                "rejected": [user("a"), assistant("b"), user("d")]}],
                                          ["line 2", "field 'chosen' must start with an assistant message "
                                                     "once the shared prompt is removed, got a user message"]),
    "explicit response from the user": (
        [{"prompt": [user("a")], "chosen": [assistant("b")], "rejected": [assistant("c")]},
         {"prompt": [user("a")], "chosen": [user("b")], "rejected": [assistant("c")]}],
        ["line 2", "field 'chosen' must start with an assistant message"]),
    "margin a bool": ([{**GOOD, "margin": 1}, {**GOOD, "margin": True}],
                      ["line 2", "field 'margin' must be a finite number, got bool"]),
    "margin a string": ([{**GOOD, "margin": 1}, {**GOOD, "margin": "1.5"}],
                        ["line 2", "field 'margin' must be a finite number, got str"]),
    "margin missing on some": ([{**GOOD, "margin": 1}, GOOD],
                               ["line 2", "has no field 'margin' but earlier records do"]),
    "margin only on some": ([GOOD, {**GOOD, "margin": 1}], ["line 2", "has field 'margin' but earlier records do not"]),
    "formats mixed": ([GOOD, GOOD_IMPLICIT],
                      ["line 2", "is implicit standard but earlier records are explicit standard"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_names_file_line_and_field(tmp_path, case):
    rows, fragments = BAD[case]
    records = load(tmp_path, rows)
    with pytest.raises(DataError, match=".*".join(re.escape(f) for f in [records.origin, *fragments])):
        comparison_rows(records)


def test_empty_data_set_names_the_file(tmp_path):
    records = load(tmp_path, [])
    with pytest.raises(DataError, match=re.escape(f"{records.origin}: the data set is empty")):
        comparison_rows(records)


def test_skip_invalid_drops_unusable_pairs_but_not_malformed_records(tmp_path):
    identical = {"prompt": "p", "chosen": "same", "rejected": "same"}
    result = comparison_set(load(tmp_path, [GOOD, identical, GOOD]), skip_invalid=True)
    assert result.rows == [GOOD, GOOD]
    assert result.skipped == 1
    assert "line 2: chosen and rejected are identical" in result.skip_reasons[0]
    with pytest.raises(DataError, match="line 2: field 'rejected' must be a string"):
        comparison_set(load(tmp_path, [GOOD, {"prompt": "p", "chosen": "a", "rejected": 3}]), skip_invalid=True)
    with pytest.raises(DataError, match="no usable pairs: all 1 records were skipped.*identical"):
        comparison_set(load(tmp_path, [identical]), skip_invalid=True)


# ---- truncation, worked by hand ---------------------------------------------------------------------


@pytest.mark.skipif(not HH_RLHF.is_file(), reason=f"{HH_RLHF} not found (the shared HH-RLHF harmless-base test split)")
def test_hh_rlhf_harmless_base_splits_into_pairs():
    records = load_records(DataSource(path=str(HH_RLHF)))
    # Four records (lines 87, 517, 926, 1104) have an empty chosen answer: "\n\nAssistant: " ends the text.
    # None is identical, none lacks a shared prefix, none parts inside a human turn; five (lines 1255, 1689,
    # 1951, 1953, 2037) hold answers that run on past their turn, and are kept.
    with pytest.raises(DataError, match=re.escape(f"{HH_RLHF} line 87: field 'chosen' is an empty response")):
        comparison_rows(records)
    result = comparison_set(records, skip_invalid=True)
    assert len(result.rows) > 2000
    assert [reason.split(":")[0] for reason in result.skip_reasons] == [
        f"{HH_RLHF} line {n}" for n in (87, 517, 926, 1104)]
    assert all("field 'chosen' is an empty response" in reason for reason in result.skip_reasons)
    for row in result.rows:
        assert row["prompt"].startswith("\n\nHuman:") and row["prompt"].endswith("\n\nAssistant:")
        assert row["chosen"] != row["rejected"]
        assert row["chosen"].startswith(" ") and row["rejected"].startswith(" ")
