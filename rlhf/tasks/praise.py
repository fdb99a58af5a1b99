"""The bundled synthetic task, "praise": describe an animal kindly, with a gold reward in code.

A prompt asks about one animal (`Describe the red fox.`); a response is a short line of words.
The gold function scores a response by its words, so later stages can show that RLHF raised the
true objective and not only the reward model's proxy of it.

Regenerate the shipped data (deterministic; `tests/test_praise.py` checks the files are current):
    python -m rlhf.tasks.praise data/tiny
"""

from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ANIMALS = ("cat", "dog", "fox", "owl", "horse", "rabbit", "bear", "wolf",
           "duck", "goat", "mouse", "tiger", "whale", "frog", "sheep", "eagle")
COLOURS = ("red", "brown", "grey", "white", "black", "golden", "spotted", "young")
POSITIVE = ("kind", "gentle", "brave", "calm", "clever", "happy",
            "bright", "friendly", "graceful", "loyal", "playful", "wise")
NEGATIVE = ("rude", "lazy", "dull", "angry", "noisy", "greedy",
            "mean", "clumsy", "sleepy", "grumpy", "smelly", "scary")
NEUTRAL = ("small", "large", "quiet", "fast", "old", "round", "tall", "furry")
PROMPT_TEMPLATES = ("Describe the {colour} {animal}.", "Tell me about the {colour} {animal}.",
                    "What is the {colour} {animal} like?", "Write a line about the {colour} {animal}.")
RESPONSE_TEMPLATES = ("the {subject} is {a} and {b}.", "a {subject} can be {a}, {b} and {c}.",
                      "my {subject} looks {a}.", "it is {a} but {b}.", "this {subject} seems {a} and very {b}.")

MAX_COUNTED_POSITIVE = 3  # distinct positive words that count; more earn nothing
LENGTH_LIMIT = 12  # words; each word past it costs LENGTH_PENALTY
LENGTH_PENALTY = 0.25
_WORD = re.compile(r"[a-z]+")
_PROMPT_ANIMAL = re.compile(r"the (?:\w+ )?(" + "|".join(ANIMALS) + r")\b")


def prompt_animal(prompt: str) -> str | None:
    """The animal a prompt asks about, or None when it names none."""
    match = _PROMPT_ANIMAL.search(prompt.lower())
    return match.group(1) if match else None


def gold_score(prompt: str, response: str) -> float:
    """The true reward of `response` to `prompt`.

    +1 per distinct positive adjective (at most 3), -1 per negative adjective (each use),
    +1 if the response names the prompt's animal, -0.5 if it names another animal instead,
    -0.25 per word past 12. Range: about [-inf, 4]; the demonstrations average about 0.5.
    """
    words = _WORD.findall(response.lower())
    positive = len({w for w in words if w in POSITIVE})
    score = float(min(positive, MAX_COUNTED_POSITIVE))
    score -= sum(1 for w in words if w in NEGATIVE)
    target = prompt_animal(prompt)
    named = {w for w in words if w in ANIMALS}
    if target in named:
        score += 1.0
    elif named:
        score -= 0.5
    score -= LENGTH_PENALTY * max(0, len(words) - LENGTH_LIMIT)
    return score


def best_score(prompt: str) -> float:
    """The most any response can earn: 3 distinct positive words and the prompt's animal (`kind brave calm fox`),
    within 12 words. A prompt that names no animal earns nothing for one and loses 0.5 for any, so 3."""
    return MAX_COUNTED_POSITIVE + (1.0 if prompt_animal(prompt) is not None else 0.0)


def sample_prompt(rng: random.Random) -> str:
    template = rng.choice(PROMPT_TEMPLATES)
    return template.format(colour=rng.choice(COLOURS), animal=rng.choice(ANIMALS))


def _adjective(rng: random.Random) -> str:
    roll = rng.random()
    pool = POSITIVE if roll < 0.4 else NEGATIVE if roll < 0.75 else NEUTRAL
    return rng.choice(pool)


def _slots(prompt: str, rng: random.Random) -> dict[str, str]:
    """The words a response template is filled with: on topic 60% of the time, mixed adjectives."""
    target = prompt_animal(prompt) or rng.choice(ANIMALS)
    subject = target if rng.random() < 0.6 else rng.choice([a for a in ANIMALS if a != target])
    return {"subject": subject, "a": _adjective(rng), "b": _adjective(rng), "c": _adjective(rng)}


def sample_response(prompt: str, rng: random.Random) -> str:
    """A demonstration-quality response: on topic 60% of the time, adjectives of mixed sentiment."""
    slots = _slots(prompt, rng)
    return rng.choice(RESPONSE_TEMPLATES).format(**slots)


