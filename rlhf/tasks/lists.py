"""A gold task about form, "lists": answer with as many items as the prompt asks for, of the kind it asks for.

A prompt asks for a number of things of one kind (`Name three birds.`); a response is a short list (`robin, crow
and swan.`). The gold reward is about the answer's shape: one item too few costs as much as one too many, and an
item of the wrong kind fills a place without earning it. The count is a word in the prompt, so the best length of
a response changes from prompt to prompt, and `best_score` with it.

Write the data sets (deterministic for a seed; generated, not shipped):
    python -m rlhf.tasks.lists runs/lists-data [--seed 0] [--demos 2000] [--comparisons 2000] ...
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from rlhf.tasks import generator

CATEGORIES = {
    "fruits": ("apple", "pear", "plum", "peach", "lemon", "grape", "cherry", "mango"),
    "birds": ("robin", "crow", "swan", "wren", "hawk", "finch", "goose", "heron"),
    "tools": ("hammer", "saw", "drill", "spade", "rake", "chisel", "wrench", "axe"),
    "flowers": ("rose", "tulip", "daisy", "lily", "poppy", "iris", "violet", "orchid"),
    "trees": ("oak", "pine", "birch", "maple", "willow", "elm", "ash", "cedar"),
    "fish": ("trout", "salmon", "cod", "carp", "perch", "pike", "tuna", "eel"),
}
NUMBERS = {"two": 2, "three": 3, "four": 4, "five": 5}
PROMPT_TEMPLATES = ("List {n} {category}.", "Name {n} {category}, please.", "Give me {n} {category}.",
                    "Can you think of {n} {category}?", "Tell me {n} {category}.", "Write down {n} {category}.")
RESPONSE_TEMPLATES = ("{items}.", "sure: {items}.", "how about {items}?", "i would pick {items}.", "my list: {items}.")

EXTRA_PENALTY = 1.0  # per item past the count asked for
LENGTH_LIMIT = 12  # words; each word past it costs LENGTH_PENALTY
LENGTH_PENALTY = 0.25
ITEMS = {item: category for category, items in CATEGORIES.items() for item in items}
_WORD = re.compile(r"[a-z]+")
# How far a demonstration's list is from the count asked: mostly right, sometimes one off.
_COUNT_ERRORS = (-2, -1, 0, 1, 2)
_COUNT_WEIGHTS = (0.05, 0.15, 0.55, 0.2, 0.05)


@dataclass(frozen=True)
class Request:
    """What a prompt asks for."""

    count: int  # how many items
    category: str  # a key of CATEGORIES


def request(prompt: str) -> Request | None:
    """The count and kind a prompt asks for, or None when it follows none of the task's templates."""
    slots = generator.template_slots(prompt, PROMPT_TEMPLATES)
    if slots is None or slots["n"] not in NUMBERS or slots["category"] not in CATEGORIES:
        return None
    return Request(count=NUMBERS[slots["n"]], category=slots["category"])


def gold_score(prompt: str, response: str) -> float:
    """The true reward of `response` to `prompt`.

    With N the count asked: +1 per distinct item of the asked kind, up to N; -1 per item (any kind, repeats too)
    past N; -0.25 per word past 12. A prompt outside the templates asks for no items, so every item is one too many.
    Range: about [-inf, N].
    """
    words = _WORD.findall(response.lower())
    items = [w for w in words if w in ITEMS]
    asked = request(prompt)
    count = asked.count if asked else 0
    right = {w for w in items if asked and ITEMS[w] == asked.category}
    score = min(len(right), count) - EXTRA_PENALTY * max(0, len(items) - count)
    return score - LENGTH_PENALTY * max(0, len(words) - LENGTH_LIMIT)


def best_score(prompt: str) -> float:
    """The most any response can earn: N distinct items of the asked kind and nothing more (`robin, crow and
    swan.`); 0 for a prompt outside the templates (the empty answer)."""
    asked = request(prompt)
    return float(asked.count) if asked else 0.0


def _asked(prompt: str) -> Request:
    asked = request(prompt)
    if asked is None:
        raise ValueError(f"lists: prompt {prompt!r} follows none of the task's templates")
    return asked


def _wrong_item(asked: Request, rng: random.Random) -> str:
    return rng.choice([item for item, category in ITEMS.items() if category != asked.category])


def _draft(asked: Request, rng: random.Random) -> list[str]:
    """A demonstration's items: the count is off by one a third of the time; one item in ten is of another kind,
    one in twenty repeats an earlier one."""
    size = max(1, asked.count + rng.choices(_COUNT_ERRORS, weights=_COUNT_WEIGHTS)[0])
    items = rng.sample(CATEGORIES[asked.category], size)
    for i in range(size):
        roll = rng.random()
        if roll < 0.1:
            items[i] = _wrong_item(asked, rng)
        elif roll < 0.15 and i > 0:
            items[i] = rng.choice(items[:i])
    return items


def _render(items: list[str], *, template: str, joined: bool) -> str:
    """`a, b and c` when `joined`, else `a, b, c`, in the template."""
    if joined and len(items) > 1:
        text = ", ".join(items[:-1]) + " and " + items[-1]
    else:
        text = ", ".join(items)
    return template.format(items=text)


def sample_response(prompt: str, rng: random.Random) -> str:
    """A demonstration-quality response: usually the right count of the right kind, not always."""
    items = _draft(_asked(prompt), rng)
    return _render(items, template=rng.choice(RESPONSE_TEMPLATES), joined=rng.random() < 0.5)


def sample_edit(prompt: str, rng: random.Random) -> tuple[str, str]:
    """A list and a copy with one item added, removed, or swapped for one of another kind or for a repeat."""
    asked = _asked(prompt)
    items = _draft(asked, rng)
    edited = list(items)
    roll = rng.random()
    unused = [item for item in CATEGORIES[asked.category] if item not in items]
    if (roll < 0.3 or len(items) == 1) and unused:
        edited.insert(rng.randrange(len(items) + 1), rng.choice(unused))
    elif roll < 0.6 and len(items) > 1:
        del edited[rng.randrange(len(items))]
    elif roll < 0.85 or len(items) == 1:
        edited[rng.randrange(len(items))] = _wrong_item(asked, rng)
    else:
        i, j = rng.sample(range(len(items)), 2)
        edited[i] = items[j]
    style = {"template": rng.choice(RESPONSE_TEMPLATES), "joined": rng.random() < 0.5}
    return _render(items, **style), _render(edited, **style)


PROMPTS = tuple(template.format(n=n, category=category) + "\n"
                for template in PROMPT_TEMPLATES for n in NUMBERS for category in CATEGORIES)
RECIPE = generator.Recipe(name="lists", prompts=PROMPTS, respond=sample_response, edit=sample_edit, gold=gold_score)

generate = generator.writer(RECIPE)


if __name__ == "__main__":
    generator.main(RECIPE, description=__doc__.splitlines()[0])
