"""A gold task whose constraint depends on the prompt, "palette": use the colour asked for, never the one refused.

A prompt names a thing, a colour to use and a colour to avoid (`Paint the door red, not blue.`); a response is a
short line. Half the right answer is in the prompt and so is the trap: copying the prompt's colours earns +2 for
one and -2 for the other, so a reward model must read which colour the prompt wants, not only which it mentions.

Write the data sets (deterministic for a seed; generated, not shipped):
    python -m rlhf.tasks.palette runs/palette-data [--seed 0] [--demos 2000] [--comparisons 2000] ...
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from rlhf.tasks import generator

COLOURS = ("red", "blue", "green", "yellow", "pink", "purple", "orange", "white")
THINGS = ("door", "boat", "kite", "wall", "car", "hat", "cup", "chair", "bike", "fence")
PROMPT_TEMPLATES = ("Paint the {thing} {want}, not {avoid}.", "Make the {thing} {want} but never {avoid}.",
                    "I would like the {thing} in {want}, no {avoid} please.",
                    "Colour the {thing} {want} and keep {avoid} off it.")
RESPONSE_TEMPLATES = ("the {thing} is {c1} now.", "a {c1} {thing} with {c2} trim.", "i painted the {thing} {c1}.",
                      "{c1} and {c2}, as you asked.", "here is your {c1} {thing}.",
                      "it looks {c1}, with a little {c2}.")

WANT_BONUS = 2.0  # the asked-for colour is used
AVOID_PENALTY = 2.0  # the refused colour is used
OTHER_PENALTY = 0.5  # per distinct colour the prompt named neither way
THING_BONUS = 1.0  # the prompt's thing is named
LENGTH_LIMIT = 12  # words; each word past it costs LENGTH_PENALTY
LENGTH_PENALTY = 0.25
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Brief:
    """What a prompt asks for."""

    thing: str
    want: str  # the colour to use
    avoid: str  # the colour to keep off


def brief(prompt: str) -> Brief | None:
    """The thing and colours a prompt names, or None when it follows none of the task's templates."""
    slots = generator.template_slots(prompt, PROMPT_TEMPLATES)
    if slots is None or slots["thing"] not in THINGS or not {slots["want"], slots["avoid"]} <= set(COLOURS):
        return None
    return Brief(**slots)


def gold_score(prompt: str, response: str) -> float:
    """The true reward of `response` to `prompt`.

    +2 if it uses the colour asked for, -2 if it uses the colour refused, -0.5 per other distinct colour, +1 if it
    names the prompt's thing, -0.25 per word past 12. A prompt outside the templates asks for nothing, so every
    colour named is an other colour. Range: about [-inf, 3].
    """
    words = _WORD.findall(response.lower())
    used = {w for w in words if w in COLOURS}
    asked = brief(prompt)
    score = 0.0
    if asked is not None:
        score += WANT_BONUS * (asked.want in used) - AVOID_PENALTY * (asked.avoid in used)
        score += THING_BONUS * (asked.thing in words)
        used -= {asked.want, asked.avoid}
    score -= OTHER_PENALTY * len(used)
    return score - LENGTH_PENALTY * max(0, len(words) - LENGTH_LIMIT)


def best_score(prompt: str) -> float:
    """The most any response can earn: the wanted colour and the thing, nothing else (`red door`). A prompt whose
    wanted colour is also its refused one nets 0 for it either way; a prompt outside the templates earns 0 at best."""
    asked = brief(prompt)
    if asked is None:
        return 0.0
    return (WANT_BONUS if asked.want != asked.avoid else 0.0) + THING_BONUS


def _colour(asked: Brief, rng: random.Random, *, want: float, avoid: float) -> str:
    roll = rng.random()
    if roll < want:
        return asked.want
    if roll < want + avoid:
        return asked.avoid
    return rng.choice([c for c in COLOURS if c not in (asked.want, asked.avoid)])


def _slots(asked: Brief, rng: random.Random) -> dict[str, str]:
    """The first colour is the wanted one 65% of the time, the refused one 15%; the second is mostly another."""
    thing = asked.thing if rng.random() < 0.8 else rng.choice([t for t in THINGS if t != asked.thing])
    return {"thing": thing, "c1": _colour(asked, rng, want=0.65, avoid=0.15),
            "c2": _colour(asked, rng, want=0.2, avoid=0.15)}


def _asked(prompt: str) -> Brief:
    asked = brief(prompt)
    if asked is None:
        raise ValueError(f"palette: prompt {prompt!r} follows none of the task's templates")
    return asked


def sample_response(prompt: str, rng: random.Random) -> str:
    """A demonstration-quality response: usually the right colour and thing, sometimes the refused colour."""
    return rng.choice(RESPONSE_TEMPLATES).format(**_slots(_asked(prompt), rng))


def sample_edit(prompt: str, rng: random.Random) -> tuple[str, str]:
    """A response and a copy with one slot changed; two edits in three change a colour to or from a prompt colour,
    the term that needs the prompt and the response read together."""
    asked = _asked(prompt)
    template = rng.choice(RESPONSE_TEMPLATES)
    slots = _slots(asked, rng)
    colours = [name for name in ("c1", "c2") if "{" + name + "}" in template]
    changed = rng.choice(colours) if rng.random() < 2 / 3 else "thing"
    if changed == "thing":
        other = asked.thing if slots["thing"] != asked.thing else rng.choice([t for t in THINGS if t != asked.thing])
    else:
        other = rng.choice([c for c in (asked.want, asked.avoid) if c != slots[changed]])
    return template.format(**slots), template.format(**{**slots, changed: other})


PROMPTS = tuple(template.format(thing=thing, want=want, avoid=avoid) + "\n"
                for template in PROMPT_TEMPLATES for thing in THINGS
                for want in COLOURS for avoid in COLOURS if want != avoid)
RECIPE = generator.Recipe(name="palette", prompts=PROMPTS, respond=sample_response, edit=sample_edit,
                          gold=gold_score)

generate = generator.writer(RECIPE)


if __name__ == "__main__":
    generator.main(RECIPE, description=__doc__.splitlines()[0])
