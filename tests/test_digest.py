"""The digest task (long prompts for the GPU benchmark): the gold reward by hand, and the generated files.

    .venv/bin/python -m pytest -q tests/test_digest.py
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.tasks import gold_function
from rlhf.tasks.digest import QUESTION, animal_counts, generate, gold_score, most_seen, sample_prompt

REPO = Path(__file__).resolve().parents[1]
FILES = ("sft.jsonl", "comparisons.jsonl", "prompts.jsonl", "eval_prompts.jsonl")
# The fox three times, the owl twice; the question names no animal.
NOTES = ("Field notes from the pond:\nAt dawn a red fox crossed the river. At noon a grey owl hid near the barn. "
         "Near dusk a young fox watched the hedge. Late at night a white owl circled the meadow. "
         f"After the rain a black fox drank from the pond.\n\n{QUESTION}\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_animals_are_counted_in_the_notes_only():
    assert animal_counts(NOTES) == {"fox": 3, "owl": 2}
    assert most_seen(NOTES) == "fox"


def test_a_tie_has_no_most_seen_animal():
    assert most_seen(NOTES.replace("black fox", "black owl")) == "owl"  # fox 2, owl 3
    assert most_seen(NOTES.replace("black fox", "black cat")) is None  # fox 2, owl 2, cat 1: a tie


@pytest.mark.parametrize(("response", "expected"), [
    ("the fox appears most often.", 2.0),  # names the fox: +2
    ("mostly the owl.", -1.0),  # another animal: -1
    ("the fox, and the owl too.", 1.0),  # +2 for the fox, -1 for the owl
    ("i cannot tell.", 0.0),  # no animal: 0
    # 15 words, 3 past 12: -0.75; the fox +2 -> 1.25
    ("the fox appears most often in these notes by far and it is very clear", 1.25),
])
def test_gold_score_by_hand(response, expected):
    assert gold_score(NOTES, response) == expected


def test_the_gold_function_is_registered():
    assert gold_function("digest", where="test") is gold_score


def test_prompts_are_long_and_have_one_most_seen_animal():
    rng = random.Random(3)
    for _ in range(50):
        prompt = sample_prompt(rng, words=420)
        assert 380 <= len(prompt.split()) <= 520
        assert most_seen(prompt) is not None
        assert prompt.endswith(QUESTION + "\n")


def test_generate_is_deterministic_and_sized_by_its_arguments(tmp_path):
    sizes = dict(n_demos=6, n_comparisons=5, n_prompts=4, n_eval_prompts=3)
    generate(tmp_path / "a", seed=7, prompt_words=60, **sizes)
    generate(tmp_path / "b", seed=7, prompt_words=60, **sizes)
    for name, count in zip(FILES, sizes.values()):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert len(read_jsonl(tmp_path / "a" / name)) == count
    for row in read_jsonl(tmp_path / "a" / "comparisons.jsonl"):
        assert gold_score(row["prompt"], row["chosen"]) - gold_score(row["prompt"], row["rejected"]) == row["margin"]
        assert row["margin"] > 0
    for row in read_jsonl(tmp_path / "a" / "sft.jsonl"):
        assert gold_score(row["prompt"], row["completion"]) == 2.0  # every demonstration names the right animal


def test_the_command_line_writes_the_four_files(tmp_path):
    done = subprocess.run([sys.executable, "-m", "rlhf.tasks.digest", str(tmp_path / "data"), "--seed", "1",
                           "--prompt-words", "50", "--demos", "3", "--comparisons", "2", "--prompts", "2",
                           "--eval-prompts", "1"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [len(read_jsonl(tmp_path / "data" / name)) for name in FILES] == [3, 2, 2, 1]
