"""Pairs and labels of the collect step: pairs of distinct responses, gold labels with ties dropped, and
a labels file read back with a clear error for every way it can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.errors import DataError
from rlhf.pipeline import labels
from rlhf.tasks.praise import gold_score


def pairs_for(round: int = 2) -> list[labels.CandidatePair]:
    samples = [("Describe the red fox.\n", ["the fox is kind.", "the fox is rude.", "the fox is kind.", "a cat."]),
               ("What is the owl like?\n", ["the owl is wise and calm.", "the owl is rude."])]
    return labels.make_pairs(samples, round=round, max_pairs_per_prompt=5, seed=0)


def write_labels(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_pairs_are_distinct_capped_and_numbered():
    pairs = pairs_for()
    # fox: 3 distinct responses -> 3 pairs (the duplicate "kind" response is dropped); owl: 1 pair
    assert len(pairs) == 4 and all(p.a != p.b for p in pairs)
    assert [p.id for p in pairs] == ["r2-00000", "r2-00001", "r2-00002", "r2-00003"]
    capped = labels.make_pairs([("p", ["a", "b", "c", "d"])], round=3, max_pairs_per_prompt=2, seed=0)
    assert len(capped) == 2 and capped[0].round == 3


def test_gold_labels_rank_by_the_gold_score_and_drop_ties():
    pairs = [labels.CandidatePair("r2-00000", 2, "Describe the red fox.\n", "the fox is rude.", "the fox is kind."),
             labels.CandidatePair("r2-00001", 2, "Describe the red fox.\n", "the fox is kind.", "the fox is calm.")]
    comparisons, ties = labels.gold_labels(pairs, gold_score)
    assert ties == 1  # kind and calm are both +1: a tie ranks nothing
    [c] = comparisons
    assert (c.chosen, c.rejected, c.margin) == ("the fox is kind.", "the fox is rude.", 2.0)


def test_labels_round_trip(tmp_path):
    pairs = pairs_for()
    path = tmp_path / "pairs.jsonl"
    labels.write_pairs(pairs, path)
    assert labels.read_pairs(path) == pairs
    records = [{"id": p.id, "round": 2, "choice": c} for p, c in zip(pairs, ["a", "b", "skip", "a"])]
    comparisons, skipped = labels.read_labels(write_labels(tmp_path / "l.jsonl", records), pairs, round=2)
    assert skipped == 1 and len(comparisons) == 3
    assert (comparisons[0].chosen, comparisons[1].chosen) == (pairs[0].a, pairs[1].b)


@pytest.mark.parametrize("records, expected", [
    ([{"id": "r2-00009", "choice": "a"}], "line 1: field 'id' 'r2-00009' matches no collected pair"),
    ([{"id": "r1-00000", "choice": "a"}], "an id of round 1; this is round 2"),
    ([{"id": "r2-00000", "round": 1, "choice": "a"}], "line 1: field 'round' is 1, but this is round 2"),
    ([{"id": "r2-00000", "choice": "tie"}], "line 1: field 'choice' is 'tie' for r2-00000: a tie ranks nothing"),
    ([{"id": "r2-00000", "choice": "A"}], "field 'choice' must be one of a, b, skip, got 'A'"),
    ([{"id": "r2-00000", "choice": "a"}, {"id": "r2-00000", "choice": "b"}], "line 2: field 'id' 'r2-00000' is "
                                                                              "labelled twice"),
    ([{"choice": "a"}], "line 1: field 'id' is missing"),
    (["{not json"], "line 1: not valid JSON"),
    (["[1, 2]"], "line 1: expected an object"),
    ([{"id": "r2-00000", "choice": "a"}], "3 of 4 pairs have no label (first: r2-00001)"),
])
def test_bad_labels_name_the_file_line_and_field(tmp_path, records, expected):
    path = write_labels(tmp_path / "labels.jsonl", records)
    with pytest.raises(DataError) as err:
        labels.read_labels(path, pairs_for(), round=2)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_missing_labels_file(tmp_path):
    with pytest.raises(DataError, match="labels file .* not found"):
        labels.read_labels(tmp_path / "nope.jsonl", pairs_for(), round=2)


def test_split_keeps_each_prompt_on_one_side():
    comparisons = [labels.Comparison(f"p{i % 10}", f"c{i}", f"r{i}") for i in range(50)]
    train, held = labels.split_by_prompt(comparisons, eval_fraction=0.2, seed=1)
    assert len(train) + len(held) == 50 and {c.prompt for c in train}.isdisjoint({c.prompt for c in held})
    assert len({c.prompt for c in held}) == 2
