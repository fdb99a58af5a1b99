"""What the generated gold tasks (palette, lists, chores) share: a held-out split of their prompts, demonstrations,
comparisons ranked by the gold reward (independent pairs and minimal edits), the four JSON-lines files the stages
read (the same names and fields as the praise task's data/tiny/), and the command line that writes them.

A task supplies a `Recipe`: every prompt it can ask, a response sampler, a minimal-edit sampler and its gold reward.
    python -m rlhf.tasks.palette runs/palette-data [--seed 0] [--demos 2000] [--comparisons 2000] ...
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

GoldFn = Callable[[str, str], float]  # (prompt text, response text) -> true reward
Respond = Callable[[str, random.Random], str]  # prompt text -> one response
Edit = Callable[[str, random.Random], tuple[str, str]]  # prompt text -> two responses one change apart

FILES = ("sft.jsonl", "comparisons.jsonl", "prompts.jsonl", "eval_prompts.jsonl")
MAX_HELD_OUT = 64  # held-out eval prompts, at most (praise holds out 64)
MAX_TRIES = 1000  # redraws of a tied pair before the task is declared broken


@dataclass(frozen=True)
class Recipe:
    """A generated task: the prompts it can ask and how its responses are drawn and judged."""

    name: str  # the module name, for messages and the command line
    prompts: tuple[str, ...]  # every prompt the task asks, as the policy sees it (ends with a newline)
    respond: Respond  # a demonstration-quality response: mostly decent, not all optimal
    edit: Edit  # two responses one word or one item apart, so each gold term can be seen alone
    gold: GoldFn


@dataclass(frozen=True)
class Counts:
    """Rows per file; every count at least 1, since the stages refuse an empty data set."""

    demos: int = 2000  # sft.jsonl: SFT demonstrations
    comparisons: int = 2000  # comparisons.jsonl: ranked pairs for the reward model
    prompts: int = 1000  # prompts.jsonl: PPO training prompts
    eval_prompts: int = 200  # eval_prompts.jsonl: held-out PPO prompts, drawn with repeats

    def __post_init__(self) -> None:
        for name in ("demos", "comparisons", "prompts", "eval_prompts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number of rows, at least 1; got {value!r}")


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    margin: float  # gold(chosen) - gold(rejected), > 0
    independent: bool  # two independent draws; False: a minimal edit. Not written: the files keep praise's fields


@dataclass(frozen=True)
class TaskData:
    demos: list[tuple[str, str]]  # (prompt, completion)
    comparisons: list[Pair]
    prompts: list[str]
    eval_prompts: list[str]  # drawn from the held-out prompts only


def template_slots(text: str, templates: tuple[str, ...]) -> dict[str, str] | None:
    """The slot values of the first template `text` matches (case and surrounding space ignored), else None:
    `template_slots("Paint the door red.", ("Paint the {thing} {colour}.",))` is {"thing": "door", "colour": "red"}."""
    for template in templates:
        pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[a-z]+)", re.escape(template.lower()))
        match = re.fullmatch(pattern, text.strip().lower())
        if match:
            return match.groupdict()
    return None


def rank(gold: GoldFn, prompt: str, first: str, second: str, *, independent: bool) -> Pair | None:
    """The two responses as chosen and rejected by the gold reward, or None when gold ties them."""
    gap = gold(prompt, first) - gold(prompt, second)
    if gap == 0:
        return None
    chosen, rejected = (first, second) if gap > 0 else (second, first)
    return Pair(prompt=prompt, chosen=chosen, rejected=rejected, margin=abs(gap), independent=independent)


def sample_pair(recipe: Recipe, prompt: str, rng: random.Random, *, independent: bool) -> Pair:
    """An independent pair (two draws of `recipe.respond`) or a minimal edit, ranked by gold; ties are dropped and
    redrawn for the same prompt."""
    for _ in range(MAX_TRIES):
        first, second = ((recipe.respond(prompt, rng), recipe.respond(prompt, rng)) if independent
                         else recipe.edit(prompt, rng))
        pair = rank(recipe.gold, prompt, first, second, independent=independent)
        if pair is not None:
            return pair
    raise RuntimeError(f"task {recipe.name}: {MAX_TRIES} pairs in a row tied under gold for prompt {prompt!r}")


def split_prompts(prompts: tuple[str, ...], rng: random.Random) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): an eighth of the task's prompts (at most 64) never appear in training."""
    pool = sorted(set(prompts))
    if len(pool) < 2:
        raise ValueError(f"a task needs at least 2 distinct prompts to hold some out, has {len(pool)}")
    rng.shuffle(pool)
    held = min(MAX_HELD_OUT, max(1, len(pool) // 8))
    return sorted(pool[held:]), sorted(pool[:held])


def sample_data(recipe: Recipe, *, seed: int, counts: Counts, independent_share: float = 0.5) -> TaskData:
    """Every row of the four files, deterministic for `seed`. Exactly round(independent_share * comparisons) of
    the comparisons are independent pairs, the rest minimal edits, in shuffled order."""
    if isinstance(independent_share, bool) or not isinstance(independent_share, (int, float)) \
            or not 0 <= independent_share <= 1:
        raise ValueError(f"independent_share must be a number from 0 to 1, got {independent_share!r}")
    rng = random.Random(seed)
    train, held = split_prompts(recipe.prompts, rng)
    demos = []
    for _ in range(counts.demos):
        prompt = rng.choice(train)
        demos.append((prompt, recipe.respond(prompt, rng)))
    n_independent = round(independent_share * counts.comparisons)
    kinds = [True] * n_independent + [False] * (counts.comparisons - n_independent)
    rng.shuffle(kinds)
    comparisons = [sample_pair(recipe, rng.choice(train), rng, independent=kind) for kind in kinds]
    prompts = [rng.choice(train) for _ in range(counts.prompts)]
    eval_prompts = [rng.choice(held) for _ in range(counts.eval_prompts)]
    return TaskData(demos=demos, comparisons=comparisons, prompts=prompts, eval_prompts=eval_prompts)


def write_data(out_dir: Path, data: TaskData) -> None:
    """sft.jsonl, comparisons.jsonl, prompts.jsonl and eval_prompts.jsonl, with praise's fields."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file; the data sets need a folder")
    rows = {
        "sft.jsonl": [{"prompt": p, "completion": c} for p, c in data.demos],
        "comparisons.jsonl": [{"prompt": c.prompt, "chosen": c.chosen, "rejected": c.rejected, "margin": c.margin}
                              for c in data.comparisons],
        "prompts.jsonl": [{"prompt": p} for p in data.prompts],
        "eval_prompts.jsonl": [{"prompt": p} for p in data.eval_prompts],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        with open(out_dir / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows[name])


def generate(recipe: Recipe, out_dir: Path, *, seed: int, counts: Counts, independent_share: float = 0.5) -> None:
    write_data(out_dir, sample_data(recipe, seed=seed, counts=counts, independent_share=independent_share))


def writer(recipe: Recipe):
    """The task module's `generate(out_dir, *, seed, n_demos, ...)` (rlhf.tasks.Generate) for `recipe`."""
    defaults = Counts()

    def generate_task(out_dir: Path, *, seed: int = 0, n_demos: int = defaults.demos,
                      n_comparisons: int = defaults.comparisons, n_prompts: int = defaults.prompts,
                      n_eval_prompts: int = defaults.eval_prompts, independent_share: float = 0.5) -> None:
        """Write sft.jsonl, comparisons.jsonl, prompts.jsonl and eval_prompts.jsonl (JSON lines) into `out_dir`."""
        counts = Counts(demos=n_demos, comparisons=n_comparisons, prompts=n_prompts, eval_prompts=n_eval_prompts)
        generate(recipe, out_dir, seed=seed, counts=counts, independent_share=independent_share)

    return generate_task


def main(recipe: Recipe, argv: list[str] | None = None, *, description: str) -> None:
    """`python -m rlhf.tasks.<name> OUT_DIR [--seed N] [--demos N] ...`: write the task's four files."""
    defaults = Counts()
    parser = argparse.ArgumentParser(prog=f"python -m rlhf.tasks.{recipe.name}", description=description)
    parser.add_argument("out_dir", type=Path, help="folder for the four .jsonl files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--demos", type=int, default=defaults.demos, help="SFT demonstrations")
    parser.add_argument("--comparisons", type=int, default=defaults.comparisons,
                        help="ranked pairs for the reward model")
    parser.add_argument("--prompts", type=int, default=defaults.prompts, help="PPO training prompts")
    parser.add_argument("--eval-prompts", type=int, default=defaults.eval_prompts, help="held-out PPO prompts")
    parser.add_argument("--independent-share", type=float, default=0.5,
                        help="share of comparisons drawn as two independent responses (the rest: minimal edits)")
    args = parser.parse_args(argv)
    try:
        counts = Counts(demos=args.demos, comparisons=args.comparisons, prompts=args.prompts,
                        eval_prompts=args.eval_prompts)
        generate(recipe, args.out_dir, seed=args.seed, counts=counts, independent_share=args.independent_share)
    except ValueError as err:
        parser.error(str(err))
    print(args.out_dir)