@dataclass(frozen=True)
class Comparison:
    prompt: str
    chosen: str
    rejected: str
    margin: float  # gold(chosen) - gold(rejected), > 0


def _ranked(prompt: str, first: str, second: str) -> Comparison | None:
    gap = gold_score(prompt, first) - gold_score(prompt, second)
    if gap == 0:
        return None
    chosen, rejected = (first, second) if gap > 0 else (second, first)
    return Comparison(prompt=prompt, chosen=chosen, rejected=rejected, margin=abs(gap))


def sample_comparison(rng: random.Random) -> Comparison:
    """Two independent responses to one prompt, ranked by the gold function (ties are redrawn)."""
    prompt = sample_prompt(rng)
    while (pair := _ranked(prompt, sample_response(prompt, rng), sample_response(prompt, rng))) is None:
        pass
    return pair


def sample_edit_comparison(rng: random.Random, animal_share: float | None = None) -> Comparison:
    """A response and a copy of it with one word changed (the animal or one adjective), ranked by
    the gold function. Such minimal pairs isolate one term of the gold reward each, which a small
    reward model cannot tease apart from independent pairs alone (ties are redrawn).

    With `animal_share`, that share of the edits swap the prompt's animal for another (or back),
    the one term that needs the prompt and the response compared; the rest change one adjective."""
    prompt = sample_prompt(rng)
    while True:
        template = rng.choice(RESPONSE_TEMPLATES)
        slots = _slots(prompt, rng)
        used = [name for name in ("subject", "a", "b", "c") if "{" + name + "}" in template]
        if animal_share is None:
            changed = rng.choice(used)
        elif "subject" in used and rng.random() < animal_share:
            changed = "subject"
        else:
            changed = rng.choice([name for name in used if name != "subject"])
        if changed == "subject" and animal_share is not None:
            target = prompt_animal(prompt)
            other = target if slots["subject"] != target else rng.choice([a for a in ANIMALS if a != target])
        elif changed == "subject":
            other = rng.choice([a for a in ANIMALS if a != slots["subject"]])
        else:
            other = _adjective(rng)
        pair = _ranked(prompt, template.format(**slots), template.format(**{**slots, changed: other}))
        if pair is not None:
            return pair


# The prompt text as the policy sees it: a newline separates it from the response.
def as_policy_prompt(prompt: str) -> str:
    return prompt + "\n"


EDIT_FRACTION = 0.6  # share of the shipped comparisons that are minimal (one-word) edits
# Share of those edits that swap the animal (prompt's animal for another, or back): the animal-match term
# needs the prompt and the response compared, which the reward model learns late or never from fewer.
ANIMAL_EDIT_SHARE = 0.75


def generate(out_dir: Path, *, seed: int = 0, n_demos: int = 1500, n_comparisons: int = 4000,
             n_prompts: int = 1000, n_eval_prompts: int = 200) -> None:
    """Write the task's data sets (JSON lines) into `out_dir`."""
    rng = random.Random(seed)
    all_prompts = sorted({t.format(colour=c, animal=a)
                          for t in PROMPT_TEMPLATES for c in COLOURS for a in ANIMALS})
    rng.shuffle(all_prompts)
    held_out = set(all_prompts[:64])  # eval prompts never appear in any training file
    eval_pool = sorted(held_out)

    def train_prompt() -> str:
        while (prompt := sample_prompt(rng)) in held_out:
            pass
        return prompt

    demos = []
    for _ in range(n_demos):
        prompt = train_prompt()
        demos.append({"prompt": as_policy_prompt(prompt), "completion": sample_response(prompt, rng)})
    comparisons = []
    while len(comparisons) < n_comparisons:
        if rng.random() < EDIT_FRACTION:
            pair = sample_edit_comparison(rng, animal_share=ANIMAL_EDIT_SHARE)
        else:
            pair = sample_comparison(rng)
        if pair.prompt in held_out:
            continue
        comparisons.append({"prompt": as_policy_prompt(pair.prompt), "chosen": pair.chosen,
                            "rejected": pair.rejected, "margin": pair.margin})
    prompts = [{"prompt": as_policy_prompt(train_prompt())} for _ in range(n_prompts)]
    eval_prompts = [{"prompt": as_policy_prompt(rng.choice(eval_pool))} for _ in range(n_eval_prompts)]

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("sft.jsonl", demos), ("comparisons.jsonl", comparisons),
                       ("prompts.jsonl", prompts), ("eval_prompts.jsonl", eval_prompts)):
        with open(out_dir / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    generate(Path(sys.argv[1] if len(sys.argv) > 1 else "data/tiny"))
