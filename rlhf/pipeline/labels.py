"""Pairs of sampled responses and their labels, for the collect step of iterated rounds.

A labeller ranks each pair: the task's gold reward (a simulated annotator), or a person who fills in a
labels file. The file format, one JSON object per line:

    to label (written by `make collect`):  {"id": "r2-00017", "round": 2, "prompt": "...", "a": "...", "b": "..."}
    labels   (written by you):             {"id": "r2-00017", "round": 2, "choice": "a"}

`choice` is `a` or `b` (the better response), or `skip` for a pair you cannot rank; a tie is not a label.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path

from rlhf.errors import DataError

CHOICES = ("a", "b", "skip")


@dataclass(frozen=True)
class CandidatePair:
    id: str  # "r<round>-<index>", unique within the round
    round: int
    prompt: str
    a: str
    b: str


@dataclass(frozen=True)
class Comparison:
    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None  # gold labeller: the gold-score difference

    def row(self) -> dict:
        row = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        if self.margin is not None:
            row["margin"] = self.margin
        return row


def make_pairs(samples: list[tuple[str, list[str]]], *, round: int, max_pairs_per_prompt: int,
               seed: int) -> list[CandidatePair]:
    """Pairs of distinct responses per prompt: at most `max_pairs_per_prompt`, drawn at random."""
    rng = random.Random(seed)
    pairs = []
    for prompt, responses in samples:
        distinct = list(dict.fromkeys(responses))  # identical responses rank nothing
        options = list(combinations(distinct, 2))
        rng.shuffle(options)
        for a, b in options[:max_pairs_per_prompt]:
            pairs.append(CandidatePair(id=f"r{round}-{len(pairs):05d}", round=round, prompt=prompt, a=a, b=b))
    return pairs


def gold_labels(pairs: list[CandidatePair], gold: Callable[[str, str], float]) -> tuple[list[Comparison], int]:
    """Rank each pair by the gold reward; pairs with equal gold scores are dropped. Returns (comparisons, ties)."""
    out, ties = [], 0
    for pair in pairs:
        score_a, score_b = gold(pair.prompt, pair.a), gold(pair.prompt, pair.b)
        if score_a == score_b:
            ties += 1
            continue
        chosen, rejected = (pair.a, pair.b) if score_a > score_b else (pair.b, pair.a)
        out.append(Comparison(pair.prompt, chosen, rejected, margin=abs(score_a - score_b)))
    return out, ties


def write_pairs(pairs: list[CandidatePair], path: Path) -> None:
    """The pairs to label, one JSON line each (written to a temp file, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    tmp.replace(path)


def read_pairs(path: Path) -> list[CandidatePair]:
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            pairs.append(CandidatePair(**json.loads(line)))
        except (ValueError, TypeError) as err:
            raise DataError(f"{path}, line {number}: not a pair written by `rlhf collect` ({err}); delete the "
                            "file to sample the pairs again") from None
    return pairs


def read_labels(path: Path, pairs: list[CandidatePair], *, round: int) -> tuple[list[Comparison], int]:
    """Your labels for `pairs`: every pair labelled exactly once, for this round. Returns (comparisons, skipped)."""
    if not path.is_file():
        raise DataError(f"labels file {path} not found")
    by_id = {p.id: p for p in pairs}
    choices: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except ValueError as err:
            raise DataError(f"{where}: not valid JSON ({err.args[0] if err.args else err})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object with 'id' and 'choice', got {type(record).__name__}")
        pair_id, choice = record.get("id"), record.get("choice")
        if not isinstance(pair_id, str):
            raise DataError(f"{where}: field 'id' is missing or not a string")
        if "round" in record and record["round"] != round:
            raise DataError(f"{where}: field 'round' is {record['round']!r}, but this is round {round}; "
                            "these labels belong to another round's pairs")
        if pair_id not in by_id:
            other = pair_id.split("-")[0]
            hint = (f" (an id of round {other[1:]}; this is round {round})" if other.startswith("r")
                    and other[1:].isdigit() and other[1:] != str(round) else "")
            raise DataError(f"{where}: field 'id' {pair_id!r} matches no collected pair{hint}")
        if pair_id in choices:
            raise DataError(f"{where}: field 'id' {pair_id!r} is labelled twice")
        if choice == "tie":
            raise DataError(f"{where}: field 'choice' is 'tie' for {pair_id}: a tie ranks nothing; "
                            "use 'a' or 'b', or 'skip' to leave the pair out")
        if choice not in CHOICES:
            raise DataError(f"{where}: field 'choice' must be one of {', '.join(CHOICES)}, got {choice!r}")
        choices[pair_id] = choice
    missing = [p.id for p in pairs if p.id not in choices]
    if missing:
        raise DataError(f"{path}: {len(missing)} of {len(pairs)} pairs have no label (first: {missing[0]}); "
                        "label every pair, with 'skip' for the ones you cannot rank")
    out = []
    for pair in pairs:
        choice = choices[pair.id]
        if choice != "skip":
            chosen, rejected = (pair.a, pair.b) if choice == "a" else (pair.b, pair.a)
            out.append(Comparison(pair.prompt, chosen, rejected))
    return out, sum(c == "skip" for c in choices.values())


def split_by_prompt(comparisons: list[Comparison], *, eval_fraction: float,
                    seed: int) -> tuple[list[Comparison], list[Comparison]]:
    """(train, eval): every pair of a prompt on the same side, so eval pairs are about unseen prompts."""
    prompts = sorted({c.prompt for c in comparisons})
    random.Random(seed).shuffle(prompts)
    held = set(prompts[:max(1, round(eval_fraction * len(prompts)))]) if len(prompts) > 1 else set()
    return [c for c in comparisons if c.prompt not in held], [c for c in comparisons if c.prompt in held]
