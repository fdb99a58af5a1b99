"""The gold tasks: the registry, each task's gold and best scores worked by hand, and the generated data sets
(read back with the pipeline's own readers, ranked by gold, half independent pairs, mixed-quality demonstrations).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_tasks.py
"""

from __future__ import annotations

import json
import random
import re
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlhf.errors import ConfigError
from rlhf.pipeline.config import DataSource
from rlhf.pipeline.data import comparison_set, load_records, prompt_rows, sft_rows
from rlhf.tasks import BEST, GOLD, TASKS, chores, digest, generator, gold_function, lists, palette, praise, task

REPO = Path(__file__).resolve().parents[1]
NEW_TASKS = (palette, lists, chores)
SMALL = dict(n_demos=7, n_comparisons=6, n_prompts=5, n_eval_prompts=4)
_WORD = re.compile(r"[a-z]+")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def word_changes(first: str, second: str) -> int:
    """Words added plus words removed between two responses (as multisets)."""
    a, b = Counter(_WORD.findall(first)), Counter(_WORD.findall(second))
    return sum(((a - b) + (b - a)).values())


@pytest.fixture(scope="module", params=NEW_TASKS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def default_data(request) -> tuple:
    """A new task and its data at the default sizes (2,000 demonstrations, 2,000 comparisons), in memory."""
    module = request.param
    return module, generator.sample_data(module.RECIPE, seed=0, counts=generator.Counts())


# ---- the registry ----------------------------------------------------------------------------------------------


def test_every_task_is_registered_with_gold_best_and_generate():
    assert list(TASKS) == ["praise", "digest", "palette", "lists", "chores"]
    for name, module in (("praise", praise), ("digest", digest), ("palette", palette), ("lists", lists),
                         ("chores", chores)):
        entry = task(name, where="test")
        assert (entry.gold, entry.best, entry.generate) == (module.gold_score, module.best_score, module.generate)
        assert GOLD[name] is module.gold_score and BEST[name] is module.best_score
        assert gold_function(name, where="test") is module.gold_score
        assert entry.command == f"python -m rlhf.tasks.{name} OUT_DIR"


def test_an_unknown_task_is_an_error_naming_the_known_ones():
    with pytest.raises(ConfigError, match=r"matrix.yaml: 'colours' is not a gold task \(known: praise, digest, "):
        task("colours", where="matrix.yaml")
    with pytest.raises(ConfigError, match="ppo.gold 'colours'"):
        gold_function("colours", where="tiny.yaml")
    assert gold_function(None, where="tiny.yaml") is None


@pytest.mark.parametrize("name", list(TASKS))
def test_every_tasks_generate_writes_files_the_stages_read(tmp_path, name):
    TASKS[name].generate(tmp_path, seed=1, **SMALL)
    assert len(sft_rows(load_records(DataSource(path=str(tmp_path / "sft.jsonl"))))) == 7
    assert len(comparison_set(load_records(DataSource(path=str(tmp_path / "comparisons.jsonl")))).rows) == 6
    assert len(prompt_rows(load_records(DataSource(path=str(tmp_path / "prompts.jsonl"))))) == 5
    assert len(prompt_rows(load_records(DataSource(path=str(tmp_path / "eval_prompts.jsonl"))))) == 4


# ---- best_score of the two older tasks -------------------------------------------------------------------------

FOX = "Describe the red fox.\n"
NOTES = ("Field notes from the pond:\nAt dawn a red fox crossed the river. At noon a grey owl hid near the barn. "
         f"Near dusk a young fox watched the hedge.\n\n{digest.QUESTION}\n")  # the fox twice, the owl once


@pytest.mark.parametrize(("prompt", "best", "attained_by"), [
    (FOX, 4.0, "the fox is kind, brave and calm."),  # 3 distinct positives +3, the fox +1
    ("Hello.\n", 3.0, "kind, brave and calm."),  # no animal asked: any animal named costs 0.5
])
def test_praise_best_score_by_hand(prompt, best, attained_by):
    assert praise.best_score(prompt) == best == praise.gold_score(prompt, attained_by)


@given(st.lists(st.sampled_from(praise.POSITIVE + praise.NEGATIVE + praise.ANIMALS + ("the", "is")), max_size=20),
       st.sampled_from((FOX, "Hello.\n", "Tell me about the owl.\n")))
def test_praise_best_score_is_never_beaten(words, prompt):
    assert praise.gold_score(prompt, " ".join(words)) <= praise.best_score(prompt)


@pytest.mark.parametrize(("prompt", "best", "attained_by"), [
    (NOTES, 2.0, "the fox."),  # the most-seen animal +2, nothing else
    (NOTES.replace("young fox", "young owl"), 2.0, "the owl."),  # now the owl twice, the fox once
    (NOTES.replace("young fox", "young cat"), 0.0, "i cannot tell."),  # fox, owl, cat once each: no answer earns
])
def test_digest_best_score_by_hand(prompt, best, attained_by):
    assert digest.best_score(prompt) == best == digest.gold_score(prompt, attained_by)


@given(st.lists(st.sampled_from(praise.ANIMALS + ("the", "most")), max_size=16),
       st.sampled_from((NOTES, NOTES.replace("young fox", "young cat"))))
def test_digest_best_score_is_never_beaten(words, prompt):
    assert digest.gold_score(prompt, " ".join(words)) <= digest.best_score(prompt)


# ---- palette: the prompt's colour constraint -------------------------------------------------------------------

DOOR = "Paint the door red, not blue.\n"


@pytest.mark.parametrize(("prompt", "response", "expected"), [
    (DOOR, "a red door.", 3.0),  # the wanted colour +2, the door +1
    (DOOR, "A RED Door!", 3.0),  # case and punctuation do not matter
    (DOOR, "the door is blue now.", -1.0),  # the refused colour -2, the door +1
    (DOOR, "red and blue door.", 1.0),  # +2 -2 +1: copying both prompt colours nets the door alone
    (DOOR, "a red door with green trim.", 2.5),  # +2 +1, green is neither asked nor refused -0.5
    (DOOR, "a green and yellow door.", 0.0),  # two other colours -1, the door +1
    (DOOR, "red red red.", 2.0),  # the wanted colour counts once, no door
    (DOOR, "here is your red boat.", 2.0),  # the wrong thing earns nothing and costs nothing
    (DOOR, "", 0.0),
    # a red door and a red door and a red door and so on: 14 words, 2 past 12 = -0.5; +2 +1
    (DOOR, "a red door and a red door and a red door and so on.", 2.5),
    ("I would like the boat in pink, no white please.\n", "a pink boat.", 3.0),
    ("I would like the boat in pink, no white please.\n", "a white boat.", -1.0),
    ("Colour the cup yellow and keep green off it.\n", "a green cup.", -1.0),
    ("Make the kite orange but never purple.\n", "the kite is orange now.", 3.0),
    ("Hello.\n", "a red door.", -0.5),  # no brief: every colour is an other colour
])
def test_palette_gold_score_by_hand(prompt, response, expected):
    assert palette.gold_score(prompt, response) == expected


@pytest.mark.parametrize(("prompt", "best"), [
    (DOOR, 3.0),  # "a red door."
    ("Paint the door red, not red.\n", 1.0),  # red nets +2 -2 = 0 either way: the door alone
    ("Paint the cloud red, not blue.\n", 0.0),  # no thing of the task's: no brief
    ("Hello.\n", 0.0),
])
def test_palette_best_score_by_hand(prompt, best):
    assert palette.best_score(prompt) == best


def test_palette_reads_every_prompt_it_asks():
    for prompt in palette.PROMPTS:
        asked = palette.brief(prompt)
        assert asked is not None and asked.want != asked.avoid, prompt
        assert palette.gold_score(prompt, f"a {asked.want} {asked.thing}.") == palette.best_score(prompt) == 3.0


# ---- lists: the count and kind asked for ---------------------------------------------------------------------

BIRDS = "Name three birds, please.\n"


@pytest.mark.parametrize(("prompt", "response", "expected"), [
    (BIRDS, "robin, crow and swan.", 3.0),  # three distinct birds
    (BIRDS, "robin and crow.", 2.0),  # one too few: 2 of 3 earned
    (BIRDS, "robin, crow, swan and wren.", 2.0),  # one too many: 3 earned, -1
    (BIRDS, "robin, crow and apple.", 2.0),  # a fruit fills a place and earns nothing
    (BIRDS, "robin, robin and robin.", 1.0),  # a repeat earns nothing
    (BIRDS, "robin, crow, swan, apple, pear.", 1.0),  # 3 earned, 2 past the count -2
    (BIRDS, "i like birds.", 0.0),  # "birds" is not an item
    (BIRDS, "", 0.0),
    # i would pick the robin and the crow and the swan for you today: 14 words, 2 past 12 = -0.5
    (BIRDS, "i would pick the robin and the crow and the swan for you today", 2.5),
    ("List five trees.\n", "oak, pine, birch, maple, willow.", 5.0),
    ("Can you think of two fish?\n", "sure: trout and cod.", 2.0),
    ("Hello.\n", "robin and crow.", -2.0),  # nothing asked: both items are past a count of 0
])
def test_lists_gold_score_by_hand(prompt, response, expected):
    assert lists.gold_score(prompt, response) == expected


@pytest.mark.parametrize(("prompt", "best"), [
    (BIRDS, 3.0), ("List five trees.\n", 5.0), ("Give me two tools.\n", 2.0),
    ("List seven birds.\n", 0.0),  # seven is not a count the task asks
    ("Hello.\n", 0.0),
])
def test_lists_best_score_by_hand(prompt, best):
    assert lists.best_score(prompt) == best


def test_lists_best_score_depends_on_the_count_and_is_attained():
    for prompt in lists.PROMPTS:
        asked = lists.request(prompt)
        answer = ", ".join(lists.CATEGORIES[asked.category][:asked.count]) + "."
        assert lists.gold_score(prompt, answer) == lists.best_score(prompt) == asked.count, prompt


# ---- chores: helpfulness, politeness and brevity, and a rare hazard ---------------------------------------------

OVEN = "How do I clean the greasy oven?\n"


@pytest.mark.parametrize(("prompt", "response", "expected"), [
    (OVEN, "please scrub the oven with soap and water.", 4.0),  # 3 helpful +3, polite +0.5, the oven +0.5; 8 words
    # 5 helpful words count as 3; the oven +0.5; 9 words, 1 past 8 = -0.5
    (OVEN, "scrub the oven with soap, water, cloth and brush.", 3.0),
    (OVEN, "please scrub the oven with bleach and vinegar.", -1.0),  # 4 as above, -5 for the hazard
    (OVEN, "use bleach.", 1.0),  # bleach alone is helpful
    (OVEN, "use vinegar.", 1.0),  # and so is vinegar
    (OVEN, "please please please.", 0.5),  # politeness counts once
    (OVEN, "scrub the sink with soap.", 2.0),  # the wrong thing earns nothing
    # please kindly gently scrub the oven with soap and water now: 11 words, 3 past 8 = -1.5; 3 +0.5 +0.5
    (OVEN, "please kindly gently scrub the oven with soap and water now.", 2.5),
    (OVEN, "", 0.0),
    ("My rug is muddy. Any tips?\n", "brush the rug.", 1.5),  # brush +1, the rug +0.5
    ("Hello.\n", "please scrub the oven with soap and water.", 3.5),  # no thing asked: the oven earns nothing
])
def test_chores_gold_score_by_hand(prompt, response, expected):
    assert chores.gold_score(prompt, response) == expected


@pytest.mark.parametrize(("prompt", "best"), [(OVEN, 4.0), ("Hello.\n", 3.5)])
def test_chores_best_score_by_hand(prompt, best):
    assert chores.best_score(prompt) == best


def test_chores_best_score_is_attained_for_every_prompt():
    for prompt in chores.PROMPTS:
        answer = f"please scrub the {chores.chore(prompt).thing} with soap and water."
        assert chores.gold_score(prompt, answer) == chores.best_score(prompt) == 4.0, prompt


# ---- every new task: best is an upper bound, bad input is named --------------------------------------------------

VOCABULARY = {
    palette: palette.COLOURS + palette.THINGS + ("a", "the", "and", "with"),
    lists: tuple(lists.ITEMS) + ("and", "sure"),
    chores: chores.HELPFUL + chores.POLITE + chores.PLAIN + chores.THINGS + ("the", "with"),
}


@pytest.mark.parametrize("module", NEW_TASKS, ids=lambda m: m.__name__)
def test_best_score_is_never_beaten_by_words_of_the_task(module):
    @given(st.sampled_from(module.PROMPTS), st.lists(st.sampled_from(VOCABULARY[module]), max_size=16))
    def check(prompt, words):
        assert module.gold_score(prompt, " ".join(words)) <= module.best_score(prompt)

    check()


@pytest.mark.parametrize("module", NEW_TASKS, ids=lambda m: m.__name__)
def test_sampling_for_a_prompt_outside_the_task_names_the_prompt(module):
    rng = random.Random(0)
    with pytest.raises(ValueError, match=r"prompt 'Hello.\\n' follows none of the task's templates"):
        module.sample_response("Hello.\n", rng)
    with pytest.raises(ValueError, match="follows none"):
        module.sample_edit("Hello.\n", rng)


def test_template_slots_by_hand():
    templates = ("Paint the {thing} {colour}.", "Make it {colour}.")
    assert generator.template_slots("paint THE door red. ", templates) == {"thing": "door", "colour": "red"}
    assert generator.template_slots("Make it blue.\n", templates) == {"colour": "blue"}
    assert generator.template_slots("Paint the door red now.", templates) is None  # the whole text must match
    assert generator.template_slots("Paint the door (red).", templates) is None  # a slot is letters only


# ---- the generated data -------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", NEW_TASKS, ids=lambda m: m.__name__)
def test_files_parse_with_the_pipelines_readers_and_have_the_counts(tmp_path, module):
    module.generate(tmp_path, seed=3, **SMALL)
    demos = sft_rows(load_records(DataSource(path=str(tmp_path / "sft.jsonl"))))
    pairs = comparison_set(load_records(DataSource(path=str(tmp_path / "comparisons.jsonl"))))
    prompts = prompt_rows(load_records(DataSource(path=str(tmp_path / "prompts.jsonl"))))
    eval_prompts = prompt_rows(load_records(DataSource(path=str(tmp_path / "eval_prompts.jsonl"))))
    assert [len(demos), len(pairs.rows), len(prompts), len(eval_prompts)] == [7, 6, 5, 4]
    assert pairs.skipped == 0
    # praise's fields exactly, and its prompt format: the prompt text and a newline
    assert [sorted(row) for row in read_jsonl(tmp_path / "comparisons.jsonl")] == \
        [["chosen", "margin", "prompt", "rejected"]] * 6
    assert all(sorted(row) == ["completion", "prompt"] for row in read_jsonl(tmp_path / "sft.jsonl"))
    assert all(row["prompt"] in module.PROMPTS for row in demos + pairs.rows + prompts + eval_prompts)


@pytest.mark.parametrize("module", NEW_TASKS, ids=lambda m: m.__name__)
def test_generate_is_deterministic_for_a_seed(tmp_path, module):
    for folder, seed in (("a", 5), ("b", 5), ("c", 6)):
        module.generate(tmp_path / folder, seed=seed, **SMALL)
    for name in generator.FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert any((tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
               for name in generator.FILES)


def test_chosen_beats_rejected_by_the_margin_in_every_comparison(default_data):
    module, data = default_data
    for pair in data.comparisons:
        gap = module.gold_score(pair.prompt, pair.chosen) - module.gold_score(pair.prompt, pair.rejected)
        assert gap > 0 and pair.margin == gap, pair  # scores are multiples of 0.25: exact in floating point


def test_half_the_comparisons_are_independent_pairs(default_data):
    module, data = default_data
    independent = [p for p in data.comparisons if p.independent]
    edits = [p for p in data.comparisons if not p.independent]
    assert len(independent) == len(edits) == 1000
    # A minimal edit adds, removes or swaps one word; two independent draws mostly differ by more.
    assert all(word_changes(p.chosen, p.rejected) <= 2 for p in edits)
    assert sum(word_changes(p.chosen, p.rejected) > 2 for p in independent) > 0.8 * len(independent)


def test_the_independent_share_is_an_option(tmp_path):
    data = generator.sample_data(lists.RECIPE, seed=0, counts=generator.Counts(comparisons=40),
                                 independent_share=0.25)
    assert sum(p.independent for p in data.comparisons) == 10
    only_edits = generator.sample_data(lists.RECIPE, seed=0, counts=generator.Counts(comparisons=40),
                                       independent_share=0)
    assert not any(p.independent for p in only_edits.comparisons)


def test_best_score_is_never_beaten_by_a_generated_response(default_data):
    module, data = default_data
    scored = [(p, c) for p, c in data.demos] + [(p.prompt, r) for p in data.comparisons for r in (p.chosen, p.rejected)]
    assert all(module.gold_score(prompt, response) <= module.best_score(prompt) for prompt, response in scored)


def test_demonstrations_are_mostly_decent_and_rarely_optimal(default_data):
    # Mixed quality, as a real SFT set: well above the worst, a gap below the best for RLHF to close.
    module, data = default_data
    golds = [module.gold_score(p, c) for p, c in data.demos]
    best = [module.best_score(p) for p, _ in data.demos]
    gap = statistics.mean(best) - statistics.mean(golds)
    assert 0.5 < gap < 0.7 * statistics.mean(best), gap
    optimal = sum(g == b for g, b in zip(golds, best)) / len(golds)
    assert 0.05 < optimal < 0.5, optimal


def test_eval_prompts_are_held_out_of_every_training_file(default_data):
    _, data = default_data
    held = set(data.eval_prompts)
    assert 10 < len(held) <= generator.MAX_HELD_OUT
    training = {p for p, _ in data.demos} | {p.prompt for p in data.comparisons} | set(data.prompts)
    assert not held & training


def test_the_chores_hazard_is_rare_but_present():
    data = generator.sample_data(chores.RECIPE, seed=0, counts=generator.Counts())
    in_demos = sum(chores.hazardous(c) for _, c in data.demos) / len(data.demos)
    in_pairs = sum(chores.hazardous(p.chosen) or chores.hazardous(p.rejected) for p in data.comparisons)
    assert 0.005 < in_demos < 0.04, in_demos
    assert 0.02 < in_pairs / len(data.comparisons) < 0.1, in_pairs


# ---- bad arguments ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sizes", "message"), [
    (dict(n_demos=0), "demos must be a whole number of rows, at least 1; got 0"),
    (dict(n_comparisons=-3), "comparisons must be a whole number of rows, at least 1; got -3"),
    (dict(n_eval_prompts=2.5), "eval_prompts must be a whole number of rows, at least 1; got 2.5"),
])
def test_bad_counts_are_named(tmp_path, sizes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        palette.generate(tmp_path, **{**SMALL, **sizes})
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_a_bad_independent_share_or_out_dir_is_named(tmp_path):
    with pytest.raises(ValueError, match="independent_share must be a number from 0 to 1, got 1.5"):
        chores.generate(tmp_path, independent_share=1.5, **SMALL)
    (tmp_path / "taken").write_text("")
    with pytest.raises(ValueError, match=f"{tmp_path / 'taken'} is a file; the data sets need a folder"):
        chores.generate(tmp_path / "taken", **SMALL)


@pytest.mark.parametrize("module", NEW_TASKS, ids=lambda m: m.__name__)
def test_the_command_line_writes_the_four_files(tmp_path, module):
    name = module.__name__
    done = subprocess.run([sys.executable, "-m", name, str(tmp_path / "data"), "--seed", "2", "--demos", "3",
                           "--comparisons", "4", "--prompts", "2", "--eval-prompts", "1"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [len(read_jsonl(tmp_path / "data" / f)) for f in generator.FILES] == [3, 4, 2, 1]


def test_the_command_line_names_a_bad_count(tmp_path):
    done = subprocess.run([sys.executable, "-m", "rlhf.tasks.lists", str(tmp_path), "--demos", "0"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert "demos must be a whole number of rows, at least 1; got 0" in done.stderr
