"""A task with long prompts, "digest": read a page of field notes, name the animal seen most often.

Each prompt is a few hundred words of notes (`At dawn a red fox crossed the river near the mill.`), then a question;
a response is one short line. Its use is speed: prompts as long as a real summarisation task's (TL;DR's posts
run to 512 tokens), so that the GPU benchmark pipeline (pipelines/gpu-bench.yaml) times generation, scoring and
training at realistic lengths without the hub. The gold reward is in code, as the praise task's is.

Write the data sets (deterministic for a seed; the pipeline's data is generated, not shipped):
    python -m rlhf.tasks.digest runs/gpu-bench-data [--seed 0] [--prompt-words 420] [--demos 512] ...
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from pathlib import Path

from rlhf.tasks.praise import ANIMALS, COLOURS, Comparison

TIMES = ("At dawn", "At noon", "In the evening", "Late at night", "After the rain", "Before sunrise",
         "On the second day", "Around midday", "Just after lunch", "Near dusk")
ACTIONS = ("crossed", "rested beside", "circled", "drank from", "hid near", "ran along", "slept under",
           "watched", "searched around", "waited by")
PLACES = ("the river", "the old mill", "the north field", "the birch wood", "the stone bridge", "the pond",
          "the hedge", "the barn", "the meadow", "the quarry")
ASIDES = ("and the wind was cold", "while the farmer watched", "as the clouds gathered", "before anyone noticed",
          "and nobody disturbed it", "while the bells rang in the village", "as the light faded",
          "and left tracks in the mud")
QUESTION = "Which animal appears most often in these notes? Answer in one line."
ANSWERS = ("the {animal} appears most often.", "mostly the {animal}.", "it was the {animal}, again and again.",
           "the {colour} {animal} was seen most.", "the notes keep returning to the {animal}.")
RAMBLES = ("the notes mention many animals near the river and the mill and the field and the wood and it is "
           "hard to say which one {animal} or another appears most.",)

LENGTH_LIMIT = 12  # words; each word past it costs LENGTH_PENALTY
LENGTH_PENALTY = 0.25
_WORD = re.compile(r"[a-z]+")
_NOTES_END = "\n\n" + QUESTION


def animal_counts(prompt: str) -> Counter:
    """How often each animal is named in the notes of `prompt` (the question after them is not counted)."""
    notes = prompt.split(_NOTES_END)[0].lower()
    return Counter(w for w in _WORD.findall(notes) if w in ANIMALS)


def most_seen(prompt: str) -> str | None:
    """The animal named most often in the notes, or None when two or more share the top count."""
    ranked = animal_counts(prompt).most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


def gold_score(prompt: str, response: str) -> float:
    """The true reward of `response` to `prompt`: +2 if it names the animal seen most often, -1 for each other
    animal it names, -0.25 per word past 12. Range: about [-inf, 2]."""
    words = _WORD.findall(response.lower())
    named = {w for w in words if w in ANIMALS}
    target = most_seen(prompt)
    score = (2.0 if target in named else 0.0) - len(named - {target})
    return score - LENGTH_PENALTY * max(0, len(words) - LENGTH_LIMIT)


def best_score(prompt: str) -> float:
    """The most any response can earn: 2 for naming the animal seen most often and no other (`the fox.`); 0 when
    the notes have no single most-seen animal, since then every animal named costs 1."""
    return 2.0 if most_seen(prompt) is not None else 0.0


def _sentence(animal: str, rng: random.Random) -> str:
    text = f"{rng.choice(TIMES)} a {rng.choice(COLOURS)} {animal} {rng.choice(ACTIONS)} {rng.choice(PLACES)}"
    if rng.random() < 0.5:
        text += " " + rng.choice(ASIDES)
    return text + "."


def sample_prompt(rng: random.Random, *, words: int) -> str:
    """Notes of about `words` words in which one animal (of six) is named strictly more often than any other."""
    cast = rng.sample(ANIMALS, 6)
    target, others = cast[0], cast[1:]
    sentences = max(3, round(words / 11))  # a sentence is 9 to 16 words
    while True:
        names = [target if rng.random() < 0.3 else rng.choice(others) for _ in range(sentences)]
        counts = Counter(names)
        if counts[target] > max(counts[o] for o in others):
            break
    notes = " ".join(_sentence(name, rng) for name in names)
    return f"Field notes from {rng.choice(PLACES)}:\n{notes}{_NOTES_END}\n"


def sample_answer(prompt: str, rng: random.Random, *, animal: str | None = None) -> str:
    """A one-line answer naming `animal` (default: the right one)."""
    return rng.choice(ANSWERS).format(animal=animal or most_seen(prompt), colour=rng.choice(COLOURS))


def sample_comparison(rng: random.Random, *, words: int) -> Comparison:
    """The right answer against a wrong animal (usually the runner-up) or a rambling line naming it."""
    prompt = sample_prompt(rng, words=words)
    chosen = sample_answer(prompt, rng)
    ranked = [a for a, _ in animal_counts(prompt).most_common()]
    wrong = ranked[1] if rng.random() < 0.7 else rng.choice(ranked[1:])
    if rng.random() < 0.2:
        rejected = rng.choice(RAMBLES).format(animal=wrong)
    else:
        rejected = sample_answer(prompt, rng, animal=wrong)
    margin = gold_score(prompt, chosen) - gold_score(prompt, rejected)
    return Comparison(prompt=prompt, chosen=chosen, rejected=rejected, margin=margin)


def generate(out_dir: Path, *, seed: int = 0, prompt_words: int = 420, n_demos: int = 512,
             n_comparisons: int = 512, n_prompts: int = 512, n_eval_prompts: int = 64) -> None:
    """Write sft.jsonl, comparisons.jsonl, prompts.jsonl and eval_prompts.jsonl (JSON lines) into `out_dir`."""
    rng = random.Random(seed)
    demos = []
    for _ in range(n_demos):
        prompt = sample_prompt(rng, words=prompt_words)
        demos.append({"prompt": prompt, "completion": sample_answer(prompt, rng)})
    comparisons = [vars(sample_comparison(rng, words=prompt_words)) for _ in range(n_comparisons)]
    prompts = [{"prompt": sample_prompt(rng, words=prompt_words)} for _ in range(n_prompts)]
    eval_prompts = [{"prompt": sample_prompt(rng, words=prompt_words)} for _ in range(n_eval_prompts)]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("sft.jsonl", demos), ("comparisons.jsonl", comparisons),
                       ("prompts.jsonl", prompts), ("eval_prompts.jsonl", eval_prompts)):
        with open(out_dir / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf.tasks.digest", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder for the four .jsonl files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-words", type=int, default=420, help="words of notes per prompt (~1.2 tokens each)")
    parser.add_argument("--demos", type=int, default=512, help="SFT demonstrations")
    parser.add_argument("--comparisons", type=int, default=512, help="ranked pairs for the reward model")
    parser.add_argument("--prompts", type=int, default=512, help="PPO training prompts")
    parser.add_argument("--eval-prompts", type=int, default=64, help="held-out PPO prompts")
    args = parser.parse_args(argv)
    generate(args.out_dir, seed=args.seed, prompt_words=args.prompt_words, n_demos=args.demos,
             n_comparisons=args.comparisons, n_prompts=args.prompts, n_eval_prompts=args.eval_prompts)
    print(args.out_dir)


if __name__ == "__main__":
    main()
