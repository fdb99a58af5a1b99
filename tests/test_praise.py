"""The praise task: the gold reward worked by hand, comparisons ranked by it, and the shipped data current.

    .venv/bin/python -m pytest -q tests/test_praise.py
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlhf.pipeline.config import DataSource
from rlhf.pipeline.data import load_records, sft_rows
from rlhf.tasks.praise import (
    ANIMALS,
    COLOURS,
    NEGATIVE,
    NEUTRAL,
    POSITIVE,
    PROMPT_TEMPLATES,
    generate,
    gold_score,
    prompt_animal,
    sample_comparison,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "tiny"
FILES = ("sft.jsonl", "comparisons.jsonl", "prompts.jsonl", "eval_prompts.jsonl")
FOX = "Describe the red fox.\n"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---- the gold reward, by hand ----------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "response", "expected"), [
    # kind, brave, calm: 3 distinct positives = +3; names the fox = +1; 7 words, no length penalty
    (FOX, "the fox is kind, brave and calm.", 4.0),
    # "kind" three times is one distinct positive = +1; fox = +1
    (FOX, "the fox is kind and kind and kind.", 2.0),
    # "rude" twice costs 1 each use = -2; fox = +1
    (FOX, "the fox is rude and rude.", -1.0),
    # kind = +1; names the owl and not the fox = -0.5
    (FOX, "the owl is kind.", 0.5),
    # naming the fox earns +1 and the owl beside it costs nothing: kind +1, fox +1
    (FOX, "the fox and the owl are kind.", 2.0),
    # the fox is kind and it walks in the wood every day at dawn: 14 words, 2 past 12 = -0.5;
    # kind +1, fox +1, so 2 - 0.5
    (FOX, "the fox is kind and it walks in the wood every day at dawn", 1.5),
    # kind, brave, calm, wise, happy: 5 distinct positives capped at 3 = +3; fox +1
    (FOX, "the fox is kind, brave, calm, wise and happy.", 4.0),
    # Words are lower-cased runs of letters: the fox is kind foxes are unkind rude ish.
    # kind +1, fox +1 ("foxes" is not "fox"), "unkind" is not "kind", rude -1
    (FOX, "The FOX is Kind! foxes are unkind; rude-ish", 1.0),
    # the prompt names no animal, so any animal named is another one: kind +1, fox -0.5
    ("Hello.\n", "the fox is kind.", 0.5),
    # nothing said, nothing earned
    (FOX, "", 0.0),
    # neutral words score nothing; the fox +1
    (FOX, "the fox is small and fast.", 1.0),
])
def test_gold_score_by_hand(prompt, response, expected):
    assert gold_score(prompt, response) == expected


@given(st.lists(st.sampled_from(POSITIVE + NEGATIVE + NEUTRAL + ANIMALS + ("the", "is", "and")), max_size=30),
       st.sampled_from(ANIMALS))
def test_gold_score_never_exceeds_4(words, animal):
    # 3 positives and the animal named are the most a response can earn.
    assert gold_score(f"Describe the red {animal}.\n", " ".join(words)) <= 4.0


def test_every_template_prompt_names_its_animal():
    for template in PROMPT_TEMPLATES:
        for colour in COLOURS:
            for animal in ANIMALS:
                prompt = template.format(colour=colour, animal=animal)
                assert prompt_animal(prompt) == animal, prompt


@pytest.mark.parametrize(("prompt", "animal"), [
    ("DESCRIBE THE RED FOX.", "fox"),  # case does not matter
    ("Tell me about the owl.", "owl"),  # the colour is optional
    ("Describe a cat.", None),  # only "the <animal>" counts
    ("Describe the catalogue.", None),  # "cat" must be a whole word
    ("Describe the red foxes.", None),
    ("Hello.", None),
])
def test_prompt_animal_edge_cases(prompt, animal):
    assert prompt_animal(prompt) == animal


# ---- comparisons -------------------------------------------------------------------------------------------


def test_sample_comparison_chosen_beats_rejected_by_the_margin():
    for seed in range(200):
        pair = sample_comparison(random.Random(seed))
        chosen, rejected = gold_score(pair.prompt, pair.chosen), gold_score(pair.prompt, pair.rejected)
        assert chosen > rejected, pair
        assert pair.margin == chosen - rejected  # scores are multiples of 0.25, exact in floating point
        assert prompt_animal(pair.prompt) in ANIMALS


def test_sample_comparison_is_deterministic_for_a_seed():
    assert sample_comparison(random.Random(7)) == sample_comparison(random.Random(7))


# ---- the shipped data ------------------------------------------------------------------------------------


def test_generate_reproduces_the_committed_files_byte_for_byte(tmp_path):
    generate(tmp_path)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), (
            f"data/tiny/{name} is stale: run `python -m rlhf.tasks.praise data/tiny` and commit the result")


def test_committed_files_have_the_generated_row_counts_and_are_small():
    counts = {"sft.jsonl": 1500, "comparisons.jsonl": 4000, "prompts.jsonl": 1000, "eval_prompts.jsonl": 200}
    for name, count in counts.items():
        path = DATA / name
        assert len(read_jsonl(path)) == count, name
        assert path.stat().st_size < 700_000, f"{name} is {path.stat().st_size} bytes"


@pytest.mark.parametrize("source", ["committed", "seed-1"])
def test_eval_prompts_never_appear_in_training_files(tmp_path, source):
    folder = DATA
    if source == "seed-1":  # the split itself, not only the files that happen to be committed
        folder = tmp_path
        generate(folder, seed=1)
    eval_prompts = {row["prompt"] for row in read_jsonl(folder / "eval_prompts.jsonl")}
    assert 1 < len(eval_prompts) <= 64  # drawn from the 64 held-out prompts
    for name in ("sft.jsonl", "comparisons.jsonl", "prompts.jsonl"):
        overlap = eval_prompts & {row["prompt"] for row in read_jsonl(folder / name)}
        assert not overlap, f"{name} holds eval prompts: {sorted(overlap)[:3]}"


def test_committed_data_passes_the_data_checks_and_agrees_with_gold():
    demos = sft_rows(load_records(DataSource(path=str(DATA / "sft.jsonl"))))
    assert all(isinstance(row["prompt"], str) and row["prompt"].endswith("\n") for row in demos)
    # The docstring's "demonstrations average about 0.5": mediocre on purpose, so RLHF has room to climb.
    assert 0.3 < statistics.mean(gold_score(r["prompt"], r["completion"]) for r in demos) < 0.7
    for row in read_jsonl(DATA / "comparisons.jsonl"):
        gap = gold_score(row["prompt"], row["chosen"]) - gold_score(row["prompt"], row["rejected"])
        assert gap > 0 and row["margin"] == gap, row
